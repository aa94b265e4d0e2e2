"""The review page and the selection it exports: `select` copies only pictures of the selection's own review
folder (the one whose flags.json lists them, each a regular file in it), and text put into the page stays
text. selection.json is a downloaded file that can be crafted or shared, so these tests craft it."""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path

import pytest

from generate_dataset import main
from library.pick import run_pick
from library.tables import PickConfig
from tests.helpers import make_images, one_error_line

PICK = PickConfig(faces=False, blur_threshold=0.0, duplicate_distance=-1)


@pytest.fixture
def review(tmp_path) -> Path:
    """A reviewed folder: 4 pictures with captions, flags.json and review.html written by `pick`."""
    folder = make_images(tmp_path / "candidates", count=4, size=32)
    run_pick(folder, PICK, log=lambda _: None)
    return folder


@pytest.fixture
def private(tmp_path) -> Path:
    """Somewhere else on the machine: a private key and a picture that was never reviewed."""
    folder = tmp_path / "home"
    folder.mkdir()
    (folder / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    make_images(folder, count=1, size=32, caption=None)  # home/00.png
    return folder


def selection_file(tmp_path: Path, folder: Path, keep: list[str]) -> Path:
    """selection.json as review.html exports it (or as someone crafted it)."""
    path = tmp_path / "selection.json"
    data = {"format": "ti-toolkit-selection", "version": 1, "folder": str(folder), "keep": keep}
    path.write_text(json.dumps({**data, "drop": [], "undecided": []}))
    return path


def select(tmp_path: Path, selection: Path, *extra: str) -> int:
    return main(
        ["select", *extra, str(selection), f"select.output_dir={tmp_path / 'dataset'}", "select.name=x1"]
    )


def test_a_selection_from_the_review_page_copies_its_pictures(tmp_path, review, capsys):
    code = select(tmp_path, selection_file(tmp_path, review, ["00.png", "02.png"]))
    assert code == 0, capsys.readouterr().err
    target = tmp_path / "dataset" / "100_x1"
    assert sorted(p.name for p in target.iterdir()) == ["00.png", "00.txt", "02.png", "02.txt"]
    assert (target / "02.png").read_bytes() == (review / "02.png").read_bytes()
    assert (target / "02.txt").read_text() == "x1, a shape, picture 2\n"


def refused(tmp_path: Path, capsys, selection: Path, *extra: str) -> str:
    """Runs `select`, checks it printed one error line and wrote nothing; returns that line."""
    assert select(tmp_path, selection, *extra) == 2
    line = one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "dataset").exists()
    assert line.startswith(f"error: {selection}: ")
    return line


def test_a_folder_that_was_never_reviewed_is_refused(tmp_path, review, private, capsys):
    for folder, keep in ((private, ["id_rsa"]), (private, ["00.png"]), (Path("/etc"), ["hostname"])):
        line = refused(tmp_path, capsys, selection_file(tmp_path, folder, keep))
        assert f"{folder} is not a review folder (it has no flags.json" in line
    # --images (the pictures moved since the review) must be a review folder too.
    line = refused(tmp_path, capsys, selection_file(tmp_path, review, ["00.png"]), "--images", str(private))
    assert f"{private} is not a review folder" in line


@pytest.mark.parametrize(
    "name", ["../home/id_rsa", "{private}/id_rsa", "sub/00.png", "..", "", "flags.json", "review.html"]
)
def test_only_plain_names_the_review_listed(tmp_path, review, private, capsys, name):
    name = name.format(private=private)
    (review / "sub").mkdir()
    (review / "sub" / "00.png").write_bytes((review / "00.png").read_bytes())
    line = refused(tmp_path, capsys, selection_file(tmp_path, review, ["01.png", name]))
    if name in ("flags.json", "review.html"):  # files of the folder, but not pictures on its page
        assert f"{name!r} was not on the review page of {review}; export the selection again" in line
    else:
        assert f"{name!r} is not a plain file name; a selection may only name pictures of its review" in line


def test_symbolic_links_are_never_followed(tmp_path, review, private, capsys):
    """A reviewed name that is now a link (a shared or unpacked folder) must not copy what it points at."""
    (review / "01.png").unlink()
    (review / "01.png").symlink_to(private / "id_rsa")
    line = refused(tmp_path, capsys, selection_file(tmp_path, review, ["00.png", "01.png"]))
    assert "kept picture 01.png" in line and "is a symbolic link or not a file" in line
    # Nor a caption that is a link: its first line would land in the dataset's caption file.
    (review / "02.txt").unlink()
    (review / "02.txt").symlink_to(private / "id_rsa")
    assert select(tmp_path, selection_file(tmp_path, review, ["02.png"])) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{review / '02.txt'}: the caption is a symbolic link" in line
    assert not (tmp_path / "dataset").exists()


def test_a_damaged_or_missing_listing_is_one_line(tmp_path, review, capsys):
    (review / "03.png").unlink()
    line = refused(tmp_path, capsys, selection_file(tmp_path, review, ["03.png"]))
    assert f"kept picture 03.png is not in {review}" in line
    (review / "flags.json").write_text('{"images": 7}')
    line = refused(tmp_path, capsys, selection_file(tmp_path, review, ["00.png"]))
    assert "flags.json is damaged; run `python generate_dataset.py pick" in line
    crafted = tmp_path / "selection.json"
    crafted.write_text(json.dumps({"format": "ti-toolkit-selection", "folder": ["/"], "keep": ["00.png"]}))
    assert "'folder' must be the review folder's path" in refused(tmp_path, capsys, crafted)


# --------------------------------------------------------------------------------------------------
# The page


def page_data(page: Path) -> dict:
    text = page.read_text()
    return json.loads(re.search(r'id="review-data">(.*?)</script>', text, re.S)[1])


def test_text_put_into_the_page_is_never_read_as_markup_or_placeholders(tmp_path):
    """Folder and file names, captions and prompts come from users (or whoever shared the folder)."""
    folder = make_images(tmp_path / "{{JS}} & {{DATA}} <i>", count=1, size=32, caption=None)
    hostile = "<img src=x onerror=alert(1)>.png"
    os.rename(folder / "00.png", folder / hostile)
    (folder / "<img src=x onerror=alert(1)>.txt").write_text("</script><script>alert(2)</script>\n")
    page = run_pick(folder, PICK, log=lambda _: None).read_text()
    title = html.escape(f"Review: {folder.name}", quote=True)
    assert f"<title>{title}</title>" in page and f"<h1>{title}</h1>" in page
    assert page.count("<script") == 2  # the data block and the page's own script, nothing injected
    item = page_data(folder / "review.html")["images"][0]
    assert item["file"] == hostile and item["caption"] == "</script><script>alert(2)</script>"


def test_a_crafted_manifest_reaches_the_page_only_as_well_typed_text(tmp_path):
    folder = make_images(tmp_path / "run", count=2, size=32, caption=None)
    images = [
        {"file": "00.png", "prompt": "<b>hi</b>", "seed": 5, "axis_values": ["a", "b"]},
        {"file": "01.png", "prompt": ["not text"], "seed": "7", "axis_values": "a closeup"},
        {"file": ["unhashable"], "prompt": "x"},
    ]
    (folder / "manifest.json").write_text(json.dumps({"images": images}))
    run_pick(folder, PICK, log=lambda _: None)
    items = {item["file"]: item for item in page_data(folder / "review.html")["images"]}
    assert items["00.png"] == {
        "file": "00.png",
        "reasons": [],
        "prompt": "<b>hi</b>",
        "seed": 5,
        "axis_values": ["a", "b"],
    }
    assert items["01.png"] == {"file": "01.png", "reasons": []}  # wrong types are left off, not shown
