"""Embedding files: what A1111, Kohya and diffusers write is read, and what we write they read."""

from __future__ import annotations

import base64
import json
import os
import pickle
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from library.embeddings import (
    STORED_NAME_KEY,
    TRAINING_SETTINGS_KEY,
    Embedding,
    init_vectors,
    load_embedding,
    name_warnings,
    save_embedding,
)
from library.errors import UserError
from library.png_embedding import lcg_stream
from library.tiny import build_tiny_parts
from tests.a1111 import a1111_check_pt, a1111_reads, reference_extract, reference_lcg

WOMAN = 2308  # CLIP id of "woman"


def kohya_reads(path: Path) -> torch.Tensor:
    """Kohya's TextualInversionTrainer.load_weights (used by --weights to resume)."""
    if path.suffix == ".safetensors":
        data = safetensors.torch.load_file(path)
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if "string_to_param" in data:
            data = data["string_to_param"]
    emb = next(iter(data.values()))
    assert type(emb) is torch.Tensor
    return emb.unsqueeze(0) if emb.dim() == 1 else emb


# ---------------------------------------------------------------------------------------------------------
# Helpers


def vectors(n: int = 3, width: int = 768, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def sample(width: int = 768, n: int = 3) -> Embedding:
    return Embedding(
        name="myemb",
        vectors=vectors(n, width),
        step=120,
        checkpoint_hash="9aba26abdf",
        checkpoint_name="deliberate_v2",
        metadata={TRAINING_SETTINGS_KEY: '{"lr": 0.005}'},
    )


def expect_user_error(call, *fragments: str) -> str:
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


# ---------------------------------------------------------------------------------------------------------
# Reading files the other tools wrote


def test_a1111_pt_with_eight_vectors_loads_exactly(tmp_path):
    # What A1111's Embedding.save writes after training: the trained leaf tensor still requires grad.
    vec = vectors(8).requires_grad_(True)
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vec},
        "name": "myemb-500",
        "step": 499,
        "sd_checkpoint": "9aba26abdf",
        "sd_checkpoint_name": "deliberate_v2",
    }
    torch.save(data, tmp_path / "myemb-500.pt")
    torch.save(data, tmp_path / "renamed.pt")

    loaded = load_embedding(tmp_path / "myemb-500.pt")
    assert loaded.name == "myemb-500"
    assert (loaded.step, loaded.checkpoint_hash, loaded.checkpoint_name) == (
        499,
        "9aba26abdf",
        "deliberate_v2",
    )
    assert loaded.num_vectors == 8 and loaded.width == 768
    assert loaded.vectors.dtype == torch.float32 and not loaded.vectors.requires_grad
    assert torch.equal(loaded.vectors, vec.detach())
    assert loaded.metadata == {}

    renamed = load_embedding(tmp_path / "renamed.pt")  # A1111: the keyword is the file stem
    assert renamed.name == "renamed" and renamed.metadata[STORED_NAME_KEY] == "myemb-500"


def test_kohya_onetrainer_diffusers_and_ldm_files_load(tmp_path):
    vec = vectors(2)
    torch.save({"emb_params": vec}, tmp_path / "kohya.pt")
    safetensors.torch.save_file({"emb_params": vec.half()}, tmp_path / "kohya16.safetensors")
    safetensors.torch.save_file({"emp_params": vec}, tmp_path / "onetrainer.safetensors")
    folder = tmp_path / "cat-toy"
    folder.mkdir()
    torch.save({"<cat-toy>": vec[0]}, folder / "learned_embeds.bin")  # one vector, 1-D
    ldm = {"string_to_token": {"*": torch.tensor(265)}, "string_to_param": torch.nn.ParameterDict({"*": vec})}
    torch.save(ldm, tmp_path / "ldm.pt")

    assert torch.equal(load_embedding(tmp_path / "kohya.pt").vectors, vec)
    half = load_embedding(tmp_path / "kohya16.safetensors")
    assert half.vectors.dtype == torch.float32 and torch.equal(half.vectors, vec.half().float())
    assert torch.equal(load_embedding(tmp_path / "onetrainer.safetensors").vectors, vec)
    diffusers_folder = load_embedding(folder)
    assert diffusers_folder.name == "cat-toy" and diffusers_folder.vectors.shape == (1, 768)
    assert diffusers_folder.metadata[STORED_NAME_KEY] == "<cat-toy>"
    direct = load_embedding(folder / "learned_embeds.bin")
    assert direct.name == "learned_embeds" and torch.equal(direct.vectors[0], vec[0])
    assert torch.equal(load_embedding(tmp_path / "ldm.pt").vectors, vec)


# ---------------------------------------------------------------------------------------------------------
# Round trips and what the other tools read from our files


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".png", ".webp"])
def test_round_trip(tmp_path, suffix):
    embedding = sample()
    path = save_embedding(embedding, tmp_path / f"myemb{suffix}")
    loaded = load_embedding(path)
    assert loaded.name == "myemb"
    assert torch.equal(loaded.vectors, embedding.vectors)
    assert (loaded.step, loaded.checkpoint_hash, loaded.checkpoint_name) == (
        120,
        "9aba26abdf",
        "deliberate_v2",
    )
    assert loaded.metadata[TRAINING_SETTINGS_KEY] == '{"lr": 0.005}'
    assert STORED_NAME_KEY not in loaded.metadata
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"myemb{suffix}"]  # no temporary files left
    (tmp_path / "plain").write_bytes(b"")  # the file gets the permissions of any new file, not owner-only
    assert path.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".png"])
def test_sdxl_pair_round_trip_and_a1111_reads_it(tmp_path, suffix):
    pair = {"clip_l": vectors(2, 768), "clip_g": vectors(2, 1280, seed=2)}
    path = save_embedding(Embedding("xlemb", pair, step=5), tmp_path / f"xlemb{suffix}")
    loaded = load_embedding(path)
    assert loaded.is_sdxl and loaded.num_vectors == 2 and loaded.width == 768 + 1280
    assert all(torch.equal(loaded.vectors[key], pair[key]) for key in pair)
    name, vec, *_ = a1111_reads(path)
    assert name == "xlemb" and set(vec) == {"clip_l", "clip_g"}
    assert torch.equal(vec["clip_g"], pair["clip_g"])


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".png", ".webp"])
def test_a1111_and_kohya_read_our_files(tmp_path, suffix):
    embedding = sample()
    path = save_embedding(embedding, tmp_path / f"myemb{suffix}")
    name, vec, step, checkpoint_hash, checkpoint_name = a1111_reads(path)
    assert name == "myemb"
    assert torch.equal(vec.reshape(embedding.vectors.shape), embedding.vectors)
    if suffix != ".safetensors":  # A1111 reads these fields only from its own dict
        assert (step, checkpoint_hash, checkpoint_name) == (120, "9aba26abdf", "deliberate_v2")
    if suffix in (".pt", ".safetensors"):
        assert torch.equal(kohya_reads(path), embedding.vectors)


def test_pt_file_is_a1111_dict(tmp_path):
    embedding = sample()
    embedding.metadata = {}
    data = torch.load(save_embedding(embedding, tmp_path / "myemb.pt"), weights_only=True)
    assert list(data) == [
        "string_to_token",
        "string_to_param",
        "name",
        "step",
        "sd_checkpoint",
        "sd_checkpoint_name",
    ]
    assert data["string_to_token"] == {"*": 265}
    assert (
        data["string_to_param"]["*"].dtype == torch.float32 and data["string_to_param"]["*"].is_contiguous()
    )
    assert (data["name"], data["step"], data["sd_checkpoint"]) == ("myemb", 120, "9aba26abdf")


@pytest.mark.parametrize("pair", [False, True], ids=["sd1", "sdxl"])
def test_pt_files_pass_a1111_safe_loader_with_the_stem_as_archive_folder(tmp_path, pair):
    embedding = sample()
    if pair:
        embedding.vectors = {"clip_l": vectors(2, 768), "clip_g": vectors(2, 1280, seed=2)}
    path = save_embedding(embedding, tmp_path / "fr3nchl4dy-115.pt")
    a1111_check_pt(path)
    with zipfile.ZipFile(path) as archive:
        assert {name.split("/")[0] for name in archive.namelist()} == {"fr3nchl4dy-115"}
        assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
    assert load_embedding(path).num_vectors == (2 if pair else 3)
    mapped = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # ComfyUI memory-maps
    assert (
        (set(mapped) >= {"clip_l", "clip_g"})
        if pair
        else torch.equal(mapped["string_to_param"]["*"], embedding.vectors)
    )


def test_safetensors_is_kohya_layout_with_modelspec(tmp_path):
    path = save_embedding(sample(), tmp_path / "myemb.safetensors")
    with safetensors.safe_open(path, "pt") as handle:
        assert list(handle.keys()) == ["emb_params"]
        header = handle.metadata()
    assert header["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert header["ti.name"] == "myemb" and header["ti.step"] == "120" and header["ti.num_vectors"] == "3"
    assert header["ti.checkpoint_hash"] == "9aba26abdf"

    wide = save_embedding(sample(width=1024), tmp_path / "sd2.safetensors")
    assert safetensors.safe_open(wide, "pt").metadata()["modelspec.architecture"] == (
        "stable-diffusion-v2-512/textual-inversion"
    )
    chosen = sample(width=1024)
    chosen.family = "sd2-v"
    path = save_embedding(chosen, tmp_path / "v.safetensors")
    header = safetensors.safe_open(path, "pt").metadata()
    assert header["modelspec.architecture"] == "stable-diffusion-v2-768-v/textual-inversion"
    assert header["modelspec.prediction_type"] == "v" and header["modelspec.resolution"] == "768x768"
    assert load_embedding(path).family == "sd2-v"  # read back from the architecture


class A1111Encoder(json.JSONEncoder):
    """A1111's EmbeddingEncoder: tensors become {"TORCHTENSOR": nested lists}."""

    def default(self, o):
        if isinstance(o, torch.Tensor):
            return {"TORCHTENSOR": o.cpu().detach().numpy().tolist()}
        return super().default(o)


def test_png_text_chunk_and_panels_are_a1111_bytes(tmp_path):
    embedding = sample(n=4)
    picture = Image.new("RGB", (96, 80), (200, 120, 40))
    path = save_embedding(embedding, tmp_path / "myemb.png", image=picture)
    pt_dict = torch.load(save_embedding(embedding, tmp_path / "myemb.pt"), weights_only=True)
    expected_json = json.dumps(pt_dict, cls=A1111Encoder)
    with Image.open(path) as saved:
        assert base64.b64decode(saved.text["sd-ti-embedding"]).decode() == expected_json
        pixels = np.array(saved.convert("RGB"))

    # A1111's insert: panels of height h, nibbles padded to whole h*3 columns (always adding some).
    packed = np.frombuffer(zlib.compress(expected_json.encode(), level=9), np.uint8)
    size = packed.size + (80 - packed.size % 80)
    size += 80 * 3 - size % (80 * 3)
    panel = size // (80 * 3)
    assert pixels.shape == (80, 96 + 2 * panel + 2, 3)
    assert np.array_equal(pixels[:, panel + 1 : panel + 97], np.array(picture))
    assert not pixels[:, panel].any() and not pixels[:, panel + 97].any()  # black separators
    stream = reference_lcg()
    noise = np.array([next(stream) for _ in range(size)], dtype=np.uint8).reshape(80, panel, 3) & 0x0F
    assert np.array_equal(
        pixels[:, :panel] & 0x0F, np.resize(packed & 0x0F, size).reshape(80, panel, 3) ^ noise
    )
    assert np.array_equal(
        pixels[:, panel + 98 :] & 0x0F, np.resize(packed >> 4, size).reshape(80, panel, 3) ^ noise
    )


def test_png_panels_alone_carry_the_embedding(tmp_path):
    embedding = sample(n=4)
    path = save_embedding(embedding, tmp_path / "myemb.png")  # on a generated card
    stripped = tmp_path / "stripped.png"
    with Image.open(path) as saved:
        saved.convert("RGB").save(stripped)  # pixels only: the text chunk is gone
    assert "sd-ti-embedding" not in Image.open(stripped).text

    data = reference_extract(Image.open(stripped))
    assert data["name"] == "myemb" and data["step"] == 120 and data["string_to_token"] == {"*": 265}
    assert torch.equal(data["string_to_param"]["*"].float(), embedding.vectors)
    loaded = load_embedding(stripped)
    assert loaded.name == "myemb" and torch.equal(loaded.vectors, embedding.vectors)


def test_lcg_matches_a1111_reference_values():
    # From A1111's image_embedding.py self-test: the first 100 values, and the sum of the next 100,000.
    first = [
        253, 242, 127, 44, 157, 27, 239, 133, 38, 79, 167, 4, 177, 95, 130, 79, 78, 14, 52, 215,
        220, 194, 126, 28, 240, 179, 160, 153, 149, 50, 105, 14, 21, 218, 199, 18, 54, 198, 193, 38,
        128, 19, 53, 195, 124, 75, 205, 12, 6, 145, 0, 28, 30, 148, 8, 45, 218, 171, 55, 249,
        97, 166, 12, 35, 0, 41, 221, 122, 215, 170, 31, 113, 186, 97, 119, 31, 23, 185, 66, 140,
        30, 41, 37, 63, 137, 109, 216, 55, 159, 145, 82, 204, 86, 73, 222, 44, 198, 118, 240, 97,
    ]  # fmt: skip
    stream = lcg_stream(100_100)
    assert stream[:100].tolist() == first
    assert int(stream[100:].astype(np.int64).sum()) == 12731374


def _tiny_pipeline():

    return build_tiny_parts("sd1").pipeline()


@pytest.mark.parametrize(("suffix", "token"), [(".safetensors", "<tok>"), (".pt", "<tok>"), (".pt", None)])
def test_diffusers_load_textual_inversion_accepts_our_files(tmp_path, suffix, token):
    embedding = sample(width=32)  # the tiny text encoder is 32 wide
    path = save_embedding(embedding, tmp_path / f"myemb{suffix}")
    pipe = _tiny_pipeline()
    pipe.load_textual_inversion(str(path), token=token)
    name = token or "myemb"  # without token=, diffusers takes the A1111 dict's name
    ids = pipe.tokenizer.convert_tokens_to_ids([name, f"{name}_1", f"{name}_2"])
    rows = pipe.text_encoder.get_input_embeddings().weight[ids].detach()
    assert torch.equal(rows, embedding.vectors)


# ---------------------------------------------------------------------------------------------------------
# Initialisation and names


def test_init_rules_give_expected_rows(tiny_sd1):
    table = tiny_sd1.text_encoder.get_input_embeddings().weight.detach()
    tokenizer, encoder = tiny_sd1.tokenizer, tiny_sd1.text_encoder
    for rule in ("a1111", "kohya"):
        assert torch.equal(init_vectors(tokenizer, encoder, "woman", 4, rule), table[[WOMAN] * 4])
    red, hair = 736, 2225  # "red hair" is two tokens
    assert torch.equal(init_vectors(tokenizer, encoder, "red hair", 3, "a1111"), table[[red, red, hair]])
    assert torch.equal(init_vectors(tokenizer, encoder, "red hair", 3, "kohya"), table[[red, hair, red]])
    # At most n tokens are used: "a photo of a woman" with 3 vectors = "a photo of".
    assert torch.equal(init_vectors(tokenizer, encoder, "a photo of a woman", 3), table[[320, 1125, 539]])
    assert torch.equal(init_vectors(tokenizer, encoder, "", 2), torch.zeros(2, 32))
    assert torch.equal(init_vectors(tokenizer, encoder, "   ", 2, "kohya"), torch.zeros(2, 32))


def test_init_rejects_bad_settings(tiny_sd1):
    expect_user_error(
        lambda: init_vectors(tiny_sd1.tokenizer, tiny_sd1.text_encoder, "x", 2, "dreamartist"), "a1111"
    )
    expect_user_error(lambda: init_vectors(tiny_sd1.tokenizer, tiny_sd1.text_encoder, "x", 0), "num_vectors")


def test_name_warnings(tiny_sd1):
    tokenizer = tiny_sd1.tokenizer
    assert name_warnings(tokenizer, "sksperson") == []
    (single,) = name_warnings(tokenizer, "woman")
    assert "single CLIP token" in single and str(WOMAN) in single
    (same,) = name_warnings(tokenizer, "MyEmb", loaded_names=["myemb", "other"])  # CLIP lowercases
    assert "'myemb'" in same and "same tokens" in same
    (prefix,) = name_warnings(tokenizer, "myemb", loaded_names=["myemb-500"])
    assert "'myemb-500'" in prefix
    assert any("A1111 keeps only" in w for w in name_warnings(tokenizer, "my/emb"))
    expect_user_error(lambda: name_warnings(tokenizer, " "), "empty")


# ---------------------------------------------------------------------------------------------------------
# Bad input


class _Hostile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_bad_files_are_one_line_errors_and_write_nothing(tmp_path):
    good = save_embedding(sample(), tmp_path / "good.safetensors")
    marker = tmp_path / "pwned"
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(300))
    (tmp_path / "truncated.safetensors").write_bytes(good.read_bytes()[:-100])
    torch.save({"string_to_param": {"*": _Hostile(marker)}}, tmp_path / "hostile.pt")
    with open(tmp_path / "hostile_raw.bin", "wb") as handle:
        pickle.dump({"emb": _Hostile(marker)}, handle, protocol=2)  # plain pickle, not a torch zip
    torch.save({"a": vectors(), "b": vectors()}, tmp_path / "two.pt")
    torch.save({"string_to_param": {"*": vectors(), "+": vectors()}}, tmp_path / "twoterms.pt")
    torch.save({"name": "x", "step": 3}, tmp_path / "notensor.pt")
    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "photo.png")
    (tmp_path / "notes.txt").write_text("hello")
    before = sorted(p.name for p in tmp_path.iterdir())

    cases = {
        "missing.pt": "not found",
        "empty.pt": "empty",
        "garbage.safetensors": "not a readable .safetensors file",
        "truncated.safetensors": "not a readable .safetensors file",
        "hostile.pt": "posix.mkdir",
        "hostile_raw.bin": "posix.mkdir",
        "two.pt": "2 tensors",
        "twoterms.pt": "2 entries",
        "notensor.pt": "no tensor",
        "photo.png": "no embedding",
        "notes.txt": "unknown embedding file type",
    }
    for name, fragment in cases.items():
        expect_user_error(lambda name=name: load_embedding(tmp_path / name), name, fragment)
    assert not marker.exists()  # the hostile pickle never ran
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_save_never_overwrites_silently(tmp_path):
    first = save_embedding(sample(), tmp_path / "myemb.pt")
    original = first.read_bytes()
    other = Embedding("myemb", vectors(seed=7))
    expect_user_error(lambda: save_embedding(other, first), "myemb.pt", "overwrite")
    assert first.read_bytes() == original
    save_embedding(other, first, overwrite=True)
    assert torch.equal(load_embedding(first).vectors, other.vectors)

    expect_user_error(lambda: save_embedding(other, tmp_path / "myemb.ckpt"), "myemb.ckpt", ".safetensors")
    flat = Embedding("flat", torch.zeros(768))
    expect_user_error(lambda: save_embedding(flat, tmp_path / "flat.pt"), "flat.pt", "[num_vectors, width]")
    odd = Embedding("odd", vectors(), metadata={"ti.lr": 0.1})
    expect_user_error(lambda: save_embedding(odd, tmp_path / "odd.safetensors"), "ti.lr", "strings")
    picture = Image.new("RGB", (8, 8))
    expect_user_error(lambda: save_embedding(other, tmp_path / "x.pt", image=picture), "x.pt", ".png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["myemb.pt"]


def test_zero_vectors_make_a_valid_png(tmp_path):
    # A fresh embedding with empty init text is all zeros; A1111 would divide by zero shading the dots.
    path = save_embedding(Embedding("blank", torch.zeros(2, 768), step=0), tmp_path / "blank.png")
    with Image.open(path) as saved:
        assert torch.equal(reference_extract(saved)["string_to_param"]["*"].float(), torch.zeros(2, 768))
