"""Stop strings matched on streamed text: text that might be the start of a stop string is held
back until the next pieces show whether it is, so no part of a stop string is ever released."""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Feed text deltas in order; each call returns what is safe to release now."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in dict.fromkeys(stops) if s)
        # Every proper prefix of a stop string: the suffixes worth holding back.
        self._prefixes = {s[:i] for s in self._stops for i in range(1, len(s))}
        self._longest_prefix = max((len(p) for p in self._prefixes), default=0)
        self._held = ""

    @property
    def held(self) -> str:
        return self._held

    def feed(self, text: str, *, active: bool = True) -> tuple[str, str | None]:
        """Add `text`; return (text to release, the stop string matched or None).

        When a stop string matches, the text before it is released and the rest is dropped: the
        caller ends the sequence. With `active=False` (min_tokens not reached yet) stop strings
        are not looked for and everything, including held-back text, is released.
        """
        if not self._stops:
            return text, None
        buffer = self._held + text
        if not active:
            self._held = ""
            return buffer, None
        first: tuple[int, str] | None = None
        for stop in self._stops:
            at = buffer.find(stop)
            if at >= 0 and (first is None or at < first[0]):
                first = (at, stop)
        if first is not None:
            self._held = ""
            return buffer[: first[0]], first[1]
        keep = 0
        for size in range(min(len(buffer), self._longest_prefix), 0, -1):
            if buffer[-size:] in self._prefixes:
                keep = size
                break
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], None

    def flush(self) -> str:
        """Release held-back text: generation ended without completing a stop string."""
        held, self._held = self._held, ""
        return held
