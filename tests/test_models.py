"""Loading checkpoints offline (single files, diffusers folders, separate VAEs) and writing them back."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import accelerate
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from library import convert
from library.convert import save_diffusers, save_single_file, to_ldm_state_dict, vae_to_ldm
from library.errors import UserError
from library.families import ASSETS, FAMILIES
from library.models import a1111_short_hash, is_v_prediction, load_parts, load_sd
from library.parts import SDParts
from library.tiny import build_tiny_parts, tiny_vae_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    """One tiny model per family, shared by the tests of this file (read-only)."""
    return {family: build_tiny_parts(family, seed=0) for family in ("sd1", "sd2", "sd2-v")}


def assert_same_weights(expected: SDParts, got: SDParts) -> None:
    for name in ("unet", "vae", "text_encoder"):
        want, have = getattr(expected, name).state_dict(), getattr(got, name).state_dict()
        assert want.keys() == have.keys(), name
        differing = [k for k in want if not torch.equal(want[k], have[k])]
        assert not differing, f"{name}: {differing[:5]}"


def unet_output(parts: SDParts) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 7, parts.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return parts.unet(latent, torch.tensor([10, 900]), encoder_hidden_states=context).sample


def text_output(parts: SDParts) -> torch.Tensor:
    ids = parts.tokenizer("a photo of a woman", padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        return parts.text_encoder(ids).last_hidden_state


def write_foreign(parts: SDParts, path: Path) -> Path:
    """The model in original layout as another tool writes it: no metadata of ours."""
    save_file({k: v.contiguous() for k, v in to_ldm_state_dict(parts).items()}, path)
    return path


# --------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("family", ["sd1", "sd2", "sd2-v"])
def test_single_file_round_trip_is_bitwise(tiny, tmp_path, family, suffix):
    parts = tiny[family]
    path = save_single_file(parts, tmp_path / f"my-model{suffix}", dtype=torch.float32)
    loaded = load_sd(path, family="sd2-v" if family == "sd2-v" else "auto")

    assert loaded.family.name == family
    assert loaded.prediction_type == parts.prediction_type
    assert_same_weights(parts, loaded)
    assert torch.equal(unet_output(loaded), unet_output(parts))
    assert torch.equal(text_output(loaded), text_output(parts))
    assert loaded.checkpoint_name == "my-model"
    assert loaded.checkpoint_hash == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    for module in (loaded.unet, loaded.vae, loaded.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())


def test_sd2_v_is_recognised_from_the_files_metadata(tiny, tmp_path):
    path = save_single_file(tiny["sd2-v"], tmp_path / "v.safetensors")
    assert load_sd(path).family.name == "sd2-v"


def test_fp16_file_has_original_layout_and_loads_in_the_asked_dtype(tiny, tmp_path):
    parts = tiny["sd2"]
    path = save_single_file(parts, tmp_path / "half.safetensors")  # fp16 by default
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        metadata = f.metadata()
        assert f.get_tensor("model.diffusion_model.input_blocks.0.0.weight").dtype == torch.float16
        in_proj = f.get_tensor("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight")
        unused_block = f.get_tensor("cond_stage_model.model.transformer.resblocks.2.mlp.c_fc.weight")
        projection = f.get_tensor("cond_stage_model.model.text_projection")
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert "cond_stage_model.model.positional_embedding" in keys
    width = parts.text_encoder.config.hidden_size
    assert in_proj.shape == (3 * width, width)
    # The two-layer encoder is written as a three-block OpenCLIP tower whose last block (unused by SD2) is zero.
    assert not unused_block.any() and not any(
        k.startswith("cond_stage_model.model.transformer.resblocks.3.") for k in keys
    )
    assert torch.equal(projection, torch.eye(width, dtype=torch.float16))
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-512"
    assert metadata["modelspec.prediction_type"] == "epsilon"

    loaded = load_sd(path, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in loaded.unet.parameters())
    want = parts.unet.state_dict()
    assert all(torch.equal(v, want[k].half()) for k, v in loaded.unet.state_dict().items())


def test_sd1_file_uses_clip_keys(tiny, tmp_path):
    path = save_single_file(tiny["sd1"], tmp_path / "one.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight" in keys
    assert not any(k.startswith("cond_stage_model.model.") for k in keys)


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_diffusers_folder_round_trip_is_bitwise(tiny, tmp_path, family):
    parts = tiny[family]
    folder = save_diffusers(parts, tmp_path / "model")
    loaded = load_sd(folder)

    assert loaded.family.name == family
    assert_same_weights(parts, loaded)
    assert torch.equal(unet_output(loaded), unet_output(parts))
    assert (loaded.checkpoint_name, loaded.checkpoint_hash) == ("model", "")
    assert {"vocab.json", "merges.txt"} <= {f.name for f in (folder / "tokenizer").iterdir()}
    assert loaded.tokenizer("a photo of a woman").input_ids == [49406, 320, 1125, 539, 320, 2308, 49407]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    with safe_open(str(folder / "text_encoder" / "model.safetensors"), framework="pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())  # the layout every transformers reads


def test_diffusers_pipeline_runs_from_a_saved_folder(tiny, tmp_path):
    parts = tiny["sd1"]
    folder = save_diffusers(parts, tmp_path / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    assert torch.equal(pipe.unet.conv_in.weight, parts.unet.conv_in.weight)
    assert torch.equal(
        pipe.text_encoder.get_input_embeddings().weight, parts.text_encoder.get_input_embeddings().weight
    )
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_a_file_from_another_tool_loads_with_sizes_read_from_the_weights(tiny, tmp_path):
    parts = tiny["sd1"]
    loaded = load_sd(write_foreign(parts, tmp_path / "foreign.safetensors"))
    assert loaded.family.name == "sd1"
    assert list(loaded.unet.config.block_out_channels) == [32, 64]
    assert loaded.text_encoder.config.num_hidden_layers == 2
    assert_same_weights(parts, loaded)
    # SD1 keeps 8 attention heads at every width, as the tiny model does, so even the output is the same.
    assert torch.equal(unet_output(loaded), unet_output(parts))


def test_config_dir_overrides_the_shipped_configs(tiny, tmp_path):
    parts = tiny["sd2"]
    configs = tmp_path / "configs"
    parts.unet.save_config(configs / "unet")
    parts.vae.save_config(configs / "vae")
    parts.text_encoder.config.save_pretrained(configs / "text_encoder")
    loaded = load_sd(write_foreign(parts, tmp_path / "m.safetensors"), family="sd2", config_dir=configs)
    assert list(loaded.unet.config.attention_head_dim) == [2, 4]
    assert torch.equal(unet_output(loaded), unet_output(parts))


def test_load_parts_reads_a_model_config_table(tiny, tmp_path):
    path = save_single_file(tiny["sd1"], tmp_path / "cfg.safetensors")
    table = SimpleNamespace(checkpoint=str(path), family="auto", vae="", config_dir="")
    parts = load_parts(table, precision="bf16")
    assert parts.family.name == "sd1" and parts.unet.dtype == torch.bfloat16


def test_under_fp16_a_float32_vae_keeps_its_weights(tiny, tmp_path):
    """--no-half-vae: under fp16 the VAE runs in float32 with the file's own float32 weights, never rounded to
    fp16 on the way (a checkpoint's, or a separate VAE file such as vae-ft-mse-840000, which is float32)."""
    path = save_single_file(tiny["sd1"], tmp_path / "m.safetensors", dtype=torch.float32)
    vae_file = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in _a1111_vae_dict(tiny["sd1"].vae).items()}, vae_file)
    want = tiny["sd1"].vae.state_dict()
    for vae in ("", str(vae_file)):
        table = SimpleNamespace(checkpoint=str(path), family="auto", vae=vae, config_dir="")
        parts = load_parts(table, precision="fp16")
        assert parts.unet.dtype == torch.float16
        got = parts.vae.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), vae


def test_load_parts_puts_a_single_files_weights_on_the_device_it_is_given(tiny, tmp_path):
    """Each weight goes to the device as it is in the file and is cast there (here the meta device: no
    memory, so nothing can have stayed behind on the CPU); under fp16 the VAE is float32 (--no-half-vae)."""
    path = save_single_file(tiny["sd1"], tmp_path / "cfg.safetensors")
    table = SimpleNamespace(checkpoint=str(path), family="auto", vae="", config_dir="")
    parts = load_parts(table, precision="fp16", device="meta")
    for name, module in (("unet", parts.unet), ("text encoder", parts.text_encoder), ("vae", parts.vae)):
        tensors = [*module.parameters(), *module.buffers()]
        assert {t.device.type for t in tensors} == {"meta"}, name
    assert {p.dtype for p in parts.unet.parameters()} == {torch.float16}
    assert {p.dtype for p in parts.vae.parameters()} == {torch.float32}


# --------------------------------------------------------------------------------------------------
# Family detection


def test_sd1_and_sd2_are_told_apart_by_the_text_encoder(tiny, tmp_path):
    assert load_sd(write_foreign(tiny["sd1"], tmp_path / "a.safetensors")).family.name == "sd1"
    assert load_sd(write_foreign(tiny["sd2"], tmp_path / "b.safetensors")).family.name == "sd2"


def _sd2_with_output(tiny, value: float) -> SDParts:
    """A tiny SD2 model whose UNet outputs `value` everywhere (conv_out weight 0, bias `value`)."""
    parts = copy.deepcopy(tiny["sd2"])
    parts.unet.conv_out.weight.zero_()
    parts.unet.conv_out.bias.fill_(value)
    return parts


def test_v_prediction_is_detected_as_a1111_does(tiny, tmp_path):
    # A1111: (unet(x) - x).mean() < -1 with x = 0.5 -> v. Output -5 gives -5.5, output 0 gives -0.5.
    v_model, eps_model = _sd2_with_output(tiny, -5.0), _sd2_with_output(tiny, 0.0)
    assert is_v_prediction(v_model.unet) and not is_v_prediction(eps_model.unet)

    loaded = load_sd(write_foreign(v_model, tmp_path / "v.safetensors"))
    assert loaded.family.name == "sd2-v" and loaded.prediction_type == "v_prediction"
    assert loaded.unet.config.sample_size == 96  # the 768-px SD2 model's latent size
    assert_same_weights(v_model, loaded)
    assert load_sd(write_foreign(eps_model, tmp_path / "eps.safetensors")).family.name == "sd2"
    assert load_sd(tmp_path / "v.safetensors", family="sd2").family.name == "sd2"  # the override wins


def test_detection_runs_in_float32_even_for_half_weights(tiny, tmp_path):
    loaded = load_sd(
        write_foreign(_sd2_with_output(tiny, -5.0), tmp_path / "v.safetensors"), dtype=torch.float16
    )
    assert loaded.family.name == "sd2-v" and loaded.unet.dtype == torch.float16


def test_yaml_beside_the_file_decides_as_in_a1111(tiny, tmp_path):
    path = write_foreign(_sd2_with_output(tiny, 0.0), tmp_path / "wd15.safetensors")
    (tmp_path / "wd15.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert load_sd(path).family.name == "sd2-v"


def test_family_override_must_fit_the_text_encoder(tiny, tmp_path):
    path = write_foreign(tiny["sd1"], tmp_path / "sd1model.safetensors")
    with pytest.raises(UserError, match="sd1model.safetensors: family=sd2 does not fit"):
        load_sd(path, family="sd2")


# --------------------------------------------------------------------------------------------------
# Separate VAE


@pytest.fixture(scope="module")
def other_vae():
    torch.manual_seed(1)
    return AutoencoderKL(**tiny_vae_config()).eval()


def _a1111_vae_dict(vae: AutoencoderKL) -> dict:
    """An A1111-style VAE file's tensors: original keys without `first_stage_model.`."""
    return vae_to_ldm(vae.state_dict(), levels=len(vae.config.block_out_channels))


def _assert_vae(loaded: SDParts, vae: AutoencoderKL) -> None:
    want = vae.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.vae.state_dict().items())


def test_separate_a1111_vae_replaces_the_checkpoints(tiny, tmp_path, other_vae):
    checkpoint = save_single_file(tiny["sd1"], tmp_path / "model.safetensors", dtype=torch.float32)
    vae_sd = _a1111_vae_dict(other_vae)
    ckpt_vae = tmp_path / "vae-ft-mse-840000-ema-pruned.ckpt"
    torch.save({"state_dict": {**vae_sd, "loss.logvar": torch.zeros(())}, "global_step": 840000}, ckpt_vae)
    safetensors_vae = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in vae_sd.items()}, safetensors_vae)
    for vae_file in (ckpt_vae, safetensors_vae):
        loaded = load_sd(checkpoint, vae=vae_file)
        _assert_vae(loaded, other_vae)
        assert torch.equal(loaded.unet.conv_in.weight, tiny["sd1"].unet.conv_in.weight)


def test_separate_diffusers_vae_file_or_folder(tiny, tmp_path, other_vae):
    checkpoint = save_single_file(tiny["sd1"], tmp_path / "model.safetensors", dtype=torch.float32)
    save_file(dict(other_vae.state_dict()), tmp_path / "diffusion_pytorch_model.safetensors")
    _assert_vae(load_sd(checkpoint, vae=tmp_path / "diffusion_pytorch_model.safetensors"), other_vae)
    other_vae.save_pretrained(tmp_path / "vae_folder")
    _assert_vae(load_sd(checkpoint, vae=tmp_path / "vae_folder"), other_vae)


# --------------------------------------------------------------------------------------------------
# Bad input


def _sd_dict(tiny) -> dict:
    return {k: v.contiguous() for k, v in to_ldm_state_dict(tiny["sd1"]).items()}


@pytest.mark.parametrize(
    ("name", "extra", "message"),
    [
        ("sdxl.safetensors", {"conditioner.embedders.1.model.ln_final.weight": torch.ones(4)}, "SDXL"),
        ("sd3.safetensors", {"model.diffusion_model.joint_blocks.0.x.weight": torch.ones(4)}, "SD3"),
        ("flux.safetensors", {"double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(4)}, "Flux"),
    ],
)
def test_other_model_families_are_named(tmp_path, name, extra, message):
    path = tmp_path / name
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.ones(4, 4, 3, 3), **extra}, path)
    with pytest.raises(UserError, match=f"{name}: is an {message}|{name}: is a {message}"):
        load_sd(path)


def test_files_that_are_not_checkpoints_are_named(tiny, tmp_path):
    cases = {
        "not_sd.safetensors": ({"layers.0.weight": torch.ones(2)}, "not a Stable Diffusion"),
        "vae_only.safetensors": (_a1111_vae_dict(tiny["sd1"].vae), "is a VAE file"),
        "lora.safetensors": ({"lora_unet_down.lora_down.weight": torch.ones(2)}, "is a LoRA"),
        "embedding.safetensors": ({"emb_params": torch.ones(2, 768)}, "textual-inversion embedding"),
    }
    for name, (tensors, message) in cases.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / name)
        with pytest.raises(UserError, match=f"{name}: .*{message}"):
            load_sd(tmp_path / name)


def test_inpainting_and_encoderless_checkpoints_are_refused(tiny, tmp_path):
    sd = _sd_dict(tiny)
    inpainting = dict(sd, **{"model.diffusion_model.input_blocks.0.0.weight": torch.ones(32, 9, 3, 3)})
    save_file(inpainting, tmp_path / "inpaint.safetensors")
    with pytest.raises(UserError, match="inpaint.safetensors: is an inpainting model"):
        load_sd(tmp_path / "inpaint.safetensors")
    save_file(
        {k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}, tmp_path / "no_te.safetensors"
    )
    with pytest.raises(UserError, match="no_te.safetensors: has no text encoder"):
        load_sd(tmp_path / "no_te.safetensors")
    save_file(
        {k: v for k, v in sd.items() if not k.startswith("first_stage_model.")},
        tmp_path / "no_vae.safetensors",
    )
    with pytest.raises(UserError, match="no_vae.safetensors: holds no VAE"):
        load_sd(tmp_path / "no_vae.safetensors")


def test_missing_empty_truncated_and_corrupt_files_are_named(tiny, tmp_path):
    good = save_single_file(tiny["sd1"], tmp_path / "good.safetensors")
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "corrupt.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[100:200]
    )
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "bad_zip.ckpt").write_bytes(b"PK\x03\x04" + bytes(range(200)))
    expected = {
        "absent.safetensors": "no such file",
        "truncated.safetensors": "not a readable .safetensors file",
        "corrupt.safetensors": "not a readable .safetensors file",
        "empty.ckpt": "the file is empty",
        "bad_zip.ckpt": "not a readable checkpoint",
    }
    for name, message in expected.items():
        with pytest.raises(UserError, match=f"{name}: {message}"):
            load_sd(tmp_path / name)


class _WouldRunCode:
    """Unpickling this would create a marker file: a stand-in for a malicious checkpoint."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_pickle_that_would_run_code_is_refused_and_never_run(tmp_path, zip_format):
    bait = _WouldRunCode()
    bait.marker = str(tmp_path / "marker")
    path = tmp_path / "evil.ckpt"
    weights = {"model.diffusion_model.input_blocks.0.0.weight": torch.ones(2)}
    torch.save({"state_dict": weights, "bait": bait}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UserError, match=r"evil\.ckpt: refused: the pickle would run io\.open"):
        load_sd(path)
    assert not (tmp_path / "marker").exists()


def test_lightning_bookkeeping_in_old_ckpts_loads_without_running_it(tiny, tmp_path, monkeypatch):
    marker = tmp_path / "marker"

    class ModelCheckpoint:
        def __setstate__(self, state):
            marker.write_text("ran")

    names = (
        "pytorch_lightning",
        "pytorch_lightning.callbacks",
        "pytorch_lightning.callbacks.model_checkpoint",
    )
    for name in names:  # a fake Lightning, so the pickle names the class as real LDM checkpoints do
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = names[-1], "ModelCheckpoint"
    sys.modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    callback = ModelCheckpoint()
    callback.best = 1.0
    path = tmp_path / "sd-v1-4-full.ckpt"
    torch.save(
        {"state_dict": _sd_dict(tiny), "global_step": np.int64(470000), "callbacks": {"cb": callback}}, path
    )
    for name in names:
        monkeypatch.delitem(sys.modules, name)

    lightning = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert lightning in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))

    loaded = load_sd(path)
    assert loaded.family.name == "sd1" and not marker.exists()
    assert_same_weights(tiny["sd1"], loaded)


def test_bad_folders_and_existing_outputs(tiny, tmp_path):
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(UserError, match="not_a_model: not a diffusers SD folder"):
        load_sd(tmp_path / "not_a_model")
    path = save_single_file(tiny["sd1"], tmp_path / "out.safetensors")
    with pytest.raises(UserError, match="out.safetensors: already exists"):
        save_single_file(tiny["sd1"], path)
    save_single_file(tiny["sd2"], path, overwrite=True)
    assert load_sd(path).family.name == "sd2"
    with pytest.raises(UserError, match=r"out\.bin: .*\.safetensors or \.ckpt"):
        save_single_file(tiny["sd1"], tmp_path / "out.bin")
    folder = save_diffusers(tiny["sd1"], tmp_path / "folder")
    with pytest.raises(UserError, match="folder: already exists"):
        save_diffusers(tiny["sd1"], folder)
    save_diffusers(tiny["sd2"], folder, overwrite=True)
    assert load_sd(folder).family.name == "sd2"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as any other file the user writes, not private
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask


# --------------------------------------------------------------------------------------------------
# Hash and shipped configs


def test_short_hash_is_the_files_sha256_prefix(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(bytes(range(256)) * 5000)
    assert a1111_short_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def _meta_models(family: str) -> tuple[dict, SimpleNamespace]:
    """Full-size models of a family built from the shipped configs on the meta device (no memory)."""
    folder = ASSETS / "configs" / family
    configs = {
        p: json.loads((folder / p / "config.json").read_text()) for p in ("unet", "vae", "text_encoder")
    }
    with accelerate.init_empty_weights():
        models = SimpleNamespace(
            family=FAMILIES[family],
            unet=UNet2DConditionModel.from_config(configs["unet"]),
            vae=AutoencoderKL.from_config(configs["vae"]),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])),
        )
    return configs, models


@pytest.mark.parametrize(
    ("family", "unet", "vae", "text"),
    [("sd1", 859_520_964, 83_653_863, 123_060_480), ("sd2-v", 865_910_724, 83_653_863, 340_387_840)],
)
def test_shipped_configs_build_the_real_sizes(family, unet, vae, text):
    _, models = _meta_models(family)
    modules = (models.unet, models.vae, models.text_encoder)
    assert tuple(sum(p.numel() for p in m.parameters()) for m in modules) == (unet, vae, text)
    assert all(p.is_meta for m in modules for p in m.parameters())


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_full_size_layout_round_trips_on_the_meta_device(family):
    configs, models = _meta_models(family)
    sd = to_ldm_state_dict(models)
    # Keys every SD file of the family has: the last input level, upsamplers after plain and attention blocks.
    assert "model.diffusion_model.input_blocks.11.0.out_layers.3.weight" in sd
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in sd
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in sd
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in sd
    if family == "sd1":
        assert len(sd) == 1130  # SD 1.5's 1131 tensors less the position_ids buffer
    else:
        assert sd["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"].shape == (3072, 1024)

    openclip = family != "sd1"
    unet_config = convert.unet_config_from_ldm(sd, configs["unet"])
    text_config = convert.text_config_from_ldm(sd, configs["text_encoder"], openclip)
    vae_sd = {
        k.removeprefix("first_stage_model."): v for k, v in sd.items() if k.startswith("first_stage_model.")
    }
    vae_config = convert.vae_config_from_ldm(vae_sd, configs["vae"])
    assert {k: unet_config[k] for k in configs["unet"]} == configs["unet"]
    assert (text_config, vae_config) == (configs["text_encoder"], configs["vae"])
    for module, state in (
        (models.unet, convert.unet_from_ldm(sd, unet_config)),
        (models.vae, convert.vae_from_ldm(vae_sd, vae_config)),
        (models.text_encoder, convert.text_from_ldm(sd, text_config, openclip)),
    ):
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in module.state_dict().items()}
