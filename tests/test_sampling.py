"""Sampling (previews, generation) and A1111 infotext, on the tiny models."""

from __future__ import annotations

import copy
import dataclasses
import typing

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler
from PIL import Image

from library.conditioning import Conditioning
from library.errors import UserError
from library.infotext import format_infotext, infotext_params, parse_infotext, save_png
from library.sampling import (
    SAMPLERS,
    build_scheduler,
    decode_images,
    generate,
    initial_noise,
    resolve_seed,
    sample_latents,
)
from library.tables import Sampler, SamplerSettings
from library.tiny import build_tiny_parts

# Small enough for a CPU: the tiny VAE halves the size, so these are 16x12 latents (width x height).
SMALL = SamplerSettings(steps=4, cfg_scale=7.0, width=32, height=24)


class PlainEncoder:
    """Stand-in for library.conditioning.Conditioner: plain token ids through the tiny text encoder."""

    def __init__(self, parts):
        self.parts = parts

    def _encode(self, texts: list[str]) -> Conditioning:
        ids = self.parts.tokenizer(
            texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        return Conditioning(self.parts.text_encoder(ids.to(self.parts.text_encoder.device)).last_hidden_state)

    def encode_pair(self, prompts, negatives):
        return self._encode(prompts), self._encode(negatives)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def run(parts, seeds, settings=SMALL, prompts=None, negatives=None, batch_size=4):
    prompts = prompts or ["a photo of a cat"] * len(seeds)
    negatives = negatives or ["blurry"] * len(seeds)
    return generate(parts, PlainEncoder(parts), prompts, negatives, seeds, settings, batch_size=batch_size)


@pytest.fixture(scope="module")
def tiny_v():
    return build_tiny_parts("sd2-v", seed=0)


# ---------------------------------------------------------------- samplers and seeds


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_gives_finite_images_of_the_requested_size(tiny_sd1, sampler):
    settings = dataclasses.replace(SMALL, sampler=sampler)
    images = run(tiny_sd1, [1, 2], settings)
    assert len(images) == 2
    for image in images:
        assert image.mode == "RGB" and image.size == (32, 24)
        array = pixels(image)
        assert np.isfinite(array).all() and array.std() > 0


@pytest.mark.parametrize("sampler", ["DPM++ 2M Karras", "Euler a"])
def test_an_image_does_not_depend_on_its_batch_mates(tiny_sd1, sampler):
    settings = dataclasses.replace(SMALL, sampler=sampler)
    batch = run(tiny_sd1, [100, 101, 102, 103], settings)
    # Same batch size, other seeds around it, another place in the batch: bitwise the same image.
    others = run(tiny_sd1, [102, 201, 202, 203], settings)
    np.testing.assert_array_equal(pixels(others[0]), pixels(batch[2]))
    # Alone, or in batches of 3 + 1: BLAS picks other kernels for other batch sizes (even the UNet's
    # first Linear differs in the last float bit), so pixels may move by one level, and rarely.
    for alone_or_split in (
        run(tiny_sd1, [102], settings, batch_size=1)[0],
        run(tiny_sd1, [100, 101, 102, 103], settings, batch_size=3)[2],
    ):
        diff = np.abs(pixels(alone_or_split).astype(int) - pixels(batch[2]).astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_a_seed_starts_from_the_same_noise_in_any_batch():
    batch = initial_noise([100, 101, 102, 103], (4, 16, 24), "cpu", torch.float32)
    assert torch.equal(initial_noise([102], (4, 16, 24), "cpu", torch.float32)[0], batch[2])


def test_different_seeds_give_different_images(tiny_sd1):
    first, second = run(tiny_sd1, [7, 8])
    assert np.abs(pixels(first).astype(int) - pixels(second).astype(int)).max() > 0


def test_initial_noise_is_a1111_cpu_noise_per_seed():
    noise = initial_noise([5, 6], (4, 8, 8), "cpu", torch.float16)
    assert noise.shape == (2, 4, 8, 8) and noise.dtype == torch.float16
    # A1111 with "RNG: CPU": torch.randn(shape) from a CPU generator seeded with the image's seed.
    expected = torch.randn((4, 8, 8), generator=torch.Generator("cpu").manual_seed(6))
    assert torch.equal(noise[1], expected.half())
    assert torch.equal(initial_noise([6], (4, 8, 8), "cpu", torch.float32)[0], expected)


def test_dpmpp_2m_karras_is_the_documented_diffusers_scheduler(tiny_sd1):
    scheduler = build_scheduler("DPM++ 2M Karras", tiny_sd1.noise_scheduler.config)
    assert isinstance(scheduler, DPMSolverMultistepScheduler)
    assert scheduler.config.algorithm_type == "dpmsolver++"
    assert scheduler.config.solver_order == 2
    assert scheduler.config.use_karras_sigmas is True
    # The model's noise schedule is kept.
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.beta_end == 0.012
    assert isinstance(
        build_scheduler("Euler a", tiny_sd1.noise_scheduler.config), EulerAncestralDiscreteScheduler
    )


def test_sampling_leaves_the_training_scheduler_alone(tiny_sd1):
    before = dict(tiny_sd1.noise_scheduler.config)
    timesteps = tiny_sd1.noise_scheduler.timesteps.clone()
    run(tiny_sd1, [1])
    assert dict(tiny_sd1.noise_scheduler.config) == before
    assert torch.equal(tiny_sd1.noise_scheduler.timesteps, timesteps)


def test_v_prediction_model_samples_and_uses_its_prediction_type(tiny_v):
    assert build_scheduler("DDIM", tiny_v.noise_scheduler.config).config.prediction_type == "v_prediction"
    images = run(tiny_v, [3])
    assert images[0].size == (32, 24) and pixels(images[0]).std() > 0
    cond, uncond = PlainEncoder(tiny_v).encode_pair(["a cat"], [""])
    config = dict(tiny_v.noise_scheduler.config)
    as_v = sample_latents(tiny_v, cond, uncond, [3], SMALL)
    as_epsilon_model = dataclasses.replace(
        tiny_v, noise_scheduler=DDPMScheduler.from_config(dict(config, prediction_type="epsilon"))
    )
    as_eps = sample_latents(as_epsilon_model, cond, uncond, [3], SMALL)
    assert torch.isfinite(as_v).all() and not torch.allclose(as_v, as_eps)


def test_cfg_scale_changes_the_image(tiny_sd1):
    guided = run(tiny_sd1, [11], dataclasses.replace(SMALL, cfg_scale=7.0))[0]
    plain = run(tiny_sd1, [11], dataclasses.replace(SMALL, cfg_scale=1.0))[0]
    assert np.abs(pixels(guided).astype(int) - pixels(plain).astype(int)).max() > 0


def test_half_precision_unet_samples_close_to_float32(tiny_sd1):
    cond, uncond = PlainEncoder(tiny_sd1).encode_pair(["a cat"], ["blurry"])
    full = sample_latents(tiny_sd1, cond, uncond, [4], SMALL)
    bf16 = dataclasses.replace(tiny_sd1, unet=copy.deepcopy(tiny_sd1.unet).to(torch.bfloat16))
    assert (tiny_sd1.unet_dtype, bf16.unet_dtype) == (tiny_sd1.unet.dtype, bf16.unet.dtype)  # the quick read
    half = sample_latents(bf16, cond.to(torch.bfloat16), uncond.to(torch.bfloat16), [4], SMALL)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert (half - full).abs().mean() < 0.1 * full.abs().mean()


def test_one_encoding_serves_many_seeds_and_progress_is_reported(tiny_sd1):
    cond, uncond = PlainEncoder(tiny_sd1).encode_pair(["a cat"], [""])
    calls = []
    latents = sample_latents(
        tiny_sd1, cond, uncond, [1, 2, 3], SMALL, progress=lambda done, total: calls.append((done, total))
    )
    assert latents.shape == (3, 4, 12, 16)
    assert calls == [(i, SMALL.steps) for i in range(1, SMALL.steps + 1)]
    images = decode_images(tiny_sd1.vae, latents)
    assert [image.size for image in images] == [(32, 24)] * 3


def test_resolve_seed_follows_a1111():
    drawn = {resolve_seed(-1) for _ in range(20)}
    assert len(drawn) > 1
    assert all(0 <= seed < 4294967294 for seed in drawn)
    assert resolve_seed(1234) == 1234 and resolve_seed(0) == 0
    with pytest.raises(UserError, match="-1"):
        resolve_seed(-5)


def test_unknown_sampler_names_the_valid_ones(tiny_sd1):
    with pytest.raises(UserError) as error:
        SamplerSettings(sampler="DPM++ 3M Turbo")
    for name in ("DPM++ 2M Karras", "DPM++ 2M", "Euler a", "Euler", "DDIM"):
        assert name in str(error.value)
    assert set(SAMPLERS) == set(typing.get_args(Sampler))  # the config's names are the sampler table's
    with pytest.raises(UserError, match="Euler a"):
        build_scheduler("euler_a", tiny_sd1.noise_scheduler.config)


def test_bad_sizes_and_counts_are_refused(tiny_sd1):
    with pytest.raises(UserError, match="'width' = 31 must be a multiple of 8"):
        dataclasses.replace(SMALL, width=31)
    with pytest.raises(UserError, match="steps"):
        SamplerSettings(steps=0)
    with pytest.raises(ValueError, match="one prompt, negative and seed"):
        generate(tiny_sd1, PlainEncoder(tiny_sd1), ["a"], ["b"], [1, 2], SMALL)


# ---------------------------------------------------------------- infotext

A1111_DEFAULTS = SamplerSettings(steps=30, cfg_scale=7.0, width=512, height=512)  # FACTS §4's example
FACTS_EXAMPLE = (
    "<prompt>\nNegative prompt: <negative>\nSteps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, "
    "Seed: 4240233169, Size: 512x512, Model hash: 9aba26abdf, Model: deliberate_v2"
)


def test_infotext_matches_a1111_layout():
    params = {
        "Steps": 30,
        "Sampler": "DPM++ 2M Karras",
        "CFG scale": 7,
        "Seed": 4240233169,
        "Size": "512x512",
        "Model hash": "9aba26abdf",
        "Model": "deliberate_v2",
    }
    assert format_infotext("<prompt>", "<negative>", params) == FACTS_EXAMPLE


def test_infotext_params_from_settings_and_model():
    model = {"checkpoint_name": "deliberate_v2", "checkpoint_hash": "9aba26abdf"}
    params = infotext_params(A1111_DEFAULTS, 4240233169, model, {"TI hashes": "sks: 0123abcd"})
    assert list(params)[:7] == ["Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash", "Model"]
    text = format_infotext("<prompt>", "<negative>", params)
    assert text.startswith(FACTS_EXAMPLE + ", ")
    assert text.endswith(', RNG: CPU, TI hashes: "sks: 0123abcd"')
    # A fractional CFG keeps its decimals; an unknown hash is left out.
    unhashed = {"checkpoint_name": "tiny-sd1", "checkpoint_hash": ""}
    params = infotext_params(dataclasses.replace(A1111_DEFAULTS, cfg_scale=7.5), 1, unhashed)
    assert params["CFG scale"] == 7.5 and "Model hash" not in params and params["Model"] == "tiny-sd1"


def test_infotext_params_take_sdparts(tiny_sd1):
    params = infotext_params(SMALL, 5, tiny_sd1)
    assert params["Model"] == "tiny-sd1" and params["Size"] == "32x24" and params["Seed"] == 5


def test_values_with_commas_colons_or_quotes_are_quoted():
    text = format_infotext("p", "", {"Steps": 20, "Model": "my, model", "Note": "a: b", "Quote": 'say "hi"'})
    assert text == 'p\nSteps: 20, Model: "my, model", Note: "a: b", Quote: "say \\"hi\\""'
    assert parse_infotext(text)[2] == {
        "Steps": "20",
        "Model": "my, model",
        "Note": "a: b",
        "Quote": 'say "hi"',
    }


def test_empty_negative_leaves_out_its_line():
    text = format_infotext("a cat", "", {"Steps": 20, "Sampler": "Euler", "Seed": 1, "Extra": None})
    assert text == "a cat\nSteps: 20, Sampler: Euler, Seed: 1"


def test_infotext_round_trips():
    params = infotext_params(SMALL, 4240233169, {"checkpoint_name": "v1-5, pruned", "checkpoint_hash": "abc"})
    prompt = "a photo of sks woman,\n(smiling:1.2), outdoors"
    for negative in ["", "blurry, lowres\ntext: watermark"]:
        got_prompt, got_negative, got_params = parse_infotext(format_infotext(prompt, negative, params))
        assert got_prompt == prompt and got_negative == negative
        assert got_params == {key: str(value) for key, value in params.items()}


def test_parses_an_a1111_infotext():
    text = (
        "girl with a beret, ((eyeshadow)), detailed\n"
        "Negative prompt: ugly, [blurry]\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
    )
    prompt, negative, params = parse_infotext(text)
    assert prompt == "girl with a beret, ((eyeshadow)), detailed"
    assert negative == "ugly, [blurry]"
    assert params == {
        "Steps": "20",
        "Sampler": "Euler a",
        "CFG scale": "7",
        "Seed": "965400086",
        "Size": "512x512",
        "Model hash": "45dee52b",
    }
    # A last line with fewer than three entries is part of the prompt.
    assert parse_infotext("a cat\nstyle: oil") == ("a cat\nstyle: oil", "", {})


def test_saved_png_carries_parameters_and_is_not_overwritten(tmp_path, tiny_sd1):
    image = run(tiny_sd1, [9])[0]
    text = format_infotext("a cat — ünïcode", "", infotext_params(SMALL, 9, tiny_sd1))
    path = save_png(image, tmp_path / "00000-9.png", text)
    with Image.open(path) as saved:
        assert saved.format == "PNG"
        assert saved.text["parameters"] == text
        np.testing.assert_array_equal(np.asarray(saved), pixels(image))
    with pytest.raises(UserError, match="already exists"):
        save_png(image, path, "other")
    save_png(image, path, "other", overwrite=True)
    with Image.open(path) as saved:
        assert saved.text["parameters"] == "other"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000-9.png"]
