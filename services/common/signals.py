"""Turns SIGINT/SIGTERM into an asyncio.Event so a service can shut down gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_event() -> Iterator[asyncio.Event]:
    """An event set on SIGINT or SIGTERM while the block runs (call it from the event loop).

    Outside the main thread asyncio cannot handle signals; the event is then only set by its owner.
    """
    loop = asyncio.get_running_loop()
    event = asyncio.Event()
    handled = []
    for sig in STOP_SIGNALS:
        try:
            loop.add_signal_handler(sig, event.set)
        except (NotImplementedError, RuntimeError, ValueError):
            continue
        handled.append(sig)
    try:
        yield event
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
