"""SDXL textual inversion on the tiny SDXL built in code: how prompts become the UNet's conditioning (both
penultimate states, bigG's pooled vector at the true end token, each encoder's pad id), size ids that
reach the UNet, the embedding files other tools load (A1111's pair, ComfyUI's keys, diffusers' two calls),
and one-line refusals of embeddings made for the other family. FACTS §9 holds the rules."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTokenizer

from library.conditioning import Conditioner
from library.config import load_config
from library.denoiser import UNetCall
from library.embeddings import load_embedding
from library.families import ASSETS, FAMILIES
from library.parts import load_tokenizer
from library.tables import TrainConfig
from library.tiny import build_tiny_parts
from library.training import setup
from tests.a1111 import a1111_reads
from tests.helpers import make_images, one_error_line

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "n3w"


@pytest.fixture(scope="module")
def parts():
    return build_tiny_parts("sdxl", seed=0)


def token_ids(parts, text: str) -> list[int]:
    return parts.tokenizer(text, add_special_tokens=False).input_ids


def rows_of(parts, word: str) -> dict[str, torch.Tensor]:
    """The token-table rows of `word` in each encoder: an embedding that means exactly `word`."""
    ids = token_ids(parts, word)
    return {key: enc.get_input_embeddings().weight[ids].clone() for key, enc in parts.text_encoders.items()}


def transformers_encoding(parts, text: str, pad: dict[str, int]):
    """The encoders' own outputs for `text` (no embedding), padded as SDXL pads: per encoder (ids, output)."""
    ids = [parts.tokenizer.bos_token_id, *token_ids(parts, text), parts.tokenizer.eos_token_id]
    out = {}
    for key, encoder in parts.text_encoders.items():
        padded = torch.tensor([ids + [pad[key]] * (77 - len(ids))])
        out[key] = (padded, encoder(input_ids=padded, output_hidden_states=True))
    return out


def test_context_is_both_penultimate_states_and_pooled_is_at_the_end_token(parts):
    """An embedding holding the rows of "dog" must encode exactly as the word "dog": the context is CLIP-L's
    and bigG's penultimate states side by side (no final norm), the pooled vector is bigG's projected output at
    the end token. Taken at the new word's slot (what transformers' argmax pooling does once a new token id
    exceeds the end token's) it would be another vector, and this test fails."""
    conditioner = Conditioner.of(parts)
    conditioner.set_embedding(NAME, rows_of(parts, "dog"))
    ours = conditioner.encode([f"a photo of {NAME}"])
    theirs = transformers_encoding(parts, "a photo of dog", {"clip_l": 49407, "clip_g": 0})
    context = torch.cat([theirs[key][1].hidden_states[-2] for key in ("clip_l", "clip_g")], dim=-1)
    assert ours.context.shape == (1, 77, 32 + 48)
    torch.testing.assert_close(ours.context, context, rtol=0, atol=1e-6)
    # The end token is the largest id of this prompt, so transformers' own pooling is right here.
    ids, output = theirs["clip_g"]
    assert int(ids[0].argmax()) == len(token_ids(parts, "a photo of dog")) + 1
    torch.testing.assert_close(ours.pooled, output.text_embeds, rtol=0, atol=1e-6)
    # At the new word's slot (position 4: BOS a photo of dog) the projected state is something else.
    final = parts.text_encoders["clip_g"].text_model.final_layer_norm(output.last_hidden_state)
    at_word = parts.text_encoders["clip_g"].text_projection(final[:, 4])
    assert (ours.pooled - at_word).abs().max() > 0.1


def test_each_encoder_pads_its_own_way(parts):
    """CLIP-L pads with the end token 49407, bigG with 0 (A1111, Kohya, ComfyUI)."""
    seen = {}
    hooks = [
        encoder.register_forward_pre_hook(
            lambda module, args, kwargs, key=key: seen.__setitem__(key, kwargs["input_ids"]), with_kwargs=True
        )
        for key, encoder in parts.text_encoders.items()
    ]
    try:
        Conditioner.of(parts).encode(["a cat"])
    finally:
        for hook in hooks:
            hook.remove()
    end = len(token_ids(parts, "a cat")) + 1
    for key, pad in (("clip_l", 49407), ("clip_g", 0)):
        row = seen[key][0].tolist()
        assert row[end] == 49407 and set(row[end + 1 :]) == {pad}, key


def test_each_block_goes_to_its_own_encoder(parts):
    """The clip_l block changes only the first 32 columns of the context, the clip_g block the last 48 and
    the pooled vector."""
    conditioner = Conditioner.of(parts)
    blocks = rows_of(parts, "dog")
    conditioner.set_embedding(NAME, blocks)
    base = conditioner.encode([f"a photo of {NAME}"])
    conditioner.set_embedding(NAME, {"clip_l": blocks["clip_l"] + 1.0, "clip_g": blocks["clip_g"]})
    moved_l = conditioner.encode([f"a photo of {NAME}"])
    assert not torch.equal(moved_l.context[..., :32], base.context[..., :32])
    assert torch.equal(moved_l.context[..., 32:], base.context[..., 32:])
    assert torch.equal(moved_l.pooled, base.pooled)


def small_run(tmp_path, *overrides):
    images = make_images(tmp_path / "img", count=4, size=32)
    return load_config(
        TrainConfig,
        None,
        [
            "model.checkpoint=builtin:tiny",
            "model.family=sdxl",
            f"embedding.name={NAME}",
            "embedding.init_text=dog",
            "embedding.num_vectors=2",
            f"dataset.image_dir={images}",
            "dataset.resolution=32",
            "dataset.template=a photo of [name]",
            "train.batch_size=2",
            "train.max_steps=2",
            "train.lr=0.01",
            "save.save_every_steps=0",
            f"save.output_dir={tmp_path / 'run'}",
            *overrides,
        ],
    )


def test_training_hands_the_unet_pooled_vectors_and_size_ids(tmp_path, monkeypatch):
    seen = []
    forward = UNetCall.forward

    def spy(self, latents, timesteps, context, pooled=None, time_ids=None):
        seen.append((context.shape, None if pooled is None else pooled.shape, time_ids))
        return forward(self, latents, timesteps, context, pooled, time_ids)

    monkeypatch.setattr(UNetCall, "forward", spy)
    trainer = setup(small_run(tmp_path), log=lambda *_: None)
    final = trainer.train()
    assert seen and all(shape == (2, 77, 80) and pooled == (2, 48) for shape, pooled, _ in seen)
    # 32x32 pictures trained at 32x32: original size, no crop, target size (height, width first).
    assert all(ids.tolist() == [[32, 32, 0, 0, 32, 32]] * 2 for *_, ids in seen)
    saved = safetensors.torch.load_file(final.with_suffix(".safetensors"))
    assert {key: tuple(v.shape) for key, v in saved.items()} == {"clip_l": (2, 32), "clip_g": (2, 48)}


def test_the_files_load_in_a1111_comfyui_and_diffusers(tmp_path, parts):
    """The saved pair: A1111 reads both keys of the .pt and .safetensors (width 32 + 48 here, 768 + 1280 on
    real SDXL), ComfyUI takes each half by its key, diffusers loads it with one call per encoder and then
    encodes the word as we do."""
    trainer = setup(small_run(tmp_path, "save.formats=['safetensors', 'pt']"), log=lambda *_: None)
    final = trainer.train()
    ours = {m.name: {k: v.detach().cpu() for k, v in m.blocks.items()} for m in trainer.embeddings}[NAME]
    for suffix in (".safetensors", ".pt"):
        keyword, vectors, *_ = a1111_reads(final.with_suffix(suffix))
        assert keyword == NAME and torch.equal(vectors["clip_l"], ours["clip_l"])
        assert sum(v.shape[-1] for v in vectors.values()) == 32 + 48
    # ComfyUI's load_embed: safetensors.torch.load_file, then embed[embed_key] for "clip_l" / "clip_g".
    state = safetensors.torch.load_file(final.with_suffix(".safetensors"))
    assert set(state) == {"clip_l", "clip_g"} and torch.equal(state["clip_g"], ours["clip_g"])

    pipe = StableDiffusionXLPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoders["clip_l"],
        text_encoder_2=parts.text_encoders["clip_g"],
        tokenizer=load_tokenizer("sdxl"),
        tokenizer_2=CLIPTokenizer.from_pretrained(ASSETS / "tokenizer_sd2", local_files_only=True),
        unet=parts.unet,
        scheduler=parts.noise_scheduler,
    )
    pipe.load_textual_inversion(
        state["clip_l"], token=NAME, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        state["clip_g"], token=NAME, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    try:
        prompt = f"a photo of {NAME}"
        context, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
        conditioner = Conditioner.of(parts)
        conditioner.set_embedding(NAME, ours)
        mine = conditioner.encode([prompt])
        # The same context (diffusers pads bigG with its tokenizer's "!" = 0 as we do) ...
        torch.testing.assert_close(context, mine.context, rtol=0, atol=1e-5)
        # ... and diffusers' pooled vector is the EOS trap of FACTS §9: taken at the new token, not at the end.
        assert (pooled - mine.pooled).abs().max() > 1e-3
    finally:
        pipe.unload_textual_inversion(NAME, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
        pipe.unload_textual_inversion(NAME, tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2)


@pytest.mark.parametrize(
    "family, vectors, message",
    [
        (
            "sdxl",
            torch.ones(2, 32),
            "an embedding of width 32 does not fit this SDXL model (clip_l [n, 32], clip_g [n, 48])",
        ),
        (
            "sd1",
            {"clip_l": torch.ones(2, 32), "clip_g": torch.ones(2, 48)},
            "an embedding of clip_l [2, 32], clip_g [2, 48] (SDXL) does not fit this SD 1.x model (clip_l [n, 32])",
        ),
    ],
)
def test_an_embedding_of_the_other_family_is_one_line(tmp_path, capsys, family, vectors, message):
    import train_textual_inversion

    file = tmp_path / "start.safetensors"
    safetensors.torch.save_file(vectors if isinstance(vectors, dict) else {"emb_params": vectors}, file)
    images = make_images(tmp_path / "img", count=2, size=32)
    code = train_textual_inversion.main(
        [
            "model.checkpoint=builtin:tiny",
            f"model.family={family}",
            f"embedding.name={NAME}",
            f"embedding.init_from={file}",
            f"dataset.image_dir={images}",
            "dataset.resolution=32",
            "dataset.template=a photo of [name]",
            f"save.output_dir={tmp_path / 'run'}",
        ]
    )
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"error: {file}: {message}; use an embedding made for this model family"
    assert FAMILIES[family].title in line
    assert not (tmp_path / "run" / f"{NAME}.safetensors").exists()


def pictures(folder, count: int, width: int, height: int):
    """`count` plain pictures of width x height with a caption."""
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (width, height), (40 * i, 120, 200)).save(folder / f"{i}.png")
    return folder


def spy_unet(monkeypatch) -> list:
    seen = []
    forward = UNetCall.forward

    def spy(self, latents, timesteps, context, pooled=None, time_ids=None):
        seen.append((tuple(latents.shape), time_ids.tolist()))
        return forward(self, latents, timesteps, context, pooled, time_ids)

    monkeypatch.setattr(UNetCall, "forward", spy)
    return seen


def test_a_cropped_picture_is_conditioned_as_cropped(tmp_path, monkeypatch):
    """48 x 32 pictures trained at 32 x 32 lose 8 columns on each side: original (h 32, w 48), crop (top 0,
    left 8), target (32, 32), as SDXL was trained on its crops."""
    seen = spy_unet(monkeypatch)
    images = pictures(tmp_path / "wide", 2, 48, 32)
    setup(small_run(tmp_path, f"dataset.image_dir={images}"), log=lambda *_: None).train()
    assert seen and all(ids == [[32, 48, 0, 8, 32, 32]] * 2 for _, ids in seen)


def test_a_cast_in_different_buckets_runs_one_unet_call_per_shape(tmp_path, monkeypatch):
    """Two characters, one photographed upright, one lying down: with buckets each keeps its framing, so
    their batches differ in shape and go to the UNet separately, each with its own size ids."""
    seen = spy_unet(monkeypatch)
    tall, wide = pictures(tmp_path / "tall", 2, 32, 96), pictures(tmp_path / "wide", 2, 96, 32)
    preset = tmp_path / "cast.toml"
    preset.write_text(
        f"""
[model]
checkpoint = "builtin:tiny"
family = "sdxl"
[dataset]
resolution = 32
enable_bucket = true
min_bucket_reso = 16
max_bucket_reso = 64
bucket_reso_steps = 16
template = "a photo of [name]"
[train]
batch_size = 2
max_steps = 2
[save]
save_every_steps = 0
output_dir = "{(tmp_path / "run").as_posix()}"
[[embeddings]]
name = "t4ll"
image_dir = "{tall.as_posix()}"
[[embeddings]]
name = "w1de"
image_dir = "{wide.as_posix()}"
"""
    )
    trainer = setup(load_config(TrainConfig, preset), log=lambda *_: None)
    trainer.train()
    shapes = {shape for shape, _ in seen}
    # 32 x 96 pictures get the 16 x 48 bucket (area <= 32²), 96 x 32 ones the 48 x 16 bucket; latents are half.
    assert shapes == {(2, 4, 24, 8), (2, 4, 8, 24)}, shapes
    assert {tuple(ids[0]) for _, ids in seen} == {(96, 32, 0, 0, 48, 16), (32, 96, 0, 0, 16, 48)}
    assert all(trainer.run.final_file("safetensors", name).exists() for name in ("t4ll", "w1de"))


def test_sdxl_trains_at_1024_unless_told_otherwise(tmp_path, monkeypatch):
    """No dataset.resolution: the model's own size, read from its weights before it loads (SDXL 1024, SD 1.x
    512), used for the images and recorded in the run's config.toml. (The latents are not cached here:
    the tiny VAE takes minutes on 1024-pixel pictures on a CPU.)"""
    from library.convert import save_single_file
    from library.data import TrainingData
    from library.model_kind import native_resolution
    from library.tables import ModelConfig

    files = {
        family: save_single_file(build_tiny_parts(family), tmp_path / f"{family}.safetensors")
        for family in ("sd1", "sdxl")
    }
    assert native_resolution(ModelConfig(checkpoint="builtin:toy")) == 64
    assert {f: native_resolution(ModelConfig(checkpoint=str(p))) for f, p in files.items()} == {
        "sd1": 512,
        "sdxl": 1024,
    }
    images = make_images(tmp_path / "img", count=2, size=32)
    config = load_config(
        TrainConfig,
        None,
        [f"model.checkpoint={files['sdxl']}", f"embedding.name={NAME}", f"dataset.image_dir={images}",
         "dataset.template=a photo of [name]", "train.max_steps=1", f"save.output_dir={tmp_path / 'run'}"],
    )  # fmt: skip
    assert config.dataset.resolution == 0
    monkeypatch.setattr(TrainingData, "cache_latents", lambda *args, **kwargs: None)
    trainer = setup(config, log=lambda *_: None)
    assert trainer.sources[0].resolution == (1024, 1024)
    assert "resolution = 1024" in (tmp_path / "run" / "config.toml").read_text()


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory) -> tuple:
    """An SDXL run trained 4 steps on an SDXL single file, saving every 2, with CLIP skip 2."""
    from library.convert import save_single_file

    tmp = tmp_path_factory.mktemp("sdxl_run")
    checkpoint = save_single_file(build_tiny_parts("sdxl"), tmp / "xl.safetensors")
    config = small_run(
        tmp,
        f"model.checkpoint={checkpoint}",
        "train.max_steps=4",
        "save.save_every_steps=2",
        "train.clip_skip=2",
    )
    setup(config, log=lambda *_: None).train()
    return tmp / "run", checkpoint


@pytest.mark.parametrize("sampler", ["DPM++ 2M Karras", "DPM++ 2M", "Euler a", "Euler", "DDIM"])
def test_generate_renders_sdxl_with_every_sampler(tmp_path, sdxl_run, sampler):
    """txt2img on an SDXL file with our SDXL embedding in the prompt, a negative prompt and CFG; A1111's
    infotext names the embedding and the CLIP skip."""
    from PIL import Image

    from library.generation import run_generate
    from library.infotext import parse_infotext
    from library.tables import GenerateConfig

    run, checkpoint = sdxl_run
    config = load_config(
        GenerateConfig,
        None,
        [f"model.checkpoint={checkpoint}", f"generate.output_dir={tmp_path / 'out'}", "generate.width=32",
         "generate.height=48", "generate.steps=2", f"generate.sampler={sampler}", "generate.batch_size=2",
         f"generate.prompt=a photo of {NAME}", "generate.negative_prompt=blurry", "generate.clip_skip=2",
         f"generate.embeddings=['{run / (NAME + '.safetensors')}']", "generate.seed=7"],
    )  # fmt: skip
    out = run_generate(config, log=lambda *_: None, show_progress=False)
    files = sorted(out.glob("0*.png"))
    assert len(files) == 2
    with Image.open(files[0]) as image:
        assert image.size == (32, 48)
        prompt, negative, params = parse_infotext(image.text["parameters"])
    assert (prompt, negative, params["Sampler"], params["Clip skip"]) == (
        f"a photo of {NAME}",
        "blurry",
        sampler,
        "2",
    )
    assert NAME in params["TI hashes"] and params["Model"] == "xl"


def test_the_sweep_renders_an_sdxl_run_and_names_an_sd1_checkpoint_it_cannot_use(tmp_path, sdxl_run, capsys):
    import sweep_validate
    from library.infotext import parse_infotext
    from tests.helpers import tiny_checkpoint

    run, _ = sdxl_run
    base = [
        "--config", "presets/validate.toml", f"run.folder={run}", 'model.checkpoints=["run:checkpoint"]',
        "render.steps=1", "render.width=32", "render.height=32", "render.batch_size=1", "x.values=every 2",
        "render.prompt=a photo of [name]-2",
    ]  # fmt: skip
    assert sweep_validate.main([*base, f"sweep.output_dir={tmp_path / 'ok'}"]) == 0, capsys.readouterr().err
    cells = sorted((tmp_path / "ok" / "cells").rglob("*.png"))
    assert len(cells) == 3  # steps 0, 2, 4
    from PIL import Image

    with Image.open(cells[0]) as image:
        assert parse_infotext(image.text["parameters"])[2]["Clip skip"] == "2"
    sd1 = tiny_checkpoint(tmp_path)
    code = sweep_validate.main(
        [*base, f"sweep.output_dir={tmp_path / 'mixed'}", f'model.checkpoints=["run:checkpoint", "{sd1}"]']
    )
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert (
        "(SDXL) does not fit this SD 1.x model" in line
        and "use an embedding made for this model family" in line
    )


def test_an_sdxl_run_resumes_to_the_same_vectors(tmp_path, sdxl_run):
    """Stopped after step 2 and resumed, an SDXL run ends with the vectors of the uninterrupted run."""
    run, checkpoint = sdxl_run
    again = small_run(
        tmp_path,
        f"model.checkpoint={checkpoint}",
        "train.max_steps=4",
        "save.save_every_steps=2",
        "train.clip_skip=2",
    )
    first = small_run(
        tmp_path,
        f"model.checkpoint={checkpoint}",
        "train.max_steps=2",
        "save.save_every_steps=2",
        "train.clip_skip=2",
    )
    setup(first, log=lambda *_: None).train()
    resumed = setup(again, resume=str(tmp_path / "run"), log=lambda *_: None).train()
    whole = load_embedding(run / f"{NAME}.safetensors").vectors
    assert all(torch.equal(load_embedding(resumed).vectors[key], whole[key]) for key in ("clip_l", "clip_g"))
