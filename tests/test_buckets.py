"""Aspect-ratio buckets (Kohya's enable_bucket) and SDXL's per-sample size information."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from library.buckets import BucketSettings, bucket_sizes, check_buckets, crop_for
from library.config import load_config
from library.data import TrainingData, derive_seed
from library.errors import UserError
from library.images import alpha_loss_weight, load_training_image
from library.kohya_dataset import DataSettings, DataWarning, scan_images
from library.tables import TrainConfig
from library.tiny import tiny_vae_config

pytestmark = pytest.mark.usefixtures("one_thread")

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
# The tests' small buckets: resolution 32 in steps of 8, sides 8 to 64.
SMALL = dict(resolution=32, enable_bucket=True, min_bucket_reso=8, max_bucket_reso=64, bucket_reso_steps=8)


@pytest.fixture(scope="module")
def vae():
    """The tiny SD VAE (latents are half the image size)."""
    torch.manual_seed(0)
    return AutoencoderKL(**tiny_vae_config()).eval().requires_grad_(False)


def picture(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    """A picture with a different pattern for every seed (and a varying alpha for RGBA)."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    channels = [(x * (7 + seed) + y * (3 + 2 * seed) + 40 * c) % 256 for c in range(len(mode))]
    return Image.fromarray(np.stack(channels, -1).astype(np.uint8), mode)


def make_data(records, *, batch_size, vae=None, seed=7, **settings):
    settings = DataSettings(**{**SMALL, "template": "[filewords]", **settings})
    data = TrainingData(records, settings, name="emb", seed=seed, batch_size=batch_size)
    if vae is not None:
        data.cache_latents(vae, device="cpu", dtype=torch.float32, batch_size=4)
    return data


def mixed_dataset(root: Path, **settings) -> list:
    """Portraits, landscapes and squares in two Kohya folders (3 and 2 repeats), with captions."""
    shapes = {
        "3_sks": [(24, 40), (30, 48), (24, 40), (40, 24), (32, 32)],
        "2_cls": [(40, 24), (48, 30), (32, 32), (36, 36)],
    }
    for number, (folder, sizes) in enumerate(shapes.items()):
        for i, size in enumerate(sizes):
            path = root / folder / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            picture(size, i + 10 * number).save(path)
            path.with_suffix(".txt").write_text(f"tag{i}, red, green, blue")
    return scan_images(DataSettings(**{**SMALL, "image_dir": str(root), **settings}))


# ---------------------------------------------------------------- bucket sizes, as Kohya makes them


def test_bucket_sizes_for_512_and_1024_follow_kohya():
    sd, _ = check_buckets((512, 512), 256, 1024, 64, False)
    assert bucket_sizes((512, 512), sd) == (
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
        (512, 512),
        (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
    )  # fmt: skip
    xl, _ = check_buckets((1024, 1024), 256, 2048, 64, False)
    sizes = bucket_sizes((1024, 1024), xl)
    assert {(832, 1216), (896, 1152), (768, 1344), (640, 1536), (1024, 1024), (1216, 832)} <= set(sizes)
    assert all(w * h <= 1024 * 1024 and w % 64 == 0 == h % 64 and 256 <= min(w, h) for w, h in sizes)
    # Known pictures: a 3:4 portrait, a 3:2 landscape, a square and a 9:16 phone photo.
    assert crop_for((768, 1024), (512, 512), sd).target == (448, 576)
    assert crop_for((3000, 2000), (1024, 1024), xl).target == (1216, 832)
    assert crop_for((2000, 2000), (1024, 1024), xl).target == (1024, 1024)
    assert crop_for((1080, 1920), (1024, 1024), xl).target == (768, 1344)
    assert crop_for((512, 512), (512, 512), sd).target == (512, 512)


def test_min_max_limits_and_no_upscale():
    narrow, notes = check_buckets((512, 512), 384, 768, 64, False)
    assert bucket_sizes((512, 512), narrow) == ((384, 640), (448, 576), (512, 512), (576, 448), (640, 384))
    assert crop_for((100, 1000), (512, 512), narrow).target == (384, 640)  # the tallest allowed
    assert notes == []
    moved, notes = check_buckets((512, 512), 300, 1000, 64, False)  # Kohya moves them to multiples of 64
    assert (moved.min_reso, moved.max_reso) == (256, 1024) and len(notes) == 2
    no_upscale = BucketSettings(256, 1024, 64, no_upscale=True)
    small = crop_for((300, 200), (512, 512), no_upscale)  # kept at its size, only the remainder is cut
    assert (small.resized, small.target, small.left, small.top) == ((300, 200), (256, 192), 22, 4)
    large = crop_for((4000, 3000), (512, 512), no_upscale)  # scaled down to the area of 512²
    assert (large.resized, large.target) == ((512, 384), (512, 384))
    with pytest.raises(UserError, match="bucket_reso_steps = 64"):
        crop_for((50, 400), (512, 512), no_upscale)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["dataset.min_bucket_reso=1024", "dataset.max_bucket_reso=512"], "min_bucket_reso = 1024 is above"),
        (
            ["dataset.bucket_reso_steps=60"],
            "'dataset.bucket_reso_steps' = 60 must be a positive multiple of 8",
        ),
        (["dataset.bucket_reso_steps=0"], "'dataset.bucket_reso_steps' = 0 must be a positive multiple of 8"),
        (["dataset.min_bucket_reso=768"], "lower min_bucket_reso to 512 or less"),
        (["dataset.resolution=1024", "dataset.max_bucket_reso=768"], "raise max_bucket_reso to 1024 or more"),
        (["dataset.min_bucket_reso=32"], "set min_bucket_reso to at least 64"),
        (["dataset.enable_bucket=1"], "'dataset.enable_bucket' = 1 must be true or false"),
    ],
)
def test_bad_bucket_keys_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(UserError, match=message) as error:
        load_config(TrainConfig, None, ["dataset.resolution=512", "dataset.enable_bucket=true", *overrides])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "general, message",
    [
        (
            "enable_bucket = true\nbucket_reso_steps = 12",
            "bucket_reso_steps = 12 must be a positive multiple",
        ),
        ("enable_bucket = true\nmin_bucket_reso = 1024", "min_bucket_reso = 1024 is above the resolution"),
        ("min_bucket_reso = 'small'", "min_bucket_reso in \\[general\\] must be int"),
    ],
)
def test_bad_bucket_keys_in_a_dataset_toml(tmp_path, general, message):
    picture((32, 32), 0).save(tmp_path / "a.png")
    (tmp_path / "d.toml").write_text(
        f"[general]\n{general}\n[[datasets]]\n[[datasets.subsets]]\nimage_dir='.'\n"
    )
    with pytest.raises(UserError, match=message) as error:
        scan_images(DataSettings(dataset_config=str(tmp_path / "d.toml")))
    assert "d.toml" in str(error.value) and "\n" not in str(error.value)


def test_dataset_toml_bucket_keys_fall_back_dataset_general_settings(tmp_path):
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        picture((32, 32), 0).save(tmp_path / name / "a.png")
    (tmp_path / "d.toml").write_text(
        """
[general]
enable_bucket = true
min_bucket_reso = 12
resolution = 32
[[datasets]]
bucket_no_upscale = true
  [[datasets.subsets]]
  image_dir = "one"
[[datasets]]
enable_bucket = false
  [[datasets.subsets]]
  image_dir = "two"
"""
    )
    settings = DataSettings(dataset_config=str(tmp_path / "d.toml"), max_bucket_reso=64, bucket_reso_steps=8)
    with pytest.warns(DataWarning, match="min_bucket_reso 12 -> 8"):
        one, two = scan_images(settings)
    assert one.buckets == BucketSettings(min_reso=8, max_reso=64, steps=8, no_upscale=True)
    assert two.buckets is None


# ---------------------------------------------------------------- pictures cut to their bucket


def test_a_portrait_keeps_its_shape_and_loses_little(tmp_path, vae):
    image = Image.new("RGB", (30, 48), GREEN)
    image.paste(RED, (0, 0, 30, 6))  # bands at the top and the bottom that a square cut would lose
    image.paste(BLUE, (0, 42, 30, 48))
    image.save(tmp_path / "portrait.png")
    records = scan_images(DataSettings(image_dir=str(tmp_path), **SMALL))
    data = make_data(records, batch_size=1, vae=vae, latent_sampling="deterministic")
    crop = data.crops[0]
    assert (crop.resized, crop.target, crop.left, crop.top) == ((25, 40), (24, 40), 0, 0)
    assert 1 - (24 * 40) / (25 * 40) < 0.05  # one column of 25 is cut
    pixels, _ = load_training_image(tmp_path / "portrait.png", crop)
    assert pixels.shape == (3, 40, 24)
    top, bottom = pixels[:, 1, 12], pixels[:, 38, 12]
    assert top[0] > 0.9 > top[1] and bottom[2] > 0.9 > bottom[1]  # both bands are kept
    square, _ = load_training_image(tmp_path / "portrait.png", 32)  # without buckets: a centre square
    assert square[1, 1, 16] > 0.9 and square[1, 30, 16] > 0.9  # the bands are gone
    batch = data.batch(0, 0, 1)
    assert batch.latents.shape == (1, 4, 20, 12)  # the bucket's shape, at the VAE's factor 2
    with torch.no_grad():
        expected = vae.encode(pixels[None]).latent_dist.mean * vae.config.scaling_factor
    assert torch.allclose(batch.latents, expected, atol=1e-5)


def test_latent_sampling_flip_and_alpha_weights_per_bucket(tmp_path, vae):
    picture((24, 40), 1, "RGBA").save(tmp_path / "a.png")  # alpha varies: weights at the bucket's size
    picture((40, 24), 2).save(tmp_path / "b.png")
    records = scan_images(DataSettings(image_dir=str(tmp_path), flip_aug=True, **SMALL))
    calls = []
    data = make_data(records, batch_size=1, alpha_loss_weight=True, latent_sampling="random")
    data.cache_latents(vae, device="cpu", dtype=torch.float32, progress=lambda *done: calls.append(done))
    assert calls[-1] == (4, 4)  # two images and their mirror images, over two buckets
    seen = set()
    for step in range(40):
        batch = data.batch(step, 0, 1)
        index, flipped = batch.sample_ids[0], batch.flipped[0]
        shape = (20, 12) if index == 0 else (12, 20)
        assert batch.latents.shape[-2:] == batch.loss_weights.shape[-2:] == shape
        seen.add((index, flipped))
    assert seen == {(0, False), (0, True), (1, False), (1, True)}
    alpha = load_training_image(tmp_path / "a.png", data.crops[0])[1]
    weight = alpha_loss_weight(alpha, (20, 12))
    draws: dict[bool, list[torch.Tensor]] = {False: [], True: []}
    for step in range(40):
        batch = data.batch(step, 0, 1)
        if batch.sample_ids == [0]:
            assert torch.equal(batch.loss_weights[0], weight.flip(-1) if batch.flipped[0] else weight)
            draws[batch.flipped[0]].append(batch.latents)
    assert len(draws[False]) > 1 and not torch.equal(draws[False][0], draws[False][1])  # "random": new draws
    once = make_data(records, batch_size=1, vae=vae, latent_sampling="once")
    first = {}
    for step in range(40):  # "once": one fixed sample per image and mirror image
        batch = once.batch(step, 0, 1)
        key = (batch.sample_ids[0], batch.flipped[0])
        assert torch.equal(first.setdefault(key, batch.latents), batch.latents)


# ---------------------------------------------------------------- batches


def test_every_batch_is_one_bucket_and_every_epoch_shows_each_image_repeats_times(tmp_path):
    records = mixed_dataset(tmp_path)
    data = make_data(records, batch_size=3)
    assert data.bucketed and list(data.buckets) == [(24, 40), (32, 32), (40, 24)]
    assert {k: len(v) for k, v in data.buckets.items()} == {(24, 40): 3, (32, 32): 3, (40, 24): 3}
    # Samples per bucket: 24x40 3 * 3 = 9 (3 batches); 32x32 and 40x24 3 + 2 * 2 = 7 (3 batches, 2 fillers).
    per_epoch = 9
    assert data.epoch_length == per_epoch * 3
    target = {i: c.target for i, c in enumerate(data.crops)}
    for epoch in range(3):
        seen = Counter()
        for step in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            ids = [data.record_at(step, position) for position in range(3)]
            assert len({target[i] for i in ids}) == 1  # one bucket, one latent shape
            seen.update(ids)
        assert all(seen[i] >= record.repeats for i, record in enumerate(records))
        assert sum(seen.values()) - sum(r.repeats for r in records) == 4  # the fillers of two buckets
        for indices in data.buckets.values():  # fillers come from the bucket's own images
            assert sum(seen[i] - records[i].repeats for i in indices) < 3
    orders = [[data.record_at(s, p) for s in range(e * 9, e * 9 + 9) for p in range(3)] for e in range(2)]
    assert orders[0] != orders[1]  # each epoch has its own order


def test_a_bucket_smaller_than_a_batch_wraps_around_its_own_images(tmp_path):
    picture((24, 40), 0).save(tmp_path / "tall.png")
    for i in range(3):
        picture((32, 32), i + 1).save(tmp_path / f"square{i}.png")
    data = make_data(scan_images(DataSettings(image_dir=str(tmp_path), **SMALL)), batch_size=3)
    assert data.epoch_length == 6
    batches = sorted(sorted(data.record_at(step, p) for p in range(3)) for step in range(2))
    assert batches == [[0, 1, 2], [3, 3, 3]]  # the three squares; the one portrait three times


def test_bucket_batches_are_pure_functions_of_seed_step_and_position(tmp_path, vae):
    records = mixed_dataset(tmp_path, flip_aug=True, shuffle_tags=True, tag_dropout=0.2)
    options = dict(batch_size=4, vae=vae, latent_sampling="random", template="subject_filewords")
    one, two = make_data(records, **options), make_data(records, **options)  # two: a restarted run
    steps = [0, 5, 11, 30, 7]
    wanted = {step: one.batch(step, 0, 4) for step in steps}
    for step in reversed(steps):  # asked out of order, and split in two halves (two processes)
        halves = [two.batch(step, 0, 2), two.batch(step, 2, 2)]
        full = wanted[step]
        assert torch.equal(full.latents, torch.cat([h.latents for h in halves]))
        for key in ("prompts", "sample_ids", "flipped", "sizes"):
            assert getattr(full, key) == sum((getattr(h, key) for h in halves), [])
    shapes = {tuple(batch.latents.shape) for batch in wanted.values()}
    assert len(shapes) > 1  # the steps above meet several buckets
    other_seed = make_data(records, seed=8, batch_size=4)
    assert [other_seed.record_at(0, p) for p in range(4)] != wanted[0].sample_ids


# ---------------------------------------------------------------- SDXL size information


def test_sizes_for_uncropped_cropped_and_flipped_pictures(tmp_path, vae):
    folder = tmp_path / "images"
    folder.mkdir()
    picture((24, 40), 0).save(folder / "a_exact.png")  # a bucket's own size: nothing is cut
    picture((30, 48), 1).save(folder / "b_cut.png")  # scaled to 25x40, one column cut
    rotated = picture((40, 24), 2)  # stored on its side; EXIF turns it upright to 24x40
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(folder / "c_turned.png", exif=exif)
    records = scan_images(DataSettings(image_dir=str(folder), flip_aug=True, **SMALL))
    data = make_data(records, batch_size=1, vae=vae)
    # (original h, w, crop top, crop left, target h, w); a flipped picture's left crop is its right margin.
    expected = {
        (0, False): (40, 24, 0, 0, 40, 24),
        (0, True): (40, 24, 0, 0, 40, 24),
        (1, False): (48, 30, 0, 0, 40, 24),
        (1, True): (48, 30, 0, 1, 40, 24),
        (2, False): (40, 24, 0, 0, 40, 24),
        (2, True): (40, 24, 0, 0, 40, 24),
    }
    got = {}
    for step in range(60):
        batch = data.batch(step, 0, 1)
        got[(batch.sample_ids[0], batch.flipped[0])] = batch.sizes[0]
    assert got == expected

    # Without buckets: the single training size. 41x16 is scaled by 1 and cut at 12 (13 on the right).
    plain = tmp_path / "plain"
    plain.mkdir()
    picture((16, 16), 0).save(plain / "a_square.png")
    picture((41, 16), 1).save(plain / "b_wide.png")
    picture((16, 64), 2).save(plain / "c_tall.png")  # 32x128 at 32: 96 rows cut, 48 above
    settings = DataSettings(image_dir=str(plain), resolution=32, flip_aug=True)
    data = make_data(scan_images(settings), batch_size=1, vae=vae, enable_bucket=False, resolution=32)
    assert not data.bucketed
    got = {}
    for step in range(60):
        batch = data.batch(step, 0, 1)
        got[(batch.sample_ids[0], batch.flipped[0])] = batch.sizes[0]
    assert got == {
        (0, False): (16, 16, 0, 0, 32, 32),
        (0, True): (16, 16, 0, 0, 32, 32),
        (1, False): (16, 41, 0, 25, 32, 32),
        (1, True): (16, 41, 0, 25, 32, 32),
        (2, False): (64, 16, 48, 0, 32, 32),
        (2, True): (64, 16, 48, 0, 32, 32),
    }


def test_odd_cut_without_buckets_mirrors_when_flipped():
    crop = crop_for((41, 16), (16, 16), None)
    assert (crop.resized, crop.left) == ((41, 16), 12)
    assert crop.size_ids(False) == (16, 41, 0, 12, 16, 16)
    assert crop.size_ids(True) == (16, 41, 0, 13, 16, 16)


def test_summary_names_the_buckets(tmp_path):
    data = make_data(mixed_dataset(tmp_path), batch_size=3)
    assert data.summary() == (
        "9 images in 2 folder(s), 27 samples per epoch, 32x32, latent sampling once, "
        "3 bucket(s) 24x40: 3 images, 32x32: 3 images, 40x24: 3 images"
    )
    assert data.resolution == (32, 32)  # the base size, which previews use


# ---------------------------------------------------------------- buckets off: as before


def _legacy_dataset(root: Path) -> list:
    spec = {
        "3_sks/a.png": ((40, 24), "RGB"),
        "3_sks/b.png": ((24, 40), "RGB"),
        "3_sks/c.png": ((32, 32), "RGBA"),
        "2_cls/d.png": ((48, 16), "RGB"),
        "2_cls/e.png": ((16, 16), "RGB"),
    }
    for i, (name, (size, mode)) in enumerate(spec.items()):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        picture(size, i, mode).save(root / name)
        (root / name).with_suffix(".txt").write_text(f"sks, tag{i}, red, green, blue")
    settings = DataSettings(
        image_dir=str(root), resolution=16, flip_aug=True, shuffle_tags=True, keep_tokens=1, tag_dropout=0.2
    )
    return scan_images(settings)


def _cache_as_committed(records, vae, seed: int, method: str) -> dict:
    """The latent cache as the code before buckets made it: every (image, flipped) in record order, encoded
    in VAE batches of 4, one "once" draw over them all; (image, flipped) -> (latent or mean, std)."""
    jobs = [(i, flipped) for i, r in enumerate(records) for flipped in (False, True)[: 1 + r.flip_aug]]
    means = []
    with torch.no_grad():
        for first in range(0, len(jobs), 4):
            chunk = jobs[first : first + 4]
            pixels = [load_training_image(records[i].path, 16)[0] for i, _ in chunk]
            pixels = [p.flip(-1) if flipped else p for p, (_, flipped) in zip(pixels, chunk, strict=True)]
            dist = vae.encode(torch.stack(pixels)).latent_dist
            scale = float(vae.config.scaling_factor)
            means.append(((dist.mean.float() - 0.0) * scale, dist.std.float() * scale))
    mean, std = torch.cat([m for m, _ in means]), torch.cat([s for _, s in means])
    if method == "once":
        mean = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))
    return {job: (mean[slot], std[slot]) for slot, job in enumerate(jobs)}


@pytest.mark.parametrize("method", ["once", "deterministic", "random"])
def test_buckets_off_gives_the_same_latents_and_batches_as_before(tmp_path, vae, method):
    records = _legacy_dataset(tmp_path)
    assert all(record.buckets is None for record in records)
    pixels = [
        hashlib.sha256(load_training_image(r.path, 16)[0].numpy().tobytes()).hexdigest()[:16] for r in records
    ]
    # Recorded with the code before buckets (commit ebda06c).
    assert pixels == [
        "ef93b6180d1e9d54",
        "a298dcf03bd8724c",
        "0d44066c6c74a3cf",
        "7876fb9687f4b5dd",
        "39a28798bcfa2402",
    ]
    settings = DataSettings(
        resolution=16, template="subject_filewords", latent_sampling=method, alpha_loss_weight=True
    )
    data = TrainingData(records, settings, name="emb", seed=11, batch_size=3)
    data.cache_latents(vae, device="cpu", dtype=torch.float32, batch_size=4)
    assert data.epoch_length == 13
    assert data.summary() == f"5 images in 2 folder(s), 13 samples per epoch, 16x16, latent sampling {method}"
    batches = [data.batch(step, 0, 3) for step in range(12)]
    steps = [[b.sample_ids, [int(f) for f in b.flipped], b.prompts] for b in batches]
    assert hashlib.sha256(json.dumps(steps).encode()).hexdigest()[:16] == "97ffb1d88d762504"
    assert steps[0][:2] == [[0, 3, 1], [0, 0, 0]] and steps[1][:2] == [[3, 1, 0], [1, 1, 1]]
    cached = _cache_as_committed(records, vae, derive_seed(11, 3), method)
    for step, batch in enumerate(batches):
        for position, (index, flipped) in enumerate(zip(batch.sample_ids, batch.flipped, strict=True)):
            latent, std = cached[(index, flipped)]
            if method == "random":  # a draw seeded with (seed, step, position)
                generator = torch.Generator().manual_seed(derive_seed(11, 2, step, position))
                latent = latent + std * torch.randn(latent.shape, generator=generator)
            assert torch.equal(batch.latents[position], latent)
    alpha = load_training_image(records[4].path, 16)[1]
    weight = alpha_loss_weight(alpha, (8, 8))
    for batch in batches:
        for row, index, flipped in zip(batch.loss_weights, batch.sample_ids, batch.flipped, strict=True):
            wanted = torch.ones(1, 8, 8) if index != 4 else weight.flip(-1) if flipped else weight
            assert torch.equal(row, wanted)


def test_scanning_reads_no_image_when_buckets_are_off(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    records = scan_images(DataSettings(image_dir=str(tmp_path), resolution=16))
    make_data(records, batch_size=1, enable_bucket=False, resolution=16)  # the error comes when caching
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        bucketed = scan_images(DataSettings(image_dir=str(tmp_path), **SMALL))
    with pytest.raises(UserError, match="broken.png"):  # with buckets, when the data is set up
        make_data(bucketed, batch_size=1)


# ---------------------------------------------------------------- end to end


def test_training_with_buckets_runs_on_a_tiny_model(tmp_path):
    from library.training import setup
    from tests.helpers import tiny_checkpoint

    images = tmp_path / "10_sks shape"
    images.mkdir()
    for i, size in enumerate([(24, 40), (24, 40), (40, 24), (40, 24), (32, 32), (36, 30)]):
        picture(size, i).save(images / f"{i}.png")
    overrides = [
        f"model.checkpoint={tiny_checkpoint(tmp_path)}",
        f"dataset.image_dir={tmp_path}",
        *(f"dataset.{key}={str(value).lower()}" for key, value in SMALL.items()),
        "dataset.flip_aug=true",
        "embedding.name=sks",
        "train.max_steps=4",
        "train.batch_size=2",
        "save.save_every_steps=0",
        f"save.output_dir={tmp_path / 'run'}",
    ]
    trainer = setup(load_config(TrainConfig, None, overrides), log=lambda *_: None)
    data = trainer.sources[0]
    assert len(data.buckets) == 3
    assert len({tuple(data.batch(step, 0, 2).latents.shape) for step in range(4)}) > 1  # it meets several
    try:
        final = trainer.train()
    finally:
        trainer.lock.close()
    assert final.is_file()
    rows = (tmp_path / "run" / "loss.csv").read_text().splitlines()
    assert len(rows) == 5  # a header and four steps
