"""Stop-string matching over streamed pieces, and the scheduler's admission bookkeeping."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from services.common.errors import OverloadedError, UnavailableError
from services.worker.engine.detokenizer import IncrementalDetokenizer
from services.worker.engine.interface import SamplingParams
from services.worker.engine.sampling import SamplingState
from services.worker.engine.scheduler import EngineState, Scheduler
from services.worker.engine.sequence import SequenceState
from services.worker.engine.stopping import StopStringMatcher


def run(pieces: Sequence[str], stops: Sequence[str]) -> tuple[list[str], str | None]:
    """Feed pieces until a stop matches; return what was released per piece and the match."""
    matcher = StopStringMatcher(stops)
    released: list[str] = []
    for piece in pieces:
        text, matched = matcher.feed(piece)
        released.append(text)
        if matched is not None:
            return released, matched
    released.append(matcher.flush())
    return released, None


def test_stop_split_over_three_pieces_is_never_released() -> None:
    released, matched = run(["Hel", "lo wo", "r", "ld!"], ["o world"])
    assert matched == "o world"
    assert "".join(released) == "Hell"
    assert released == ["Hel", "l", "", ""]  # "o wo", "o wor" were held, not streamed


def test_false_start_is_released_once_it_diverges() -> None:
    released, matched = run(["The ", "sto", "ck", " is ", "stop", "ped"], ["stop"])
    assert matched == "stop"
    assert released == ["The ", "", "stock", " is ", ""]
    assert "".join(released) == "The stock is "


def test_earliest_stop_wins_and_text_after_it_is_dropped() -> None:
    released, matched = run(["abc END and STOP tail"], ["STOP", "END"])
    assert matched == "END" and released == ["abc "]


def test_stop_at_the_very_start_releases_nothing() -> None:
    released, matched = run(["\n\n", "more"], ["\n\n"])
    assert matched == "\n\n" and released == [""]


def test_overlapping_prefixes_hold_the_longest_candidate() -> None:
    matcher = StopStringMatcher(["aab"])
    assert matcher.feed("xa") == ("x", None)
    assert matcher.feed("a") == ("", None)  # "aa" could still become "aab"
    assert matcher.feed("a") == ("a", None)  # "aaa": the first "a" can no longer start it
    assert matcher.feed("b") == ("", "aab")


def test_held_text_is_released_at_the_end_or_while_inactive() -> None:
    matcher = StopStringMatcher(["stop"])
    assert matcher.feed("we st") == ("we ", None)
    assert matcher.flush() == "st"
    inactive = StopStringMatcher(["stop"])
    assert inactive.feed("a stop b", active=False) == ("a stop b", None)
    assert inactive.feed("st") == ("", None)
    assert inactive.feed("op") == ("", "stop")


def test_no_stops_is_a_passthrough() -> None:
    matcher = StopStringMatcher(["", ""])
    assert matcher.feed("anything") == ("anything", None)


def fake_sequence(request_id: str) -> SequenceState:
    return SequenceState(
        request_id=request_id,
        prompt_ids=[1],
        max_tokens=1,
        min_tokens=0,
        stop_ids=frozenset(),
        stop_token_ids=frozenset(),
        sampling=SamplingState(SamplingParams(), vocab_size=4),
        detokenizer=IncrementalDetokenizer(lambda ids: ""),
        matcher=StopStringMatcher(()),
        loop=None,
        queue=asyncio.Queue(),
    )


def test_scheduler_bounds_running_plus_waiting_and_admits_in_order() -> None:
    scheduler = Scheduler(max_running=2, max_waiting=2)
    with pytest.raises(UnavailableError):
        scheduler.submit(fake_sequence("early"))
    scheduler.set_state(EngineState.READY)
    seqs = [fake_sequence(str(i)) for i in range(4)]
    for seq in seqs:
        scheduler.submit(seq)
    with pytest.raises(OverloadedError):
        scheduler.submit(fake_sequence("one too many"))
    assert scheduler.load().waiting == 4
    work = scheduler.next_work()
    assert work is not None and work.running == seqs[:2] and work.retired == []
    assert (scheduler.load().running, scheduler.load().waiting) == (2, 2)
    # A cancelled waiting request leaves the queue at once; a running one at the next step,
    # which hands it over to have its cache freed.
    scheduler.cancel(seqs[3])
    scheduler.cancel(seqs[0])
    assert (scheduler.load().running, scheduler.load().waiting) == (1, 1)
    work = scheduler.next_work()
    assert work is not None and work.running == [seqs[1], seqs[2]] and work.retired == [seqs[0]]
    scheduler.retire(seqs[1])
    assert scheduler.load().running == 1
    # A preempted sequence goes back to the head of the queue.
    scheduler.preempt(seqs[2])
    assert (scheduler.load().running, scheduler.load().waiting) == (0, 1)
    work = scheduler.next_work()
    assert work is not None and work.running == [seqs[2]] and work.retired == [seqs[1]]
    scheduler.set_state(EngineState.STOPPING)
    assert scheduler.next_work() is None
    left, jobs = scheduler.take_all()
    assert left == [seqs[2]] and jobs == []
