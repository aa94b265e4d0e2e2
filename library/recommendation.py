"""The recommended step: the scores pooled per step, a verdict per step and checkpoint, a step and its reason.

A step *passes* on a checkpoint when every one of its images (every seed of every cell of that step)
reaches the likeness bar. A step is judged on few images, and few images say little: 8 of 8 at the bar
only shows a pass rate above 0.68 (95 % Wilson interval, library/stats.py), so a lucky step can pass
between failing ones. The rule therefore asks for a pass that the next saved step confirms:

    the recommended step is the first step that passes on every checkpoint and whose next saved step
    passes too (twice the images: 16 of 16 shows a pass rate above 0.81).

The first checkpoint (in order of appearance) is the one trained on; the others validate the step. Without
a confirmed step, the first passing step is given and the reason says why it is not confirmed; when no
step passes on every checkpoint, the training checkpoint's first (confirmed, else passing) step, with the
checkpoints it fails on; when none passes at all, no step. Flags: "adherence falls" (mean adherence more
than `adherence_drop` below the best earlier step) and "one look" (seed variety below `collapse_ratio`
of the first step's).

Step 0 (embeddings/NAME-0, the starting vectors before any update) is the baseline: scored and shown like
any step so users see "before", never recommended, and no reference for the flags (a run with NAME-0 gets
the same verdicts on its trained steps as one without).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from library.scoring import CellScores
from library.stats import mean_interval, wilson_interval

BASELINE_STEP = 0  # embeddings/NAME-0: the embedding before training


@dataclass(frozen=True)
class StepScores:
    """The scores of every image of one embedding step on one checkpoint."""

    checkpoint: str
    step: int
    likeness: tuple[float, ...]
    seed_likeness: tuple[float, ...]  # empty when every cell holds a single image
    adherence: tuple[float, ...]

    @property
    def min_likeness(self) -> float:
        return min(self.likeness)

    @property
    def mean_likeness(self) -> float:
        return float(np.mean(self.likeness))

    @property
    def mean_adherence(self) -> float:
        return float(np.mean(self.adherence))

    @property
    def variety(self) -> float | None:
        """1 - mean seed likeness: how different the seeds look (None without several seeds)."""
        return 1.0 - float(np.mean(self.seed_likeness)) if self.seed_likeness else None

    def at_bar(self, bar: float) -> int:
        """How many of the images reach the likeness bar."""
        return sum(value >= bar for value in self.likeness)

    def pass_interval(self, bar: float) -> tuple[float, float]:
        """95 % interval of the share of images that reach the bar."""
        return wilson_interval(self.at_bar(bar), len(self.likeness))

    @property
    def likeness_interval(self) -> tuple[float, float] | None:
        """95 % interval of the mean likeness (None for one image of a continuous score)."""
        return mean_interval(self.likeness)


def step_curves(cells: Sequence[tuple[str, int, CellScores]]) -> list[StepScores]:
    """Pool the cells of each (checkpoint, step) into one StepScores, in order of first appearance."""
    pooled: dict[tuple[str, int], list[CellScores]] = {}
    for checkpoint, step, scores in cells:
        pooled.setdefault((checkpoint, step), []).append(scores)
    return [
        StepScores(
            checkpoint,
            step,
            *(
                tuple(v for c in group for v in getattr(c, key))
                for key in ("likeness", "seed_likeness", "adherence")
            ),
        )
        for (checkpoint, step), group in pooled.items()
    ]


@dataclass(frozen=True)
class StepVerdict:
    checkpoint: str
    step: int
    passes: bool  # every image reaches the likeness bar
    confirmed: bool  # passes, and so does the next saved step on this checkpoint
    flags: tuple[str, ...]  # "adherence falls", "one look"

    @property
    def baseline(self) -> bool:
        return self.step == BASELINE_STEP


@dataclass(frozen=True)
class Recommendation:
    step: int | None
    reason: str
    bar: float
    verdicts: tuple[StepVerdict, ...]
    collapse_ratio: float  # the settings the flags were judged by; 0 = seed variety is not judged
    adherence_drop: float

    def verdict(self, checkpoint: str, step: int) -> StepVerdict | None:
        return next((v for v in self.verdicts if v.checkpoint == checkpoint and v.step == step), None)


def judge(
    curve: Sequence[StepScores], bar: float, *, collapse_ratio: float, adherence_drop: float
) -> list[StepVerdict]:
    """Pass, confirmation and flags for each step of one checkpoint's curve (any order in, ascending out)."""
    curve = sorted(curve, key=lambda s: s.step)
    trained = [s for s in curve if s.step != BASELINE_STEP]
    first_variety = next((s.variety for s in trained if s.variety is not None), None)
    passes = [s.min_likeness >= bar for s in curve]
    verdicts, best_adherence = [], -math.inf
    for i, scores in enumerate(curve):
        flags = []
        if scores.step != BASELINE_STEP:
            if scores.mean_adherence < best_adherence - adherence_drop * abs(best_adherence):
                flags.append("adherence falls")
            if (
                first_variety
                and scores.variety is not None
                and scores.variety < collapse_ratio * first_variety
            ):
                flags.append("one look")
            best_adherence = max(best_adherence, scores.mean_adherence)
        confirmed = passes[i] and i + 1 < len(curve) and passes[i + 1]
        verdicts.append(StepVerdict(scores.checkpoint, scores.step, passes[i], confirmed, tuple(flags)))
    return verdicts


def recommend(
    scores: Sequence[StepScores], bar: float, *, collapse_ratio: float, adherence_drop: float
) -> Recommendation:
    """The first step that passes on every checkpoint and is confirmed by the next saved step, and why
    (the rule and its fall-backs: this module's docstring). Step 0 is never recommended."""
    checkpoints = list(dict.fromkeys(s.checkpoint for s in scores))
    verdicts = [
        v
        for c in checkpoints
        for v in judge(
            [s for s in scores if s.checkpoint == c],
            bar,
            collapse_ratio=collapse_ratio,
            adherence_drop=adherence_drop,
        )
    ]
    table = {(v.checkpoint, v.step): v for v in verdicts}
    images = {(s.checkpoint, s.step): len(s.likeness) for s in scores}
    steps = sorted({v.step for v in verdicts if not v.baseline})

    def everywhere(test: Callable[[StepVerdict], bool]) -> list[int]:
        return [s for s in steps if all((c, s) in table and test(table[(c, s)]) for c in checkpoints)]

    def first(checkpoint: str, test: Callable[[StepVerdict], bool]) -> int | None:
        return next(
            (v.step for v in verdicts if v.checkpoint == checkpoint and not v.baseline and test(v)), None
        )

    # The next saved step on a checkpoint (judge's verdicts ascend per checkpoint).
    def later(checkpoint: str, step: int) -> int | None:
        return next((v.step for v in verdicts if v.checkpoint == checkpoint and v.step > step), None)

    confirmed, passing = everywhere(lambda v: v.confirmed), everywhere(lambda v: v.passes)
    trained_on = checkpoints[0] if checkpoints else ""
    where = "on every checkpoint" if len(checkpoints) > 1 else f"on {trained_on}"
    first_pass = f"the first step where every image reaches the likeness bar ({bar:.3f})"
    own = first(trained_on, lambda v: v.confirmed) or first(trained_on, lambda v: v.passes)
    if confirmed:
        step = confirmed[0]
        nexts = sorted({later(c, step) for c in checkpoints})
        n = sum(images[(c, s)] for c in checkpoints for s in (step, later(c, step)))
        reason = (
            f"step {step}: {first_pass} {where} and the next saved step ({', '.join(map(str, nexts))}) "
            f"confirms it: all {n} images of the two steps pass, a pass rate of at least "
            f"{wilson_interval(n, n)[0]:.2f} (95 % interval)"
        )
        if passing[0] < step:
            reason += f"; step {passing[0]} passed too, but the step after it did not"
    elif passing:
        step = passing[0]
        why = sorted(
            {
                "it is the last saved step"
                if later(c, step) is None
                else f"the next saved step ({later(c, step)}) falls below the bar on {c}"
                for c in checkpoints
                if not table[(c, step)].confirmed
            }
        )
        n = sum(images[(c, step)] for c in checkpoints)
        reason = (
            f"step {step}: {first_pass} {where}, but not confirmed: {' and '.join(why)}; "
            f"its {n} of {n} images only show a pass rate of at least {wilson_interval(n, n)[0]:.2f} "
            "(95 % interval): compare the grid, or sweep later steps"
        )
    elif own is not None:
        step = own
        failing = [c for c in checkpoints if (c, step) not in table or not table[(c, step)].passes]
        reason = (
            f"step {step}: {first_pass} on {trained_on}, but not validated: it falls below the bar on "
            f"{', '.join(failing)}, and no step passes on every checkpoint"
        )
    else:
        step = None
        best = max((s for s in scores if s.step != BASELINE_STEP), key=lambda s: s.min_likeness, default=None)
        if best is None:
            reason = "only step 0 (the embedding before training) was scored: sweep trained steps"
        else:
            reason = (
                f"no step reaches the likeness bar ({bar:.3f}; best: step {best.step} on {best.checkpoint}, "
                f"lowest image {best.min_likeness:.3f}); train longer, check the training images, "
                "or lower scoring.likeness_bar"
            )
    if step is not None and passing and len(checkpoints) > 1:
        firsts = ", ".join(f"{c}: {first(c, lambda v: v.passes)}" for c in checkpoints)
        reason += f" (first passing step per checkpoint: {firsts})"
    flags = sorted(
        {f"{flag} on {c}" for c in checkpoints for flag in getattr(table.get((c, step)), "flags", ())}
    )
    if flags:
        reason += f"; warning at this step: {', '.join(flags)} (it may be over-baked: compare the grid)"
    baseline = [v.checkpoint for v in verdicts if v.baseline and v.passes]
    if baseline:
        reason += (
            f"; note: step 0 (before training) already reaches the bar on {', '.join(baseline)}, so the bar "
            "does not tell the concept from the starting point: raise scoring.likeness_bar"
        )
    return Recommendation(step, reason, bar, tuple(verdicts), collapse_ratio, adherence_drop)
