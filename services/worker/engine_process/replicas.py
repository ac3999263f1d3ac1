"""`ReplicaPool`: one model served by its replicas in one or more engine processes, behind the
Engine interface the servicer uses, and `create_process_engines`, which builds a worker's pools.

A generation goes to the replica with the fewest in flight, preferring the one its prompt's
prefix maps to: each replica has its own prefix cache, so the turns of a conversation should keep
meeting the replica that holds its history.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import zlib
from collections.abc import AsyncIterator, Sequence

from services.common.errors import UnavailableError
from services.worker.engine.interface import (
    ChatMessage,
    ChatPrompt,
    Conversation,
    Engine,
    EngineStats,
    GenerationChunk,
    GenerationRequest,
    LoadInfo,
    ModelDescription,
    Prompt,
)
from services.worker.engine.loading import (
    EngineOptions,
    ModelKind,
    ModelSpec,
    plan_load,
    resolve_device,
)
from services.worker.engine_process.client import EngineProcessClient
from services.worker.engine_process.pipe import Op
from services.worker.engine_process.sizing import auto_replicas, replica_options

# How many more generations in flight the replica holding a prompt's prefix may have than the
# least busy one before the prompt goes elsewhere (and is prefilled from scratch there).
AFFINITY_SLACK = 1
# What identifies a prompt's prefix for routing: the first messages of a conversation (the system
# prompt and the first question stay while the history grows), the start of a text or of token ids.
_PREFIX_MESSAGES, _PREFIX_CHARS, _PREFIX_IDS = 2, 256, 64


def create_process_engines(
    specs: Sequence[ModelSpec], options: EngineOptions, replicas: int | None = 1
) -> list[ReplicaPool]:
    """Engines for `specs`, run by `replicas` child processes (None: `auto_replicas`) that each
    load every model, each with its share of the machine (sizing.replica_options). Paths are
    checked here, before anything is spawned."""
    if replicas is None:
        replicas = auto_replicas(specs, options)
    share = replica_options(options, replicas)
    descriptions = [_planned_description(spec, share) for spec in specs]
    # CPU replicas sized here (no --threads) lend their cores to a lone busy one (cores.py).
    busy_processes = None
    if replicas > 1 and options.threads is None and resolve_device(options.device).type == "cpu":
        busy_processes = multiprocessing.get_context("spawn").Value("i", 0)
    processes = [EngineProcessClient(specs, share, busy_processes) for _ in range(replicas)]
    return [ReplicaPool(processes, i, d, share.max_running) for i, d in enumerate(descriptions)]


class ReplicaPool(Engine):
    """Model `index` of the engine processes `processes` (one replica in each)."""

    def __init__(
        self,
        processes: Sequence[EngineProcessClient],
        index: int,
        description: ModelDescription,
        max_running: int,
    ) -> None:
        self._processes = tuple(processes)
        self._index = index
        self._description = description
        self._max_running = max_running  # per replica
        self._turn = itertools.count()
        self._started = False
        self._released = False

    @property
    def description(self) -> ModelDescription:
        return self._description

    @property
    def replicas(self) -> int:
        return len(self._processes)

    async def start(self) -> None:
        for process in self._processes:
            process.start()
        # The replicas load at the same time, each on its own cores.
        descriptions = await asyncio.gather(
            *(process.call(Op.START, self._index) for process in self._processes)
        )
        description = descriptions[0]
        assert isinstance(description, ModelDescription)
        self._description = description
        self._started = True

    async def drain(self) -> None:
        if self._started:
            await asyncio.gather(*(p.call(Op.DRAIN, self._index) for p in self._processes))
            # The children are idle; wait for their last chunks and cancellation confirmations,
            # so that the load reads 0 and stop() cuts off nothing in transit.
            await asyncio.gather(*(p.settled(self._index) for p in self._processes))

    async def stop(self) -> None:
        if self._released:
            return
        self._released = True
        if self._started:
            await asyncio.gather(*(_stop_quietly(p, self._index) for p in self._processes))
        await asyncio.gather(*(process.release() for process in self._processes))

    async def failure(self) -> str:
        watches = [asyncio.ensure_future(p.failure()) for p in self._processes]
        try:
            done, _ = await asyncio.wait(watches, return_when=asyncio.FIRST_COMPLETED)
            return done.pop().result()
        finally:
            for watch in watches:
                watch.cancel()

    def load(self) -> LoadInfo:
        # Counted here, not taken from the children's reports: a report is sent only when a
        # child has something to say, so it would go stale when the engine falls idle.
        running = waiting = 0
        for process in self._processes:
            active = process.active_generations(self._index)
            running += min(active, self._max_running)
            waiting += max(0, active - self._max_running)
        return LoadInfo(
            running=running, waiting=waiting, capacity=self._max_running * self.replicas
        )

    def stats(self) -> EngineStats:
        load = self.load()
        reports = [p.stats(self._index) for p in self._processes]
        known = [r for r in reports if r is not None]
        if not known:
            return EngineStats(running=load.running, waiting=load.waiting)
        usages = [r.kv_cache_usage for r in known if r.kv_cache_usage is not None]
        usage = sum(usages) / len(usages) if usages else None
        if usage is not None and load.running == 0 and load.waiting == 0:
            usage = 0.0  # sequences free their cache when they retire: nothing holds any
        return EngineStats(
            running=load.running,
            waiting=load.waiting,
            kv_cache_usage=usage,
            prompt_tokens=sum(r.prompt_tokens for r in known),
            generation_tokens=sum(r.generation_tokens for r in known),
            preemptions=sum(r.preemptions for r in known),
            structured_mask_seconds=sum(r.structured_mask_seconds for r in known),
            step_seconds=sum(r.step_seconds for r in known),
            prefix_cache_queried_tokens=sum(r.prefix_cache_queried_tokens for r in known),
            prefix_cache_hit_tokens=sum(r.prefix_cache_hit_tokens for r in known),
        )

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        return self._pick(prefix_key(request.prompt)).stream(self._index, request)

    async def tokenize(self, prompt: str | ChatPrompt) -> list[int]:
        ids = await self._pick().call(Op.TOKENIZE, self._index, prompt=prompt)
        assert isinstance(ids, list)
        return ids

    async def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        result = await self._pick().call(Op.EMBED, self._index, texts=texts)
        assert isinstance(result, tuple)
        return result

    def _pick(self, key: int | None = None) -> EngineProcessClient:
        """The replica with the fewest generations in flight; ties go round in turn. With a
        prefix `key`, the replica the key maps to while it is at most AFFINITY_SLACK generations
        busier than the least busy one."""
        turn = next(self._turn)
        count = len(self._processes)
        order = [self._processes[(turn + i) % count] for i in range(count)]
        least = min(order, key=lambda p: p.active_generations(self._index))
        if key is None or count == 1:
            return least
        preferred = self._processes[key % count]
        slack = preferred.active_generations(self._index) - least.active_generations(self._index)
        return preferred if slack <= AFFINITY_SLACK else least


def prefix_key(prompt: Prompt) -> int | None:
    """A stable key of the prompt's beginning, for routing it to the replica that has probably
    cached it; None when the prompt has nothing to key on."""
    if isinstance(prompt, str):
        head = prompt[:_PREFIX_CHARS]
    elif isinstance(prompt, Conversation) or (prompt and isinstance(prompt[0], ChatMessage)):
        messages = prompt.messages if isinstance(prompt, Conversation) else prompt
        head = "\x1e".join(
            f"{m.role}\x1f{m.content}"
            for m in list(messages)[:_PREFIX_MESSAGES]
            if isinstance(m, ChatMessage)
        )
    else:
        head = ",".join(str(t) for t in list(prompt)[:_PREFIX_IDS])
    return zlib.crc32(head.encode("utf-8", "surrogatepass")) if head else None


async def _stop_quietly(process: EngineProcessClient, index: int) -> None:
    with contextlib.suppress(UnavailableError):
        await process.call(Op.STOP, index)


def _planned_description(spec: ModelSpec, options: EngineOptions) -> ModelDescription:
    """What the model is known to be before it is loaded (the child reports the rest)."""
    plan = plan_load(spec, options)
    causal = plan.kind is ModelKind.CAUSAL_LM
    return ModelDescription(
        name=plan.names[0],
        aliases=plan.names[1:],
        context_length=plan.context_length or 0,
        supports_generate=causal,
        supports_chat=causal,
        supports_embeddings=True,
        source=plan.source.display,
    )
