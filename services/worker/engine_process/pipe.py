"""The typed messages on the pipe between the worker and its engine process.

Worker -> engine process: a `Call`, one operation (`Op`) on one of the child's engines. Engine
process -> worker: a `ReplyBatch`, every `Reply` one turn of the child's event loop produced (one
per engine step while decoding) with the engines' counters for metrics. Messages are pickled by
multiprocessing, so payloads are the engine's own picklable dataclasses.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from services.worker.engine.interface import (
    ChatPrompt,
    EngineStats,
    GenerationChunk,
    GenerationRequest,
    ModelDescription,
)


class Op(enum.Enum):
    """What the worker asks of the engine process."""

    START = "start"  # load and warm the engine up; VALUE: its ModelDescription
    STOP = "stop"  # release the engine; VALUE: None
    DRAIN = "drain"  # refuse new work, return once admitted work is done; VALUE: None
    TOKENIZE = "tokenize"  # Call.prompt; VALUE: the token ids
    EMBED = "embed"  # Call.texts; VALUE: (vectors, tokens read)
    GENERATE = "generate"  # Call.request; CHUNKs, then END
    CANCEL = "cancel"  # end the GENERATE call `call_id` early; its END confirms it
    EXIT = "exit"  # stop every started engine and exit; no reply


@dataclass(frozen=True)
class Call:
    """Worker -> engine process: `op` on engine `engine` (its index in the worker's models)."""

    op: Op
    call_id: int = 0  # the replies' key; 0 for EXIT
    engine: int = 0
    # The worker's request id, bound in the child while the call runs (for its log records).
    request_id: str | None = None
    request: GenerationRequest | None = None  # GENERATE
    prompt: str | ChatPrompt | None = None  # TOKENIZE
    texts: tuple[str, ...] = ()  # EMBED


class ReplyKind(enum.Enum):
    CHUNK = "chunk"  # one generated chunk; more follow
    END = "end"  # a generation finished, or was cancelled
    VALUE = "value"  # a unary call's result
    ERROR = "error"  # the call failed with `payload`, an exception


# What a unary call returns (see Op).
Value = ModelDescription | list[int] | tuple[list[list[float]], int] | None


@dataclass(frozen=True)
class Reply:
    """Engine process -> worker: news of call `call_id`."""

    call_id: int
    kind: ReplyKind
    payload: GenerationChunk | Exception | Value = None


@dataclass(frozen=True)
class ReplyBatch:
    """What one turn of the child's event loop produced, and every engine's counters then (None
    for an engine not started)."""

    replies: Sequence[Reply]
    stats: Sequence[EngineStats | None]
