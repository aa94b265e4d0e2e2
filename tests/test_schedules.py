"""A1111 learning-rate schedule strings (FACTS §2) and the shapes built on them."""

import pytest

from library.errors import UserError
from library.schedules import build_schedule, parse_lr_schedule

FACE = "0.05:10, 0.02:20, 0.01:60, 0.004:500, 0.002:1000, 0.001:3000, 0.0005"


def test_face_schedule_clamps_at_max_steps_and_stops_parsing():
    assert parse_lr_schedule(FACE, 150) == [(0.05, 10), (0.02, 20), (0.01, 60), (0.004, 150)]


def test_bare_last_rate_runs_to_max_steps():
    assert parse_lr_schedule(FACE, 100_000) == [
        (0.05, 10),
        (0.02, 20),
        (0.01, 60),
        (0.004, 500),
        (0.002, 1000),
        (0.001, 3000),
        (0.0005, 100_000),
    ]


def test_minus_one_means_until_the_end_and_ends_parsing():
    assert parse_lr_schedule("0.01:10, 0.005:-1, 0.001:500", 200) == [(0.01, 10), (0.005, 200)]


def test_plain_number():
    assert parse_lr_schedule("0.002", 150) == [(0.002, 150)]
    assert parse_lr_schedule(0.002, 150) == [(0.002, 150)]


def test_resume_skips_passed_segments():
    assert parse_lr_schedule(FACE, 150, start_step=20) == [(0.01, 60), (0.004, 150)]
    assert parse_lr_schedule(FACE, 150, start_step=19) == [(0.02, 20), (0.01, 60), (0.004, 150)]


def test_list_ending_before_max_steps_stops_training_there():
    schedule = build_schedule("0.01:50, 0.005:80", 150)
    assert schedule.end_step == 80
    assert schedule.value(79) == 0.005


def test_rate_holds_until_its_step():
    schedule = build_schedule(FACE, 150)
    assert [schedule.value(s) for s in (0, 9, 10, 19, 20, 59, 60, 149)] == [
        0.05,
        0.05,
        0.02,
        0.02,
        0.01,
        0.01,
        0.004,
        0.004,
    ]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("0.05:10.5", "'10.5' must be a whole number"),
        ("fast:10", "'fast' is not a number"),
        ("0.05:20, 0.01:10", "does not come after"),
        ("0.05:0", "must be positive"),
        ("-0.1", "positive number"),
    ],
)
def test_bad_schedules_are_clear_errors(text, fragment):
    with pytest.raises(UserError, match=fragment) as info:
        parse_lr_schedule(text, 100)
    assert "\n" not in str(info.value) and text in str(info.value)


def test_warmup_cosine_and_linear():
    cosine = build_schedule(0.01, 110, "cosine", warmup_steps=10)
    assert cosine.value(0) == pytest.approx(0.001)
    assert cosine.value(9) == pytest.approx(0.01)
    assert cosine.value(60) == pytest.approx(0.005)
    assert cosine.value(110) == pytest.approx(0.0)
    linear = build_schedule(0.01, 100, "linear")
    assert linear.value(50) == pytest.approx(0.005)


def test_schedule_string_with_cosine_is_refused():
    with pytest.raises(UserError, match="constant"):
        build_schedule("0.01:10, 0.001", 100, "cosine")
