"""Loading SDXL offline: original (SGM) single files, diffusers folders and separate VAEs, checked bitwise
against diffusers' own single-file loader, and writing them back."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import accelerate
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library import convert
from library.conditioning import Conditioner
from library.convert import save_diffusers, save_single_file, to_ldm_state_dict, vae_to_ldm
from library.errors import UserError
from library.families import ASSETS, FAMILIES
from library.models import load_parts, load_sd
from library.parts import SDParts
from library.tiny import build_tiny_parts, tiny_vae_config

pytestmark = pytest.mark.usefixtures("one_thread")

L, G = "conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."


@pytest.fixture(scope="module")
def tiny() -> SDParts:
    """The tiny SDXL built in code (read-only)."""
    return build_tiny_parts("sdxl", seed=0)


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory) -> SimpleNamespace:
    """The tiny SDXL written once in each form the tests read: float32 single files and a diffusers folder."""
    folder = tmp_path_factory.mktemp("sdxl")
    return SimpleNamespace(
        safetensors=save_single_file(tiny, folder / "tiny-xl.safetensors", dtype=torch.float32),
        ckpt=save_single_file(tiny, folder / "tiny-xl.ckpt", dtype=torch.float32),
        diffusers=save_diffusers(tiny, folder / "tiny-xl-diffusers"),
        ldm={k: v.contiguous() for k, v in to_ldm_state_dict(tiny).items()},
        tmp=folder,
    )


def assert_same_weights(expected: SDParts, got: SDParts) -> None:
    """Every tensor of the UNet, the VAE and both text encoders is equal, under the same keys."""
    pairs = [("unet", expected.unet, got.unet), ("vae", expected.vae, got.vae)]
    pairs += [(key, expected.text_encoders[key], got.text_encoders[key]) for key in expected.family.keys]
    for name, want_module, have_module in pairs:
        want, have = want_module.state_dict(), have_module.state_dict()
        assert want.keys() == have.keys(), f"{name}: {sorted(set(want) ^ set(have))[:5]}"
        differing = [k for k in want if not torch.equal(want[k], have[k])]
        assert not differing, f"{name}: {differing[:5]}"


def one_line_error(call, *args, match: str, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def unet_output(parts: SDParts) -> torch.Tensor:
    """The UNet on a fixed input, with SDXL's pooled vector and size ids."""
    generator = torch.Generator().manual_seed(0)
    config = parts.unet.config
    latent = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 7, config.cross_attention_dim, generator=generator)
    pooled = torch.randn(2, parts.text_encoders["clip_g"].config.projection_dim, generator=generator)
    sizes = torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)
    extra = {"text_embeds": pooled, "time_ids": sizes}
    with torch.no_grad():
        return parts.unet(latent, torch.tensor([10, 900]), context, added_cond_kwargs=extra).sample


# --------------------------------------------------------------------------------------------------
# Against diffusers' own loader


def test_single_file_loads_bitwise_as_diffusers_own_single_file_loader(tiny, files, tmp_path):
    # diffusers needs the configs (offline: a local folder, FACTS §5); it gets no weights from it.
    configs = tmp_path / "configs"
    shutil.copytree(files.diffusers, configs)
    for weights in configs.rglob("*.safetensors"):
        weights.unlink()
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(files.safetensors), config=str(configs), local_files_only=True
    )
    theirs = SDParts.of(
        "sdxl", [pipe.text_encoder, pipe.text_encoder_2], pipe.unet, pipe.vae, name="diffusers"
    )
    ours = load_sd(files.safetensors)

    assert_same_weights(theirs, ours)
    assert_same_weights(tiny, ours)
    assert torch.equal(unet_output(ours), unet_output(theirs))


# --------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("form", ["safetensors", "ckpt", "diffusers"])
def test_round_trip_is_bitwise(tiny, files, form):
    loaded = load_sd(getattr(files, form))

    assert loaded.family.name == "sdxl" and loaded.prediction_type == "epsilon"
    assert_same_weights(tiny, loaded)
    assert torch.equal(unet_output(loaded), unet_output(tiny))
    assert isinstance(loaded.text_encoders["clip_l"], CLIPTextModel)
    assert isinstance(loaded.text_encoders["clip_g"], CLIPTextModelWithProjection)
    assert loaded.tokenizer("a photo of a woman").input_ids == [49406, 320, 1125, 539, 320, 2308, 49407]
    assert loaded.vae.config.scaling_factor == 0.13025
    for module in loaded.modules:
        assert not module.training and not any(p.requires_grad for p in module.parameters())


def test_single_file_has_the_original_layout_and_loads_in_the_asked_dtype(tiny, tmp_path):
    path = save_single_file(tiny, tmp_path / "half.safetensors")  # fp16, as checkpoints are shared
    with safe_open(str(path), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        projection = f.get_tensor(f"{G}text_projection")
        in_proj = f.get_tensor(f"{G}transformer.resblocks.2.attn.in_proj_weight")
    assert {
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.label_emb.0.2.bias",
        "model.diffusion_model.input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight",
        "first_stage_model.decoder.up.0.block.0.conv1.weight",
        f"{L}embeddings.token_embedding.weight",
        f"{L}encoder.layers.1.mlp.fc2.bias",
        f"{G}positional_embedding",
        f"{G}ln_final.weight",
    } <= keys
    assert not any(k.startswith(("cond_stage_model.", f"{G}transformer.resblocks.3.")) for k in keys)
    # bigG keeps all three layers; OpenCLIP multiplies `x @ text_projection`: the Linear weight transposed.
    assert in_proj.shape == (3 * 48, 48)
    weight = tiny.text_encoders["clip_g"].text_projection.weight
    assert torch.equal(projection, weight.T.half())
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"

    loaded = load_sd(path, dtype=torch.float16)
    assert all(
        p.dtype == torch.float16 for m in loaded.modules if m is not loaded.vae for p in m.parameters()
    )
    assert all(p.dtype == torch.float32 for p in loaded.vae.parameters())  # as A1111's --no-half-vae
    want = tiny.text_encoders["clip_g"].state_dict()
    assert all(torch.equal(v, want[k].half()) for k, v in loaded.text_encoders["clip_g"].state_dict().items())


def test_a_file_from_another_tool_loads_with_sizes_read_from_the_weights(tiny, files, tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file(files.ldm, path)  # no metadata of ours: heads fall back to 64-wide ones, the rest is read
    loaded = load_sd(path)
    unet = loaded.unet.config
    clip_l, clip_g = (loaded.text_encoders[k].config for k in ("clip_l", "clip_g"))

    assert loaded.family.name == "sdxl"
    assert list(unet.block_out_channels) == [32, 64] and list(unet.transformer_layers_per_block) == [1, 2]
    assert list(unet.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D"]
    assert (unet.cross_attention_dim, unet.addition_time_embed_dim) == (80, 8)
    assert unet.projection_class_embeddings_input_dim == 96
    assert (clip_l.hidden_size, clip_l.num_hidden_layers, clip_l.hidden_act) == (32, 2, "quick_gelu")
    assert (clip_g.hidden_size, clip_g.num_hidden_layers, clip_g.projection_dim) == (48, 3, 48)
    assert clip_g.hidden_act == "gelu"
    assert_same_weights(tiny, loaded)


def test_single_file_encoders_give_the_built_ones_conditioning(tiny, files):
    prompts = ["a photo of a woman", "a (red:1.3) cat, " + "very detailed, " * 30]
    built = Conditioner.of(tiny).encode(prompts)
    loaded = Conditioner.of(load_sd(files.safetensors)).encode(prompts)
    assert built.context.shape == (2, 154, 80) and built.pooled.shape == (2, 48)
    assert torch.equal(loaded.context, built.context)
    assert torch.equal(loaded.pooled, built.pooled)


def test_diffusers_folder_is_an_sdxl_pipeline_that_runs(tiny, files):
    index = json.loads((files.diffusers / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    for name in ("tokenizer", "tokenizer_2"):
        assert {"vocab.json", "merges.txt"} <= {f.name for f in (files.diffusers / name).iterdir()}
    for name in ("text_encoder", "text_encoder_2"):
        with safe_open(str(files.diffusers / name / "model.safetensors"), framework="pt") as f:
            assert all(k.startswith(("text_model.", "text_projection.")) for k in f.keys())

    pipe = StableDiffusionXLPipeline.from_pretrained(files.diffusers, local_files_only=True)
    assert torch.equal(
        pipe.text_encoder_2.text_projection.weight, tiny.text_encoders["clip_g"].text_projection.weight
    )
    assert pipe.tokenizer_2.pad_token == "!"  # bigG pads with id 0 (FACTS §9)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_pipeline_shares_the_parts_modules(tiny):
    pipe = tiny.pipeline()
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert pipe.text_encoder is tiny.text_encoders["clip_l"]
    assert pipe.text_encoder_2 is tiny.text_encoders["clip_g"]
    assert (pipe.unet, pipe.vae, pipe.tokenizer) == (tiny.unet, tiny.vae, tiny.tokenizer)
    # Its own second tokenizer, so each encoder can take its own new tokens (diffusers' load_textual_inversion).
    assert pipe.tokenizer_2 is not tiny.tokenizer and pipe.tokenizer.pad_token == "<|endoftext|>"


# --------------------------------------------------------------------------------------------------
# Separate VAE and the [model] table


@pytest.fixture(scope="module")
def other_vae() -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(**tiny_vae_config("sdxl")).eval()


@pytest.mark.parametrize("kind", ["a1111", "diffusers_file", "diffusers_folder"])
def test_separate_vae_replaces_the_checkpoints(tiny, files, other_vae, tmp_path, kind):
    if kind == "a1111":  # as sdxl_vae.safetensors: original keys without first_stage_model.
        vae = tmp_path / "sdxl_vae.safetensors"
        ldm = vae_to_ldm(other_vae.state_dict(), levels=len(other_vae.config.block_out_channels))
        save_file({k: v.contiguous() for k, v in ldm.items()}, vae)
    elif kind == "diffusers_file":
        vae = tmp_path / "diffusion_pytorch_model.safetensors"
        save_file(dict(other_vae.state_dict()), vae)
    else:
        vae = tmp_path / "vae_folder"
        other_vae.save_pretrained(vae)
    for model in (files.safetensors, files.diffusers):
        loaded = load_sd(model, vae=vae)
        want = other_vae.state_dict()
        assert all(torch.equal(v, want[k]) for k, v in loaded.vae.state_dict().items())
        assert loaded.vae.config.scaling_factor == 0.13025
        assert torch.equal(loaded.unet.conv_in.weight, tiny.unet.conv_in.weight)


def test_load_parts_reads_sdxl_model_tables(tiny, files):
    table = SimpleNamespace(checkpoint=str(files.safetensors), family="sdxl", vae="", config_dir="")
    parts = load_parts(table, precision="bf16")
    assert parts.family.name == "sdxl" and parts.unet.dtype == torch.bfloat16
    assert parts.text_encoders["clip_g"].dtype == torch.bfloat16

    builtin = load_parts(SimpleNamespace(checkpoint="builtin:tiny", family="sdxl", vae="", config_dir=""))
    assert builtin.family.name == "sdxl"
    assert_same_weights(tiny, builtin)


def test_config_dir_is_used_as_is(tiny, files, tmp_path):
    configs = tmp_path / "configs"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        shutil.copytree(
            files.diffusers / name, configs / name, ignore=shutil.ignore_patterns("*.safetensors")
        )
    foreign = tmp_path / "foreign.safetensors"
    save_file(files.ldm, foreign)
    loaded = load_sd(foreign, config_dir=configs)
    assert loaded.text_encoders["clip_g"].config.num_attention_heads == 4  # the tiny's, not 48 // 64
    assert torch.equal(unet_output(loaded), unet_output(tiny))
    shutil.rmtree(configs / "text_encoder_2")
    one_line_error(load_sd, foreign, config_dir=configs, match=r"text_encoder_2/config.json: missing")


# --------------------------------------------------------------------------------------------------
# Family detection and bad input


@pytest.mark.parametrize("family", ["sd1", "sd2", "sd2-v"])
def test_an_sdxl_model_given_another_family_is_named(files, family):
    message = one_line_error(
        load_sd, files.safetensors, family=family, match=f"tiny-xl.safetensors: family={family} does not fit"
    )
    assert "an SDXL checkpoint" in message and message.endswith("use auto or sdxl")
    one_line_error(
        load_sd,
        files.diffusers,
        family=family,
        match=f"tiny-xl-diffusers: family={family} does not fit this SDXL",
    )


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_an_sd1_or_sd2_model_given_sdxl_is_named(family, tmp_path):
    parts = build_tiny_parts(family, seed=0)
    path = save_single_file(parts, tmp_path / f"{family}.safetensors")
    title = "an SD 1.x checkpoint" if family == "sd1" else "an SD 2.x checkpoint"
    message = one_line_error(
        load_sd, path, family="sdxl", match=f"{family}.safetensors: family=sdxl does not fit"
    )
    assert title in message and "use auto or" in message
    assert load_sd(path).family.name == family  # auto still tells them apart
    folder = save_diffusers(parts, tmp_path / f"{family}-folder")
    one_line_error(
        load_sd, folder, family="sdxl", match=f"{family}-folder: family=sdxl does not fit this SD 1.x/2.x"
    )


def _without(sd: dict, *prefixes: str) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith(prefixes)}


BAD_FILES = {
    "no_bigg": (
        lambda sd: _without(sd, G),
        "is an SDXL checkpoint without its OpenCLIP bigG text encoder",
    ),
    "no_clip_l": (
        lambda sd: _without(sd, "conditioner.embedders.0."),
        "is an SDXL checkpoint without its CLIP ViT-L text encoder",
    ),
    "bigg_block_missing": (
        lambda sd: _without(sd, f"{G}transformer.resblocks.1."),
        "the bigG text encoder weights do not fit",
    ),
    "no_projection": (lambda sd: _without(sd, f"{G}text_projection"), "incomplete or unusual SD weights"),
    "odd_label_emb": (
        lambda sd: {**sd, "model.diffusion_model.label_emb.0.0.weight": torch.ones(256, 95)},
        "incomplete or unusual SD weights",
    ),
    "refiner": (
        lambda sd: {k.replace("embedders.1.", "embedders.0."): v for k, v in _without(sd, L).items()},
        "is an SDXL refiner",
    ),
    "v_pred": (lambda sd: {**sd, "v_pred": torch.tensor([])}, "is an SDXL v-prediction model"),
    "inpainting": (
        lambda sd: {**sd, "model.diffusion_model.input_blocks.0.0.weight": torch.ones(32, 9, 3, 3)},
        "is an inpainting model",
    ),
    "no_vae": (lambda sd: _without(sd, "first_stage_model."), "holds no VAE"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_sdxl_files_are_one_clear_line(files, tmp_path, case):
    damage, message = BAD_FILES[case]
    path = tmp_path / f"{case}.safetensors"
    save_file(damage(dict(files.ldm)), path)
    one_line_error(load_sd, path, match=f"{case}.safetensors: {message}")


def test_truncated_files_and_missing_weights_are_one_clear_line(files, tmp_path):
    for source in (files.safetensors, files.ckpt):
        data = source.read_bytes()
        cut = tmp_path / f"cut{source.suffix}"
        cut.write_bytes(data[: len(data) // 2])
        one_line_error(load_sd, cut, match=f"cut{source.suffix}: not a readable")
    folder = shutil.copytree(files.diffusers, tmp_path / "folder")
    weights = folder / "text_encoder_2" / "model.safetensors"
    kept = {k: v for k, v in load_file(weights).items() if k != "text_projection.weight"}
    save_file(kept, weights, metadata={"format": "pt"})
    one_line_error(
        load_sd,
        folder,
        match=r"text_encoder_2: cannot load the CLIPTextModelWithProjection \(1 of its weights missing",
    )
    weights.unlink()
    one_line_error(load_sd, folder, match="text_encoder_2: cannot load the CLIPTextModelWithProjection")


# --------------------------------------------------------------------------------------------------
# The shipped configs are the real SDXL's


def _meta_models() -> tuple[dict, SimpleNamespace]:
    """Full-size SDXL built from the shipped configs on the meta device (no memory)."""
    folder = ASSETS / "configs" / "sdxl"
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    configs = {name: json.loads((folder / name / "config.json").read_text()) for name in names}
    with accelerate.init_empty_weights():
        models = SimpleNamespace(
            family=FAMILIES["sdxl"],
            unet=UNet2DConditionModel.from_config(configs["unet"]),
            vae=AutoencoderKL.from_config(configs["vae"]),
            text_encoders={
                "clip_l": CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])),
                "clip_g": CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder_2"])),
            },
        )
    return configs, models


def test_shipped_configs_build_the_real_sdxl_sizes():
    configs, models = _meta_models()
    modules = (models.unet, models.vae, *models.text_encoders.values())
    # stabilityai/stable-diffusion-xl-base-1.0: UNet 2.57 G, VAE 83.7 M, CLIP-L 123 M, bigG with projection 695 M.
    assert tuple(sum(p.numel() for p in m.parameters()) for m in modules) == (
        2_567_463_684,
        83_653_863,
        123_060_480,
        694_659_840,
    )
    assert configs["vae"]["scaling_factor"] == 0.13025 and configs["vae"]["force_upcast"]


def test_full_size_sdxl_layout_round_trips_on_the_meta_device():
    configs, models = _meta_models()
    sd = to_ldm_state_dict(models)
    # Keys and shapes every SDXL base file (and Pony, Illustrious, NoobAI) has.
    shapes = {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        f"{L}encoder.layers.11.mlp.fc1.weight": (3072, 768),
        f"{G}transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        f"{G}text_projection": (1280, 1280),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    }
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert not any(
        ".input_blocks.1.1." in k or ".input_blocks.2.1." in k for k in sd
    )  # no attention at 128 px

    unet_config = convert.unet_config_from_ldm(sd, configs["unet"])
    config_l, config_g = convert.sdxl_text_configs_from_ldm(
        sd, configs["text_encoder"], configs["text_encoder_2"]
    )
    vae_sd = {
        k.removeprefix("first_stage_model."): v for k, v in sd.items() if k.startswith("first_stage_model.")
    }
    assert unet_config == configs["unet"]
    assert (config_l, config_g) == (configs["text_encoder"], configs["text_encoder_2"])
    assert convert.vae_config_from_ldm(vae_sd, configs["vae"]) == configs["vae"]
    state_l, state_g = convert.sdxl_text_from_ldm(sd, config_l, config_g)
    for module, state in (
        (models.unet, convert.unet_from_ldm(sd, unet_config)),
        (models.vae, convert.vae_from_ldm(vae_sd, configs["vae"])),
        (models.text_encoders["clip_l"], state_l),
        (models.text_encoders["clip_g"], state_g),
    ):
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in module.state_dict().items()}
