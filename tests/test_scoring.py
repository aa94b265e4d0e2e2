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
from library.stats import Z95, mean_interval, t975, wilson_interval
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


def eight(passing: int, low: float = 0.5, high: float = 0.9) -> list[float]:
    """Likeness of 8 seeds, `passing` of them at or above a bar of 0.65."""
    return [high] * passing + [low] * (8 - passing)


def test_a_lucky_pass_needs_the_next_saved_step_to_confirm_it():
    # 40 passes 8/8 between failing steps (a lucky draw), then 80 and 100 pass: 80 is confirmed by 100.
    scores = curve(
        "base",
        [(step, eight(k), 0.3, 0.5) for step, k in ((20, 3), (40, 8), (60, 7), (80, 8), (100, 8))],
    )
    rec = recommend(scores, 0.65, **RULES)
    assert rec.step == 80
    # 16 of 16 images: Wilson's lower 95 % bound is 16 / (16 + 1.96²) = 0.806
    assert "and the next saved step (100) confirms it: all 16 images of the two steps pass" in rec.reason
    assert "a pass rate of at least 0.81 (95 % interval)" in rec.reason
    assert "step 40 passed too, but the step after it did not" in rec.reason
    assert rec.verdict("base", 40).passes and not rec.verdict("base", 40).confirmed
    assert rec.verdict("base", 80).confirmed and not rec.verdict("base", 100).confirmed


def test_a_pass_that_nothing_confirms_is_given_with_the_reason():
    last = recommend(curve("base", [(20, eight(5), 0.3, 0.5), (40, eight(8), 0.3, 0.5)]), 0.65, **RULES)
    # 8 of 8 alone: 8 / (8 + 1.96²) = 0.676
    assert last.step == 40 and "but not confirmed: it is the last saved step" in last.reason
    assert "its 8 of 8 images only show a pass rate of at least 0.68" in last.reason
    falls = curve("base", [(20, eight(8), 0.3, 0.5), (40, eight(7), 0.3, 0.5)]) + curve(
        "other", [(20, eight(8), 0.3, 0.5), (40, eight(8), 0.3, 0.5)]
    )
    rec = recommend(falls, 0.65, **RULES)
    assert (
        rec.step == 20 and "not confirmed: the next saved step (40) falls below the bar on base" in rec.reason
    )
    assert "16 of 16 images only show a pass rate of at least 0.81" in rec.reason


def test_step_0_is_the_baseline_never_recommended_and_no_reference_for_flags():
    trained = [(20, eight(8), 0.30, 0.55), (40, eight(8), 0.30, 0.55), (60, eight(8), 0.24, 0.8)]
    # Before training: every image already at the bar, higher adherence, more variety (1 - 0.0 against
    # 1 - 0.55); as a reference it would flag every trained step.
    with_baseline = curve("base", [(0, eight(8), 0.40, 0.0), *trained])
    rec = recommend(with_baseline, 0.65, **RULES)
    assert rec.step == 20 and "and the next saved step (40) confirms it" in rec.reason
    assert "step 0 (before training) already reaches the bar on base" in rec.reason
    assert rec.verdict("base", 0).baseline and rec.verdict("base", 0).flags == ()
    # The trained steps are judged exactly as in a run without NAME-0.
    without = recommend(curve("base", trained), 0.65, **RULES)
    assert [v for v in rec.verdicts if not v.baseline] == list(without.verdicts)
    assert without.verdict("base", 60).flags == ("adherence falls", "one look")
    only_baseline = recommend(curve("base", [(0, eight(8), 0.4, 0.0)]), 0.65, **RULES)
    assert only_baseline.step is None and "only step 0" in only_baseline.reason


def test_intervals_match_the_textbook_values():
    assert wilson_interval(8, 8) == pytest.approx((8 / (8 + Z95**2), 1.0))  # 0.676 - 1
    assert wilson_interval(6, 8) == pytest.approx((0.4093, 0.9285), abs=1e-4)
    assert wilson_interval(0, 4) == pytest.approx((0.0, 0.4899), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # mean 0.7, standard deviation 0.1, t(2 df) = 4.303: 0.7 ± 4.303 · 0.1 / √3
    assert mean_interval([0.6, 0.7, 0.8]) == pytest.approx((0.4516, 0.9484), abs=1e-4)
    assert mean_interval([1.0, 0.0, 1.0, 1.0]) == wilson_interval(3, 4)  # 0/1 values: a proportion
    assert mean_interval([0.7]) is None and mean_interval([1.0]) == wilson_interval(1, 1)
    assert t975(30) == 2.042 and t975(31) == pytest.approx(2.0395, abs=1e-3)
    assert t975(10_000) == pytest.approx(Z95, abs=1e-3)


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
