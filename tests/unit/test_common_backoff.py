"""Backoff: the delays of one retry loop, growing to a cap and starting over after a success."""

from __future__ import annotations

import asyncio

import pytest

from services.common.backoff import Backoff


def test_defaults_double_from_50_ms_up_to_one_second() -> None:
    backoff = Backoff()
    assert [backoff.step() for _ in range(7)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_delay_is_the_next_step_without_taking_it() -> None:
    backoff = Backoff(first=0.2, cap=3.0)
    assert backoff.delay == 0.2
    assert backoff.delay == 0.2
    assert backoff.step() == 0.2
    assert backoff.delay == 0.4


def test_reset_starts_over_after_a_success() -> None:
    backoff = Backoff(first=0.2, cap=0.5)
    assert [backoff.step() for _ in range(3)] == [0.2, 0.4, 0.5]
    backoff.reset()
    assert backoff.step() == 0.2


def test_other_factors_and_a_first_delay_equal_to_the_cap() -> None:
    tripled = Backoff(first=0.1, cap=1.0, factor=3.0)
    assert [round(tripled.step(), 6) for _ in range(4)] == [0.1, 0.3, 0.9, 1.0]
    constant = Backoff(first=0.5, cap=0.5)
    assert [constant.step() for _ in range(3)] == [0.5, 0.5, 0.5]
    steady = Backoff(first=0.1, cap=1.0, factor=1.0)
    assert [steady.step() for _ in range(3)] == [0.1, 0.1, 0.1]


@pytest.mark.parametrize(
    ("first", "cap", "factor"),
    [(0.0, 1.0, 2.0), (-0.1, 1.0, 2.0), (2.0, 1.0, 2.0), (0.1, 1.0, 0.5)],
)
def test_invalid_settings_are_refused(first: float, cap: float, factor: float) -> None:
    with pytest.raises(ValueError):
        Backoff(first=first, cap=cap, factor=factor)


async def test_sleep_waits_the_next_delay_and_grows_it(monkeypatch: pytest.MonkeyPatch) -> None:
    waited: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        waited.append(seconds)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    backoff = Backoff(first=0.05, cap=0.15)
    for _ in range(3):
        await backoff.sleep()
    assert waited == [0.05, 0.1, 0.15]
    assert backoff.delay == 0.15
