"""Exponential backoff: the one helper every retry loop of the project uses.

A `Backoff` hands out the delays of one retry loop: `first`, then doubled each time up to `cap`;
`reset()` starts over after a success. It only computes delays, so each caller waits the way its
loop needs (`asyncio.sleep`, an event with a timeout, a deadline's remaining time).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays first, 2 x first, 4 x first, ... capped at `cap` seconds."""

    first: float = 0.05
    cap: float = 1.0
    factor: float = 2.0
    _next: float = field(init=False)

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.cap:
            raise ValueError(f"backoff needs 0 < first <= cap, got {self.first} and {self.cap}")
        if self.factor < 1:
            raise ValueError(f"backoff factor must be >= 1, got {self.factor}")
        self._next = self.first

    @property
    def delay(self) -> float:
        """The delay the next `step()` returns."""
        return self._next

    def step(self) -> float:
        """The delay to wait now; the following one grows."""
        delay = self._next
        self._next = min(self._next * self.factor, self.cap)
        return delay

    def reset(self) -> None:
        """Start again from `first` (after a success)."""
        self._next = self.first

    async def sleep(self) -> None:
        """Wait the next delay."""
        await asyncio.sleep(self.step())
