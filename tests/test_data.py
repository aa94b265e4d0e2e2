"""Training data: folders, dataset TOML, captions, templates, images, latent cache, deterministic batches."""

from __future__ import annotations

import random
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from library.captions import STOCK_TEMPLATES, TEMPLATE_DIR, fill_template, load_template, process_tags
from library.config import load_config
from library.data import TrainingData
from library.errors import UserError
from library.images import load_training_image, split_rgb_alpha
from library.kohya_dataset import DataSettings, DataWarning, dataset_config_batch_size, scan_images
from library.tables import TrainConfig
from library.tiny import tiny_vae_config

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def save(path: Path, color=(200, 40, 90), size=(32, 32), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def rgb_at(pixels: torch.Tensor, y: int, x: int) -> tuple[int, ...]:
    """Pixel of a [-1, 1] tensor back in 0..255."""
    return tuple(round(float(v)) for v in (pixels[:, y, x] + 1) * 127.5)


def no_data_warnings(func, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        return func(*args, **kwargs)


def scan(root: Path, **settings):
    """Scan a folder at the tests' 16 px training size."""
    return scan_images(DataSettings(image_dir=str(root), **{"resolution": 16, **settings}))


def make_data(records, *, batch_size, vae=None, seed=7, **settings):
    settings = DataSettings(**{"resolution": 16, "template": "[filewords]", **settings})
    data = TrainingData(records, settings, name="emb", seed=seed, batch_size=batch_size)
    if vae is not None:
        data.cache_latents(vae, device="cpu", dtype=torch.float32, batch_size=16)
    return data


@pytest.fixture(scope="module")
def vae():
    """The tiny SD VAE of `build_tiny_parts` (latents are half the image size), without the other parts."""
    torch.manual_seed(0)
    return AutoencoderKL(**tiny_vae_config()).eval().requires_grad_(False)


# ---------------------------------------------------------------- folders


def test_kohya_folders_give_repeats_class_tokens_and_skip_unprefixed(tmp_path):
    save(tmp_path / "10_sks woman" / "a.png")
    save(tmp_path / "10_sks woman" / "b.jpg")
    (tmp_path / "10_sks woman" / "b.txt").write_text("red hair, smiling\nignored second line\n")
    save(tmp_path / "3_painting_style" / "c.webp")
    save(tmp_path / "misc" / "d.png")
    with pytest.warns(DataWarning, match="misc"):
        records = scan(tmp_path)
    got = [(r.path.name, r.repeats, r.class_tokens, r.caption) for r in records]
    assert got == [
        ("a.png", 10, "sks woman", "sks woman"),
        ("b.jpg", 10, "sks woman", "red hair, smiling"),
        ("c.webp", 3, "painting_style", "painting_style"),
    ]
    assert make_data(records, batch_size=2).epoch_length == 23


def test_flat_folder_a1111_style(tmp_path):
    for name in ("00012-sks woman smiling.PNG", "2-b.JPG", "c.jpeg", "d.Webp", "e.bmp"):
        save(tmp_path / name)
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "._c.png").write_bytes(b"macOS resource fork, not an image")
    records = no_data_warnings(scan_images, DataSettings(image_dir=str(tmp_path)))
    assert [r.caption for r in records] == ["sks woman smiling", "b", "c", "d", "e"]
    assert {r.repeats for r in records} == {1}
    regex = DataSettings(image_dir=str(tmp_path), filename_word_regex=r"[a-z]+", filename_join_string=", ")
    assert scan_images(regex)[0].caption == "sks, woman, smiling"


def test_kohya_root_with_loose_images_warns_that_they_are_ignored(tmp_path):
    save(tmp_path / "5_x" / "a.png")
    save(tmp_path / "loose.png")
    with pytest.warns(DataWarning, match="ignored"):
        records = scan(tmp_path)
    assert [r.path.name for r in records] == ["a.png"]


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "does not exist"),
        ("empty", "has no images"),
        ("unprefixed", "10_sks woman"),
        ("empty_numbered", "none of its"),
    ],
)
def test_bad_folders_are_one_line_user_errors(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "unprefixed":
        (root / "sks woman").mkdir()
    if layout == "empty_numbered":
        (root / "10_sks woman").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        with pytest.raises(UserError, match=message) as error:
            scan_images(DataSettings(image_dir=str(root)))
    assert str(root) in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------- captions


def test_caption_extension_bom_and_mismatch_warning(tmp_path):
    save(tmp_path / "1_cls" / "a.png")
    (tmp_path / "1_cls" / "a.caption").write_text("\ufeffblue sky, tree", encoding="utf-8")
    with pytest.warns(DataWarning, match="caption_extension = '.caption'"):
        assert scan(tmp_path)[0].caption == "cls"
    settings = DataSettings(image_dir=str(tmp_path), caption_extension=".caption")
    assert no_data_warnings(scan_images, settings)[0].caption == "blue sky, tree"


def test_caption_not_utf8_names_the_file(tmp_path):
    save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("café, garçon".encode("latin-1"))
    with pytest.raises(UserError, match="UTF-8") as error:
        scan(tmp_path)
    assert "a.txt" in str(error.value)


# ---------------------------------------------------------------- dataset TOML


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "dataset.toml"
    path.write_text(text)
    return str(path)


def test_dataset_toml_falls_back_subset_dataset_general(tmp_path):
    save(tmp_path / "imgs" / "10_ignored name" / "a.png")
    (tmp_path / "imgs" / "10_ignored name" / "a.caption").write_text("x, y, z")
    save(tmp_path / "imgs" / "two" / "b.png")
    config = write_config(
        tmp_path,
        """
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".caption"
resolution = 16
batch_size = 2

[[datasets]]
num_repeats = 4
flip_aug = true

  [[datasets.subsets]]
  image_dir = "imgs/10_ignored name"
  num_repeats = 2
  keep_tokens = 2

  [[datasets.subsets]]
  image_dir = "imgs/two"
  class_tokens = "sks dog"
  caption_prefix = "photo"
""",
    )
    records = no_data_warnings(scan_images, DataSettings(dataset_config=config, image_dir="unused"))
    first, second = records
    assert (first.repeats, first.keep_tokens, first.caption, first.class_tokens) == (2, 2, "x, y, z", "")
    assert (second.repeats, second.keep_tokens, second.caption, second.class_tokens) == (
        4,
        1,
        "sks dog",
        "sks dog",
    )
    assert first.shuffle_tags and second.shuffle_tags and first.flip_aug and second.flip_aug
    assert first.resolution == second.resolution == (16, 16)
    assert second.caption_prefix == "photo"
    assert dataset_config_batch_size(config) == 2


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'imgs'\nnum_repeat = 3\n",
            "did you mean 'num_repeats'",
        ),
        (
            "[general]\nshufle_caption = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'imgs'\n",
            "shuffle_caption",
        ),
        (
            "[general]\nimage_dir = 'imgs'\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'imgs'\n",
            "datasets.subsets",
        ),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'imgs'\nflip_aug = 'yes'\n", "flip_aug"),
        (
            "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'imgs'\nmetadata_file = 'm.json'\n",
            "metadata_file",
        ),
        ("[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n", "image_dir"),
        ("[[datasets]\n", "not valid TOML"),
    ],
)
def test_bad_dataset_toml_names_the_key(tmp_path, text, message):
    save(tmp_path / "imgs" / "a.png")
    config = write_config(tmp_path, text)
    with pytest.raises(UserError, match=message) as error:
        scan_images(DataSettings(dataset_config=config))
    assert "dataset.toml" in str(error.value) and "\n" not in str(error.value)


def test_dataset_toml_warns_about_ignored_keys_and_skips_reg_images(tmp_path):
    save(tmp_path / "imgs" / "a.png")
    save(tmp_path / "reg" / "r.png")
    config = write_config(
        tmp_path,
        """
[general]
network_multiplier = 1.0
[[datasets]]
network_multiplier = 0.5
  [[datasets.subsets]]
  image_dir = "imgs"
  color_aug = true
  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
""",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = scan_images(DataSettings(dataset_config=config))
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert [r.path.name for r in records] == ["a.png"]
    assert any("color_aug = True is ignored" in m for m in messages)
    assert sum("network_multiplier" in m for m in messages) == 1  # only the non-default value
    assert any("is_reg" in m and "reg" in m for m in messages)


# ---------------------------------------------------------------- templates and tags


def test_stock_templates_ship_a1111_lines():
    lines = {name: (TEMPLATE_DIR / f"{name}.txt").read_text().splitlines() for name in STOCK_TEMPLATES}
    assert {name: len(v) for name, v in lines.items()} == {
        "subject": 27,
        "subject_filewords": 27,
        "style": 19,
        "style_filewords": 19,
        "none": 1,
    }
    assert lines["subject"][:3] == [
        "a photo of a [name]",
        "a rendering of a [name]",
        "a cropped photo of the [name]",
    ]
    assert lines["subject_filewords"] == [f"{line}, [filewords]" for line in lines["subject"]]
    assert lines["style"][0] == "a painting, art by [name]"
    assert lines["style_filewords"][0] == "a painting of [filewords], art by [name]"
    assert lines["style_filewords"][7] == "a picture of [filewords], art by [name]"
    assert lines["none"] == ["picture"]
    assert load_template("style") == lines["style"] == load_template("style.txt")


def test_template_from_file_inline_and_errors(tmp_path):
    user = tmp_path / "mine.txt"
    user.write_text("portrait of [name]\n\n  [name], [filewords]  \n")
    assert load_template(str(user)) == ["portrait of [name]", "[name], [filewords]"]
    inline = "a closeup photo of [name], neutral gray background"
    assert load_template(inline) == [inline]
    assert load_template("photo of [name]\npainting of [name]") == ["photo of [name]", "painting of [name]"]
    with pytest.raises(UserError, match="not found"):
        load_template(str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="not a stock template"):
        load_template("subject_filewrods")
    assert fill_template("a photo of [name], [filewords]", "emb", "red hair") == "a photo of emb, red hair"


def test_prompts_use_template_name_and_caption(tmp_path, vae):
    save(tmp_path / "1_sks" / "a.png", size=(16, 16))
    records = scan(tmp_path)
    data = make_data(records, batch_size=1, vae=vae, template="a closeup photo of [name], [filewords]")
    assert data.batch(0, 0, 1).prompts == ["a closeup photo of emb, sks"]
    stock = make_data(records, batch_size=1, vae=vae, template="subject_filewords")
    allowed = {
        line.replace("[name]", "emb").replace("[filewords]", "sks") for line in load_template("subject")
    }
    allowed = {f"{line}, sks" for line in allowed}
    prompts = {stock.batch(step, 0, 1).prompts[0] for step in range(200)}
    assert prompts <= allowed and len(prompts) > 20  # a random line per sample


def test_tag_shuffle_keeps_first_tokens_in_place():
    caption = "sks woman, red hair, smiling, outdoors, blue dress"
    orders = set()
    for seed in range(200):
        out = process_tags(caption, random.Random(seed), shuffle=True, keep_tokens=2, dropout=0.0)
        tags = out.split(", ")
        assert tags[:2] == ["sks woman", "red hair"]
        assert sorted(tags[2:]) == ["blue dress", "outdoors", "smiling"]
        orders.add(out)
    assert len(orders) == 6  # every order of the three free tags occurs
    assert process_tags(caption, random.Random(0), shuffle=False, keep_tokens=0, dropout=0.0) == caption


def test_tag_dropout_rate_and_kept_tags():
    caption = ", ".join(f"tag{i}" for i in range(12))
    rng = random.Random(3)
    dropped = 0
    draws = 2000
    for _ in range(draws):
        tags = process_tags(caption, rng, shuffle=False, keep_tokens=2, dropout=0.3).split(", ")
        assert tags[:2] == ["tag0", "tag1"]
        dropped += 10 - (len(tags) - 2)
    rate = dropped / (10 * draws)
    assert abs(rate - 0.3) < 0.015  # binomial std over 20,000 tags is 0.0032


# ---------------------------------------------------------------- images


def _palette_with_transparency() -> Image.Image:
    image = Image.new("P", (32, 32), 1)
    image.putpalette([*RED, *BLUE] + [0] * 762)
    image.paste(0, (0, 0, 16, 32))
    image.info["transparency"] = 0
    return image


IMAGE_MODES = {
    "RGB": (lambda: Image.new("RGB", (32, 32), (200, 40, 90)), (200, 40, 90), None),
    "RGBA": (lambda: Image.new("RGBA", (32, 32), (200, 40, 90, 128)), (200, 40, 90), 128),
    "LA": (lambda: Image.new("LA", (32, 32), (77, 200)), (77, 77, 77), 200),
    "L": (lambda: Image.new("L", (32, 32), 128), (128, 128, 128), None),
    "I;16": (lambda: Image.new("I;16", (32, 32), 128 * 257), (128, 128, 128), None),
    "CMYK": (lambda: Image.new("CMYK", (32, 32), (0, 255, 255, 0)), RED, None),
    "1": (lambda: Image.new("1", (32, 32), 1), (255, 255, 255), None),
    "P": (_palette_with_transparency, BLUE, 255),  # pixel sampled on the opaque right half
}


@pytest.mark.parametrize("mode", list(IMAGE_MODES))
def test_every_image_mode_becomes_the_right_rgb(tmp_path, mode):
    build, expected_rgb, expected_alpha = IMAGE_MODES[mode]
    image = build()
    path = tmp_path / ("a.jpg" if mode == "CMYK" else "a.png")
    image.save(path, quality=100) if mode == "CMYK" else image.save(path)
    assert Image.open(path).mode == image.mode
    pixels, alpha = load_training_image(path, 16)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    tolerance = 3 if mode == "CMYK" else 1  # JPEG rounding
    assert np.allclose(rgb_at(pixels, 8, 12), expected_rgb, atol=tolerance)
    if expected_alpha is None:
        assert alpha is None
    else:
        assert alpha.shape == (16, 16)
        assert abs(float(alpha[8, 12]) * 255 - expected_alpha) < 1
    if mode == "P":
        assert float(alpha[8, 2]) == 0.0  # the transparent palette entry


def test_32_bit_grey_is_read_as_16_bit_values():
    # Older Pillow releases open 16-bit PNGs as mode "I"; the values are still 0..65535.
    rgb, alpha = split_rgb_alpha(Image.new("I", (4, 4), 51 * 257))
    assert rgb.getpixel((0, 0)) == (51, 51, 51) and alpha is None


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (32, 16), RED)
    image.paste(BLUE, (16, 0, 32, 16))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": left becomes top
    image.save(tmp_path / "rotated.png", exif=exif)
    pixels, _ = load_training_image(tmp_path / "rotated.png", (16, 32))
    assert pixels.shape == (3, 32, 16)
    assert rgb_at(pixels, 2, 8) == RED and rgb_at(pixels, 29, 8) == BLUE


def test_resize_short_side_then_centre_crop(tmp_path):
    image = Image.new("RGB", (64, 32), GREEN)
    image.paste(RED, (16, 0, 32, 32))
    image.paste(BLUE, (32, 0, 48, 32))
    image.save(tmp_path / "wide.png")
    pixels, _ = load_training_image(tmp_path / "wide.png", 16)  # 64x32 -> 32x16 -> centre 16x16
    assert rgb_at(pixels, 8, 1) == RED and rgb_at(pixels, 8, 14) == BLUE
    wide, _ = load_training_image(tmp_path / "wide.png", (32, 8))  # (width, height)
    assert wide.shape == (3, 8, 32)
    assert rgb_at(wide, 4, 0) == GREEN and rgb_at(wide, 4, 12) == RED


def test_corrupt_image_and_bad_resolution(tmp_path, vae):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    with pytest.raises(UserError, match="broken.png"):
        load_training_image(bad, 16)
    save(tmp_path / "good.png")
    data = make_data(scan(tmp_path), batch_size=1)
    with pytest.raises(UserError, match="broken.png"):
        data.cache_latents(vae, device="cpu", dtype=torch.float32)
    with pytest.raises(UserError, match="multiples of 8"):
        DataSettings(resolution=500)
    with pytest.raises(
        UserError,
        match="'dataset.latent_sampling' = 'sometimes' is not allowed.*Choose one of: once, deterministic, random",
    ):
        load_config(TrainConfig, None, ["dataset.latent_sampling=sometimes"])


def test_batch_size_larger_than_distinct_images(tmp_path):
    save(tmp_path / "100_sks" / "a.png")
    save(tmp_path / "100_sks" / "b.png")
    with pytest.raises(UserError, match="lower batch_size or add images"):
        make_data(scan(tmp_path), batch_size=3)


# ---------------------------------------------------------------- latents


def test_alpha_loss_weight_min_zero_mean_one_at_latent_size(tmp_path, vae):
    image = Image.new("RGBA", (32, 32), (10, 200, 30, 0))
    image.paste((10, 200, 30, 255), (16, 0, 32, 32))  # right half opaque
    image.save(tmp_path / "a.png")
    save(tmp_path / "b.png", color=(0, 0, 0))  # no alpha: weight 1
    records = scan(tmp_path, resolution=32, flip_aug=True)
    data = make_data(records, batch_size=2, vae=vae, alpha_loss_weight=True)
    seen_flip = set()
    for step in range(30):
        batch = data.batch(step, 0, 2)
        assert batch.loss_weights.shape == (2, 1, 16, 16)
        for weight, index, flipped in zip(batch.loss_weights, batch.sample_ids, batch.flipped, strict=True):
            if index == 1:
                assert torch.equal(weight, torch.ones(1, 16, 16))
                continue
            assert float(weight.min()) == 0.0 and abs(float(weight.mean()) - 1.0) < 1e-5
            opaque = weight[0, :, 12] if not flipped else weight[0, :, 3]
            assert torch.allclose(opaque, torch.full((16,), 2.0))
            seen_flip.add(flipped)
    assert seen_flip == {False, True}
    assert make_data(records, batch_size=2, vae=vae).batch(0, 0, 2).loss_weights is None


def _vae_encoding(vae, path, size=16, flip=False):
    pixels, _ = load_training_image(path, size)
    if flip:
        pixels = pixels.flip(-1)
    with torch.no_grad():
        dist = vae.encode(pixels[None]).latent_dist
    return dist.mean[0] * vae.config.scaling_factor, dist.std[0] * vae.config.scaling_factor


def _one_image(tmp_path, **settings):
    image = Image.new("RGB", (16, 16), RED)
    image.paste(BLUE, (0, 0, 5, 16))  # asymmetric, so the mirror image encodes differently
    image.save(tmp_path / "a.png")
    return scan(tmp_path, **settings)


def test_latent_sampling_deterministic_is_the_scaled_mean_and_flip_is_encoded(tmp_path, vae):
    records = _one_image(tmp_path, flip_aug=True)
    mean, _ = _vae_encoding(vae, records[0].path)
    mirror, _ = _vae_encoding(vae, records[0].path, flip=True)
    data = make_data(records, batch_size=1, vae=vae, latent_sampling="deterministic")
    flips = []
    for step in range(40):
        batch = data.batch(step, 0, 1)
        expected = mirror if batch.flipped[0] else mean
        assert torch.allclose(batch.latents[0], expected, atol=1e-5)
        flips.append(batch.flipped[0])
    assert 8 < sum(flips) < 32
    assert batch.latents.dtype == torch.float32


def test_latent_sampling_once_is_one_fixed_sample(tmp_path, vae):
    records = _one_image(tmp_path)
    mean, std = _vae_encoding(vae, records[0].path)
    data = make_data(records, batch_size=1, latent_sampling="once")
    calls = []
    data.cache_latents(vae, device="cpu", dtype=torch.float32, progress=lambda *done: calls.append(done))
    assert calls == [(1, 1)]
    assert "1 images in 1 folder(s), 1 samples per epoch, 16x16, latent sampling once" == data.summary()
    first = data.batch(0, 0, 1).latents
    assert all(torch.equal(first, data.batch(step, 0, 1).latents) for step in (1, 5, 50))
    assert not torch.allclose(first[0], mean, atol=1e-4)  # a sample, not the mean
    assert float(((first[0] - mean) / std).abs().max()) < 6  # ...drawn from this image's distribution


def test_latent_caching_encodes_a_bounded_number_of_pixels_at_once(tmp_path, vae, monkeypatch):
    """Large pictures go to the VAE a few at a time (SDXL at 1024²: 2, not 8), with the same latents."""
    for i in range(5):
        save(tmp_path / "img" / f"{i}.png", (40 * i, 90, 200 - 30 * i))
    records = scan(tmp_path / "img")
    whole = make_data(records, batch_size=1, vae=vae, latent_sampling="once")  # 5 at once (batch_size=16)
    monkeypatch.setattr("library.data.VAE_BATCH_PIXELS", 2 * 16 * 16)
    sizes = []
    monkeypatch.setattr(vae, "encode", lambda x, encode=vae.encode: sizes.append(len(x)) or encode(x))
    calls = []
    few = make_data(records, batch_size=1, latent_sampling="once")
    few.cache_latents(vae, device="cpu", dtype=torch.float32, progress=lambda *done: calls.append(done))
    assert sizes == [2, 2, 1] and calls == [(2, 5), (4, 5), (5, 5)]
    drawn = [(few.batch(step, 0, 1), whole.batch(step, 0, 1)) for step in range(10)]
    assert {a.sample_ids[0] for a, _ in drawn} == set(range(5))  # every picture compared
    for a, b in drawn:
        assert a.sample_ids == b.sample_ids
        torch.testing.assert_close(a.latents, b.latents, atol=1e-5, rtol=0)


def test_latent_sampling_random_draws_fresh_samples_around_the_mean(tmp_path, vae):
    records = _one_image(tmp_path)
    mean, std = _vae_encoding(vae, records[0].path)
    data = make_data(records, batch_size=1, vae=vae, latent_sampling="random")
    draws = torch.stack([data.batch(step, 0, 1).latents[0] for step in range(400)])
    assert not torch.equal(draws[0], draws[1])
    standard_error = std / 20  # sqrt(400)
    assert float(((draws.mean(0) - mean) / standard_error).abs().max()) < 5
    assert torch.allclose(draws.std(0), std, rtol=0.2)


# ---------------------------------------------------------------- determinism and epochs


def _varied_dataset(tmp_path, **settings):
    for i in range(7):
        save(tmp_path / "3_sks" / f"{i}.png", color=(40 * i, 100, 200 - 30 * i), size=(16, 16))
        (tmp_path / "3_sks" / f"{i}.txt").write_text(f"tag{i}, red, green, blue, small")
    save(tmp_path / "2_cls" / "x.png", color=(9, 9, 9), size=(16, 16))
    return scan(tmp_path, **settings)


def test_batches_are_pure_functions_of_seed_step_and_position(tmp_path, vae):
    records = _varied_dataset(tmp_path, flip_aug=True, shuffle_tags=True, keep_tokens=1, tag_dropout=0.2)
    options = dict(batch_size=8, vae=vae, latent_sampling="random", template="subject_filewords")
    one, two = make_data(records, **options), make_data(records, **options)
    for step in (0, 3, 11):
        full = one.batch(step, 0, 8)
        again = two.batch(step, 0, 8)
        halves = [two.batch(step, 0, 4), two.batch(step, 4, 4)]
        for other in (again, halves):
            parts = other if isinstance(other, list) else [other]
            assert torch.equal(full.latents, torch.cat([p.latents for p in parts]))
            assert full.prompts == sum((p.prompts for p in parts), [])
            assert full.sample_ids == sum((p.sample_ids for p in parts), [])
            assert full.flipped == sum((p.flipped for p in parts), [])
    assert one.batch(0, 0, 8).prompts != one.batch(1, 0, 8).prompts
    other_seed = make_data(records, seed=8, batch_size=8)
    assert [other_seed.record_at(0, i) for i in range(8)] != one.batch(0, 0, 8).sample_ids
    with pytest.raises(ValueError):
        one.batch(0, 4, 8)


def test_every_epoch_covers_each_image_times_repeats(tmp_path):
    records = _varied_dataset(tmp_path)
    data = make_data(records, batch_size=4)
    assert data.num_images == 8 and data.epoch_length == 23
    steps = 3 * data.epoch_length // 4 + 1  # 23 is not a multiple of 4: batches straddle epochs
    stream = [data.record_at(step, pos) for step in range(steps) for pos in range(4)]
    epochs = [stream[i * 23 : (i + 1) * 23] for i in range(3)]
    for epoch in epochs:
        assert Counter(epoch) == {i: records[i].repeats for i in range(8)}
    assert epochs[0] != epochs[1]  # each epoch has its own permutation
