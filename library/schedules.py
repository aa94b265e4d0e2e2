"""Learning-rate and gradient-clipping schedules: A1111 schedule strings, constant, cosine, linear.

A1111 schedule string (FACTS §2): `rate:step, rate:step, …, rate`. Steps count optimizer updates; a rate
holds while fewer than `step` updates are done; a bare last rate (or `rate:-1`) holds until max_steps and
ends parsing; a step beyond max_steps is clamped and ends parsing; a list that ends in `rate:step` before
max_steps stops training there. Deliberate difference from A1111: steps that do not increase are an error
(A1111 silently skips or stops on them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from library.errors import UserError

Segment = tuple[float, int]  # (rate, end_step): the rate holds while updates_done < end_step


def parse_lr_schedule(
    text: str | float, max_steps: int, start_step: int = 0, what: str = "lr"
) -> list[Segment]:
    """Parse an A1111 schedule string into `(rate, end_step)` segments, skipping those already passed.

    Raises `UserError` naming the bad piece for malformed input such as `0.05:10.5`.
    """
    if isinstance(text, int | float):
        text = repr(float(text))
    segments: list[Segment] = []
    previous_end = 0
    pieces = [p.strip() for p in text.split(",")]
    for piece in pieces:
        rate_text, sep, step_text = piece.partition(":")
        rate = _parse_rate(rate_text, text, what)
        if not sep or step_text.strip() == "-1":
            end = max_steps
        else:
            end = _parse_step(step_text, text, what)
            if end <= previous_end:
                raise UserError(
                    f"{what} schedule '{text}': step {end} does not come after step {previous_end}; "
                    "list the steps in increasing order"
                )
        previous_end = end
        if end > start_step or end == max_steps:
            segments.append((rate, min(end, max_steps)))
        if not sep or step_text.strip() == "-1" or end >= max_steps:
            break
    if not segments:
        raise UserError(f"{what} schedule '{text}': every segment ends before step {start_step}; extend it")
    return segments


def _parse_rate(rate_text: str, text: str, what: str) -> float:
    try:
        rate = float(rate_text)
    except ValueError:
        raise UserError(f"{what} schedule '{text}': '{rate_text.strip()}' is not a number") from None
    if not math.isfinite(rate) or rate < 0:
        raise UserError(f"{what} schedule '{text}': rate {rate_text.strip()} must be a positive number")
    return rate


def _parse_step(step_text: str, text: str, what: str) -> int:
    try:
        step = int(step_text.strip())
    except ValueError:
        raise UserError(
            f"{what} schedule '{text}': step '{step_text.strip()}' must be a whole number of steps, "
            "e.g. 0.05:10"
        ) from None
    if step <= 0:
        raise UserError(f"{what} schedule '{text}': step {step} must be positive (or -1 for 'until the end')")
    return step


@dataclass(frozen=True)
class Schedule:
    """A value (learning rate or clip threshold) as a pure function of updates done: resume-safe."""

    segments: tuple[Segment, ...]
    shape: str = "constant"  # constant | cosine | linear, applied across the whole run
    warmup_steps: int = 0
    max_steps: int = 0

    @property
    def end_step(self) -> int:
        """Training stops when this many updates are done (earlier than max_steps if the list says so)."""
        return self.segments[-1][1]

    def value(self, step: int) -> float:
        """The value for the update that follows `step` updates done."""
        rate = next((r for r, end in self.segments if step < end), self.segments[-1][0])
        if self.warmup_steps and step < self.warmup_steps:
            return rate * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        if self.shape == "cosine":
            return rate * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if self.shape == "linear":
            return rate * max(0.0, 1.0 - progress)
        return rate


def build_schedule(
    value: str | float, max_steps: int, shape: str = "constant", warmup_steps: int = 0, what: str = "lr"
) -> Schedule:
    """A `Schedule` from a number or an A1111 schedule string."""
    segments = tuple(parse_lr_schedule(value, max_steps, what=what))
    if shape != "constant" and len(segments) > 1:
        raise UserError(f"{what} = '{value}' is a schedule string; use lr_scheduler = \"constant\" with it")
    return Schedule(segments, shape, warmup_steps, max_steps)
