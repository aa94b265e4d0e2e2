"""Scores and the recommended step: CLIP wiring on a tiny random CLIP, the logic on synthetic curves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from library.errors import UserError
from library.recommendation import StepScores, judge, recommend, step_curves
from library.scoring import (
    CellScores,
    CLIPScorer,
    Scorer,
    adherence_prompt,
    load_clip_scorer,
    load_references,
    reference_likeness,
    score_cell,
)
from tests.helpers import make_images

RULES = dict(collapse_ratio=0.5, adherence_drop=0.1)


def tiny_clip_folder(tmp_path: Path) -> Path:
    """A randomly initialised CLIP saved in transformers layout without tokenizer files (64-wide, 1 head)."""
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path / "clip"
    if not folder.exists():
        common = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=1,
            hidden_act="quick_gelu",
        )
        config = CLIPConfig(
            text_config=dict(vocab_size=49408, max_position_embeddings=77, **common),
            vision_config=dict(image_size=32, patch_size=8, **common),
            projection_dim=16,
        )
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(folder)
    return folder


def curve(checkpoint: str, rows: list[tuple[int, list[float], float, float]]) -> list[StepScores]:
    """rows: (step, likeness per image, adherence, seed likeness)."""
    return [
        StepScores(checkpoint, step, tuple(lk), (seeds,) * len(lk), (adh,) * len(lk))
        for step, lk, adh, seeds in rows
    ]


# --------------------------------------------------------------------------------------------------
# The recommendation on synthetic curves


def test_first_step_where_every_image_passes_on_every_checkpoint():
    trained = curve(
        "base",
        [
            (20, [0.5, 0.7], 0.30, 0.5),
            (40, [0.66, 0.7], 0.30, 0.5),
            (60, [0.7, 0.8], 0.30, 0.5),
            (80, [0.8, 0.9], 0.30, 0.5),
        ],
    )
    other = curve(
        "other",
        [
            (20, [0.5, 0.5], 0.30, 0.5),
            (40, [0.6, 0.7], 0.30, 0.5),
            (60, [0.66, 0.7], 0.3, 0.5),
            (80, [0.7, 0.7], 0.30, 0.5),
        ],
    )
    rec = recommend(trained + other, 0.65, **RULES)
    assert rec.step == 60  # base passes from 40 (its lowest image 0.66), the other checkpoint only from 60
    assert "on every checkpoint" in rec.reason and "base: 40, other: 60" in rec.reason
    assert rec.verdict("base", 40).passes and not rec.verdict("other", 40).passes
    assert recommend(trained, 0.65, **RULES).step == 40


def test_one_failing_seed_keeps_a_step_from_passing():
    scores = curve("base", [(20, [0.9, 0.9, 0.9, 0.2], 0.3, 0.5), (40, [0.9, 0.9, 0.9, 0.7], 0.3, 0.5)])
    assert recommend(scores, 0.65, **RULES).step == 40


def test_flags_for_falling_adherence_and_one_look():
    scores = curve(
        "base",
        [(20, [0.5], 0.30, 0.50), (40, [0.7], 0.29, 0.60), (60, [0.8], 0.25, 0.70), (80, [0.9], 0.31, 0.80)],
    )
    verdicts = {v.step: v.flags for v in judge(scores, 0.65, **RULES)}
    # adherence: 0.25 is more than 10 % under the best so far (0.30); variety 0.2 < half the first step's 0.5
    assert verdicts == {20: (), 40: (), 60: ("adherence falls",), 80: ("one look",)}
    rec = recommend(curve("base", [(20, [0.5], 0.30, 0.5), (40, [0.7], 0.2, 0.9)]), 0.65, **RULES)
    assert rec.step == 40 and "adherence falls on base" in rec.reason and "one look on base" in rec.reason


def test_no_step_passes_or_not_validated_elsewhere():
    rec = recommend(curve("base", [(20, [0.3], 0.3, 0.5), (40, [0.5], 0.3, 0.5)]), 0.65, **RULES)
    assert rec.step is None and "no step reaches the likeness bar" in rec.reason and "step 40" in rec.reason
    both = curve("base", [(20, [0.3], 0.3, 0.5), (40, [0.7], 0.3, 0.5)]) + curve(
        "other", [(20, [0.3], 0.3, 0.5), (40, [0.4], 0.3, 0.5)]
    )
    rec = recommend(both, 0.65, **RULES)
    assert rec.step == 40 and "not validated" in rec.reason and "other" in rec.reason


def test_step_curves_pool_cells_of_one_step():
    a = CellScores((0.1, 0.2), (0.5, 0.5), (0.3, 0.3))
    b = CellScores((0.3,), (), (0.2,))
    curves = step_curves([("base", 20, a), ("base", 20, b), ("other", 20, a)])
    assert [(c.checkpoint, c.step, c.likeness) for c in curves] == [
        ("base", 20, (0.1, 0.2, 0.3)),
        ("other", 20, (0.1, 0.2)),
    ]
    assert curves[0].min_likeness == 0.1 and curves[0].variety == pytest.approx(0.5)
    assert StepScores("c", 1, (0.5,), (), (0.2,)).variety is None


def test_adherence_prompt_replaces_the_trigger_word_and_drops_emphasis():
    prompt = "a (photo:1.2) of Fr3nchl4dy-20 and fr3nchl4dy, [greek] island BREAK sunset"
    assert (
        adherence_prompt(prompt, "fr3nchl4dy", "woman") == "a photo of woman and woman, greek island sunset"
    )


# --------------------------------------------------------------------------------------------------
# CLIP wiring


class FixedScorer:
    """A stand-in scorer (as a toy world's would be): likeness = 1 - |mean grey difference| / 255."""

    @staticmethod
    def _grey(image: Image.Image) -> float:
        return sum(image.convert("L").getdata()) / (image.width * image.height)

    def likeness(self, images, references):
        return [
            sum(1 - abs(self._grey(i) - self._grey(r)) / 255 for r in references) / len(references)
            for i in images
        ]

    def adherence(self, images, prompt):
        return [0.25 for _ in images]


def test_any_scorer_fits_the_protocol():
    scorer: Scorer = FixedScorer()
    dark, light = Image.new("RGB", (4, 4), (0, 0, 0)), Image.new("RGB", (4, 4), (255, 255, 255))
    result = score_cell(scorer, [dark, light], [dark], "a photo")
    assert (
        result.likeness == (1.0, 0.0)
        and result.seed_likeness == (0.0, 0.0)
        and result.adherence == (0.25, 0.25)
    )
    assert reference_likeness(scorer, [dark, dark]) == 1.0 and reference_likeness(scorer, [dark]) == 1.0


def test_clip_scorer_from_a_folder_and_from_a_weights_file(tmp_path):
    folder = tiny_clip_folder(tmp_path)
    scorer = load_clip_scorer(folder)
    assert isinstance(scorer, CLIPScorer) and scorer.image_size == 32
    images = [
        Image.open(p).convert("RGB")
        for p in sorted(make_images(tmp_path / "img", count=3, size=40).glob("*.png"))
    ]
    same = scorer.likeness(images[:1], images[:1])
    assert same == [pytest.approx(1.0, abs=1e-5)]
    values = scorer.likeness(images, images[1:])
    assert len(values) == 3 and all(-1 <= v <= 1 for v in values)
    adherence = scorer.adherence(images, "a photo of a red square")
    assert len(adherence) == 3 and all(-1 <= v <= 1 for v in adherence)
    # The weights file alone: the architecture is read from the tensor shapes; same features.
    alone = tmp_path / "alone"
    alone.mkdir()
    (folder / "model.safetensors").rename(alone / "clip.safetensors")
    from_file = load_clip_scorer(alone / "clip.safetensors")
    assert torch.allclose(from_file.image_features(images), scorer.image_features(images), atol=1e-5)
    assert torch.allclose(
        from_file.text_features("a red square"), scorer.text_features("a red square"), atol=1e-5
    )


def test_missing_or_wrong_scoring_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="scoring model not found"):
        load_clip_scorer(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_clip_scorer(tmp_path / "empty")
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="not a transformers CLIP checkpoint"):
        load_clip_scorer(tmp_path / "other.safetensors")


def test_references_come_from_the_folder_as_rgb(tmp_path):
    folder = make_images(tmp_path / "refs", count=3, size=24)
    Image.new("RGBA", (8, 8)).save(folder / "alpha.png")
    references = load_references(str(folder))
    assert len(references) == 4 and all(r.mode == "RGB" for r in references)
    with pytest.raises(UserError, match="scoring.reference_dir"):
        load_references("", None)
