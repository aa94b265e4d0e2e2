"""Scores that make the choice of a step less of a guess.

Three numbers per rendered image, from an image-text model the user points to (a local CLIP, offline):
- likeness: mean cosine similarity of the image to the training images (is it the character?);
- seed likeness: mean similarity to the other seeds of the same cell (high = every seed has one look);
- adherence: similarity to the prompt with the trigger word replaced by a class word (does it still
  follow the prompt, or has the embedding taken over?).

library/recommendation.py pools them per step and turns them into the recommended step. Any object with
`likeness`, `adherence` and `forget` (the `Scorer` protocol) can stand in for CLIP; the toy world's scorer
(`scoring.model = "builtin:toy"`, library/toy.py) is one.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError

from library.errors import UserError, first_line
from library.files import read_weights
from library.prompts import BREAK, parse_prompt_attention

# OpenAI CLIP's preprocessing constants, used when the model folder has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_FEATURE_BATCH = 32  # images per CLIP call
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class Scorer(Protocol):
    """What the sweep needs from a scoring model."""

    def likeness(self, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> list[float]:
        """Per image: how alike it is to the references (mean over the references)."""
        ...

    def adherence(self, images: Sequence[Image.Image], prompt: str) -> list[float]:
        """Per image: how well it matches the prompt."""
        ...

    def forget(self) -> None:
        """Drop whatever was cached for the images of one checkpoint."""
        ...


# --------------------------------------------------------------------------------------------------
# CLIP


class CLIPScorer:
    """Cosine similarities of CLIP image and text features. Image features are cached per image object."""

    def __init__(self, model, tokenizer, *, image_size: int, mean, std, device="cpu"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.device = torch.device(device)
        self._cache: dict[int, tuple[Image.Image, torch.Tensor]] = {}

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        """CLIP preprocessing: shortest side to image_size (bicubic), centre crop, normalise."""
        image = image.convert("RGB")
        scale = self.image_size / min(image.size)
        size = (
            max(self.image_size, round(image.width * scale)),
            max(self.image_size, round(image.height * scale)),
        )
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        image = image.crop((left, top, left + self.image_size, top + self.image_size))
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (array - self.mean) / self.std

    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-length image features [len(images), dim] (float32, CPU)."""
        missing = list({id(image): image for image in images if id(image) not in self._cache}.values())
        dtype = next(self.model.parameters()).dtype
        for start in range(0, len(missing), _FEATURE_BATCH):
            batch = missing[start : start + _FEATURE_BATCH]
            pixels = torch.stack([self._pixels(image) for image in batch]).to(self.device, dtype)
            with torch.inference_mode():
                features = _as_tensor(self.model.get_image_features(pixel_values=pixels)).float().cpu()
            for image, feature in zip(batch, torch.nn.functional.normalize(features, dim=-1), strict=True):
                self._cache[id(image)] = (image, feature)  # the image is kept so its id is never reused
        return torch.stack([self._cache[id(image)][1] for image in images])

    def text_features(self, prompt: str) -> torch.Tensor:
        length = self.model.config.text_config.max_position_embeddings
        ids = self.tokenizer(
            [prompt], padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        )
        with torch.inference_mode():
            features = self.model.get_text_features(input_ids=ids.input_ids.to(self.device))
        return torch.nn.functional.normalize(_as_tensor(features).float().cpu(), dim=-1)[0]

    def likeness(self, images, references) -> list[float]:
        if not images:
            return []
        if not references:
            raise ValueError("likeness needs at least one reference image")
        similarity = self.image_features(images) @ self.image_features(references).T
        return similarity.mean(dim=1).tolist()

    def adherence(self, images, prompt: str) -> list[float]:
        if not images:
            return []
        return (self.image_features(images) @ self.text_features(prompt)).tolist()

    def forget(self) -> None:
        """Drop cached image features (and the images they keep alive)."""
        self._cache.clear()


def _as_tensor(output) -> torch.Tensor:
    # transformers 5 may return a model output object where 4.x returned the pooled features.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_scorer(model: str, device="cpu") -> Scorer:
    """The scorer `scoring.model` names: "builtin:toy" (the toy world's scorer CNN, library/toy.py) or a
    local CLIP."""
    if model == "builtin:toy":
        from library.toy import ToyScorer

        return ToyScorer()
    return load_clip_scorer(model, device)


def load_clip_scorer(path: str | Path, device="cpu") -> CLIPScorer:
    """A CLIPScorer from a local folder (transformers layout) or a weights file, never the network.

    A file is read with the config.json beside it; without one, its architecture is read from the tensor
    shapes as an OpenAI-style CLIP (quick_gelu, 64-wide attention heads). A folder without tokenizer files
    uses the CLIP tokenizer that ships with the project (the same vocabulary).
    """
    from transformers import CLIPModel

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"{path}: no config.json; give a CLIP folder in transformers layout or its weights file"
            )
        try:
            model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=dtype)
        except (OSError, ValueError, RuntimeError, SafetensorError) as error:  # missing, damaged or cut files
            raise UserError(
                f"{path}: cannot load a CLIP model ({str(error).splitlines()[0][:200]})"
            ) from None
    elif path.is_file():
        state = _read_weights(path)
        config = _clip_config(folder) if (folder / "config.json").is_file() else _infer_config(state, path)
        model = CLIPModel(config)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as error:  # tensors of other shapes than the config's; line 2 names the first
            detail = " ".join(str(error).splitlines()[1:2]).strip()[:200]
            raise UserError(f"{path}: not a transformers CLIP checkpoint ({detail})") from None
        missing = [key for key in missing if not key.endswith("position_ids")]
        if missing or [key for key in unexpected if not key.endswith("position_ids")]:
            raise UserError(
                f"{path}: not a transformers CLIP checkpoint (missing {missing[:3]}); give a CLIP folder"
            )
        model.to(dtype)
    else:
        raise UserError(f"{path}: scoring model not found; give a local CLIP folder or file (scoring.model)")
    from library.models import tokenizer_from_folder
    from library.parts import load_tokenizer

    if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
        tokenizer = tokenizer_from_folder(folder)
    else:
        tokenizer = load_tokenizer("sd1")
    image_size, mean, std = _preprocessing(folder, model.config.vision_config.image_size)
    return CLIPScorer(model, tokenizer, image_size=image_size, mean=mean, std=std, device=device)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    return read_weights(path, "weights file", "give a CLIP folder or its .safetensors weights")[0]


def _clip_config(folder: Path):
    from transformers import CLIPConfig

    try:
        return CLIPConfig.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as error:  # transformers wraps broken JSON in an OSError
        raise UserError(
            f"{folder / 'config.json'}: cannot read the CLIP config ({first_line(error)})"
        ) from None


def _heads(width: int) -> int:
    # CLIP towers use 64-wide heads, except ViT-H and ViT-bigG vision towers (16 heads of 80 / 104).
    return {1280: 16, 1664: 16}.get(width, max(1, width // 64))


def _infer_config(state: dict[str, torch.Tensor], path: Path):
    from transformers import CLIPConfig

    def count_layers(prefix: str) -> int:
        pattern = re.compile(rf"^{prefix}\.encoder\.layers\.(\d+)\.")
        return 1 + max((int(m.group(1)) for key in state if (m := pattern.match(key))), default=-1)

    try:
        v, t = "vision_model", "text_model"
        patch = state[f"{v}.embeddings.patch_embedding.weight"].shape[-1]
        positions = state[f"{v}.embeddings.position_embedding.weight"].shape[0]
        vision_width = state[f"{v}.embeddings.class_embedding"].shape[0]
        vocab, text_width = state[f"{t}.embeddings.token_embedding.weight"].shape
        vision = dict(
            hidden_size=vision_width,
            patch_size=patch,
            image_size=patch * math.isqrt(positions - 1),
            num_hidden_layers=count_layers(v),
            num_attention_heads=_heads(vision_width),
            intermediate_size=state[f"{v}.encoder.layers.0.mlp.fc1.weight"].shape[0],
            hidden_act="quick_gelu",
        )
        text = dict(
            vocab_size=vocab,
            hidden_size=text_width,
            num_hidden_layers=count_layers(t),
            num_attention_heads=_heads(text_width),
            hidden_act="quick_gelu",
            intermediate_size=state[f"{t}.encoder.layers.0.mlp.fc1.weight"].shape[0],
            max_position_embeddings=state[f"{t}.embeddings.position_embedding.weight"].shape[0],
        )
        projection = state["visual_projection.weight"].shape[0]
    except KeyError as error:
        raise UserError(
            f"{path}: no {error.args[0]!r}; not a transformers CLIP checkpoint: give a CLIP folder with config.json"
        ) from None
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)


def _preprocessing(folder: Path, image_size: int) -> tuple[int, tuple, tuple]:
    file = folder / "preprocessor_config.json"
    if not file.is_file():
        return image_size, CLIP_MEAN, CLIP_STD
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
        crop = settings.get("crop_size", image_size)
        crop = crop.get("height", image_size) if isinstance(crop, dict) else int(crop)
        return crop, tuple(settings.get("image_mean", CLIP_MEAN)), tuple(settings.get("image_std", CLIP_STD))
    except (ValueError, TypeError, AttributeError) as error:  # broken JSON, or values of the wrong kind
        raise UserError(f"{file}: not valid JSON CLIP preprocessing settings ({first_line(error)})") from None


# --------------------------------------------------------------------------------------------------
# Scoring cells


def adherence_prompt(prompt: str, name: str, class_word: str) -> str:
    """The prompt as CLIP should read it: the trigger word (any `NAME-N`) becomes the class word, and
    A1111's emphasis brackets and weights are dropped."""
    pattern = re.compile(rf"(?<![\w]){re.escape(name)}(?:-\d+)?(?!\w)", re.IGNORECASE)
    text = " ".join(piece for piece, weight in parse_prompt_attention(prompt) if [piece, weight] != BREAK)
    text = re.sub(r"\s+([,.;:!?])", r"\1", re.sub(r"\s+", " ", text))
    return pattern.sub(class_word, text).strip()


def reference_likeness(scorer: Scorer, references: Sequence[Image.Image]) -> float:
    """How alike the training images are to each other (mean leave-one-out likeness); 1.0 for one image."""
    if len(references) < 2:
        return 1.0
    values = [
        scorer.likeness([ref], [*references[:i], *references[i + 1 :]])[0] for i, ref in enumerate(references)
    ]
    return float(np.mean(values))


def score_cell(scorer: Scorer, images: Sequence[Image.Image], references, prompt: str) -> CellScores:
    """Likeness, seed likeness and adherence per image of one cell; seed likeness is empty for one image."""
    likeness = scorer.likeness(images, references)
    seeds = []
    if len(images) > 1:
        seeds = [scorer.likeness([img], [*images[:i], *images[i + 1 :]])[0] for i, img in enumerate(images)]
    return CellScores(tuple(likeness), tuple(seeds), tuple(scorer.adherence(images, prompt)))


def load_references(reference_dir: str, dataset=None) -> list[Image.Image]:
    """The training images as RGB: `reference_dir` (a flat or Kohya folder), else the run's [dataset] table."""
    from library.images import open_image, split_rgb_alpha
    from library.kohya_dataset import scan_images
    from library.tables import DatasetConfig

    if reference_dir:
        if not Path(reference_dir).expanduser().is_dir():
            raise UserError(
                f"scoring.reference_dir {reference_dir}: not a folder; give the training images' folder"
            )
        settings = DatasetConfig(image_dir=reference_dir)
    elif dataset is not None:
        settings = dataset
    else:
        raise UserError(
            "scores need the training images: set scoring.reference_dir (the run has no config.toml)"
        )
    paths = list(dict.fromkeys(record.path for record in scan_images(settings)))
    return [split_rgb_alpha(open_image(path))[0] for path in paths]


@dataclass(frozen=True)
class CellScores:
    likeness: tuple[float, ...]
    seed_likeness: tuple[float, ...]
    adherence: tuple[float, ...]
