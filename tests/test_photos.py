"""Preparing real photos: face-centred square crops from any input (portrait, landscape, tiny, huge, RGBA,
grayscale, 16-bit, EXIF-rotated, corrupt), flips, captions, reports; and the crop-box arithmetic."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from generate_dataset import main
from library.errors import UserError
from library.photos import centre_square, detect_faces, face_square, prepare_photos
from library.tables import PhotosConfig
from tests.faces import FACE_CENTRE, drawn_face

EXIF_ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of awkward inputs, as users have them (shared: the tests only read it)."""
    folder = tmp_path_factory.mktemp("raw")
    drawn_face((600, 900), at=(100, 50)).save(folder / "portrait.jpg", quality=95)
    (folder / "portrait.txt").write_text("a woman in a red coat\n")
    drawn_face((1200, 600), at=(700, 100)).save(folder / "landscape.png")
    Image.new("RGB", (20, 30), (200, 100, 50)).save(folder / "tiny.png")
    drawn_face((4800, 3200), at=(2000, 1200), grain=0).save(folder / "huge.jpg", quality=80)
    rgba = drawn_face().convert("RGBA")
    rgba.paste((0, 0, 0, 0), (0, 0, 40, 40))
    rgba.save(folder / "rgba.png")
    drawn_face().convert("L").save(folder / "gray.png")
    Image.fromarray(np.full((64, 96), 40000, dtype=np.uint16)).save(folder / "gray16.png")
    # Stored landscape, red left and blue right; EXIF 6 = show it turned 90° clockwise: red on top.
    stored = Image.new("RGB", (200, 100), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 100, 100))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    stored.save(folder / "rotated.jpg", exif=exif, quality=95)
    good = folder / "portrait.jpg"
    (folder / "corrupt.jpg").write_bytes(good.read_bytes()[:400])
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4 not a picture")
    (folder / ".DS_Store").write_bytes(b"\0\0")
    return folder


def test_every_kind_of_input(tmp_path, photos):
    out = tmp_path / "prepared"
    cfg = PhotosConfig(input_dir=str(photos), output_dir=str(out), size=256, flip=True)
    lines = []
    report = prepare_photos(cfg, log=lines.append)
    names = sorted(p.name for p in out.glob("*.png"))
    stems = ["gray", "gray16", "huge", "landscape", "portrait", "rgba", "rotated", "tiny"]
    assert names == sorted([f"{s}.png" for s in stems] + [f"{s}-flipped.png" for s in stems])
    for name in names:
        with Image.open(out / name) as image:
            assert image.size == (256, 256)
            assert image.mode == ("RGBA" if name.startswith("rgba") else "RGB")
    assert sorted(report.face_crops) == ["gray.png", "huge.jpg", "landscape.png", "portrait.jpg", "rgba.png"]
    assert sorted(report.centre_crops) == ["gray16.png", "rotated.jpg", "tiny.png"]
    assert sorted(line.split(":")[0] for line in report.unreadable) == ["corrupt.jpg", "notes.pdf"]
    assert any("tiny.png (20x30)" in u for u in report.upscaled)
    assert any(line.startswith("no face found, centre crop:") and "tiny.png" in line for line in lines)
    assert any("skipped unreadable file corrupt.jpg" in line for line in lines)

    # Cropped around the face: it sits in the middle, filling about 1 / face_scale of the side.
    for stem in ("portrait", "landscape", "huge"):
        faces = detect_faces(Image.open(out / f"{stem}.png"))
        assert len(faces) == 1, stem
        x, y, w, h = faces[0]
        assert abs(x + w / 2 - 128) < 20, stem
        assert 0.25 < w / 256 < 0.6, stem
    # EXIF orientation honoured: red on top, blue below.
    rotated = np.asarray(Image.open(out / "rotated.png"))
    assert rotated[10, 128, 0] > 200 and rotated[10, 128, 2] < 60
    assert rotated[245, 128, 2] > 200 and rotated[245, 128, 0] < 60
    # 16-bit grey is scaled, not clipped: 40000 / 257 = 156.
    assert abs(int(np.asarray(Image.open(out / "gray16.png"))[5, 5, 0]) - 156) <= 1
    # Flipped copies are mirror images, with the same caption.
    assert np.array_equal(
        np.asarray(ImageOps.mirror(Image.open(out / "landscape.png"))),
        np.asarray(Image.open(out / "landscape-flipped.png")),
    )
    assert (out / "portrait.txt").read_text() == "a woman in a red coat\n"
    assert (out / "portrait-flipped.txt").read_text() == "a woman in a red coat\n"
    assert not (out / "tiny.txt").exists()
    # The transparent corner of the RGBA input stays transparent.
    assert Image.open(out / "rgba.png").getpixel((0, 0))[3] == 0
    # The originals are untouched and nothing is overwritten on a second run.
    with pytest.raises(UserError, match="already exists"):
        prepare_photos(cfg, log=lines.append)
    assert len(list(photos.iterdir())) == 12


def test_caption_template_and_the_script(tmp_path, photos, capsys):
    out = tmp_path / "prepared"
    code = main(
        [
            "photos",
            f"photos.input_dir={photos}",
            f"photos.output_dir={out}",
            "photos.size=64",
            "photos.caption=a photo of a woman, [filewords]",
            "pick.blur_threshold=0",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert (out / "portrait.txt").read_text() == "a photo of a woman, a woman in a red coat\n"
    assert (out / "tiny.txt").read_text() == "a photo of a woman, tiny\n"  # A1111's file-name caption
    assert (out / "review.html").exists()
    flags = {f["file"]: f["reasons"] for f in json.loads((out / "flags.json").read_text())["images"]}
    assert "no face found" in flags["tiny.png"]
    assert main(["photos", f"photos.input_dir={photos}", "photos.output_dir="]) == 2
    assert "photos.output_dir" in capsys.readouterr().err


def test_crop_boxes():
    assert centre_square(300, 200) == (50, 0, 200, 200)
    assert centre_square(200, 300) == (0, 50, 200, 200)
    # A face in the middle: a box 2.5 times its size, a little lower (shoulders).
    assert face_square(1000, 1000, (450, 400, 100, 100), 2.5, 0.15) == (375, 340, 250, 250)
    # Near an edge: the box moves inside the picture instead of shrinking.
    assert face_square(1000, 800, (0, 0, 100, 100), 2.5, 0.0) == (0, 0, 250, 250)
    assert face_square(1000, 800, (950, 750, 50, 50), 2.5, 0.0) == (875, 675, 125, 125)
    # A face too big for the picture: the box is the short side.
    assert face_square(600, 400, (100, 50, 300, 300), 2.5, 0.15) == (50, 0, 400, 400)


def test_face_detection_on_drawn_faces():
    faces = detect_faces(drawn_face((1000, 600), at=(500, 150)))
    assert len(faces) == 1
    x, y, w, h = faces[0]
    assert abs(x + w / 2 - (500 + FACE_CENTRE[0])) < 30 and abs(y + h / 2 - (150 + FACE_CENTRE[1])) < 40
    two = np.concatenate([np.asarray(drawn_face()), np.asarray(drawn_face())], axis=1)
    assert len(detect_faces(Image.fromarray(two))) == 2
    assert detect_faces(Image.new("RGB", (300, 300), (128, 128, 128))) == []


def test_bad_settings(tmp_path, photos):
    with pytest.raises(UserError, match="photos.input_dir"):
        prepare_photos(PhotosConfig(input_dir=str(tmp_path / "missing"), output_dir=str(tmp_path / "o")))
    with pytest.raises(UserError, match="must differ"):
        prepare_photos(PhotosConfig(input_dir=str(photos), output_dir=str(photos)))
    with pytest.raises(UserError, match="multiple of 8"):
        prepare_photos(PhotosConfig(input_dir=str(photos), output_dir=str(tmp_path / "o"), size=500))
    assert not (tmp_path / "o").exists()
