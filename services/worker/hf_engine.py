"""The transformers engine: one engine thread owns the model and runs a scheduler step loop over
per-request sequences; the event loop side validates, tokenizes (on a helper thread) and reads
each request's queue, so nothing here blocks asyncio.

Each step: admit waiting requests up to max_running, prefill the new ones, advance every other
running sequence by one token (`_decode_step`), sample all rows at once, emit, retire. For now
each sequence keeps its own DynamicCache and `_decode_step` forwards them one by one; only
`_prefill`/`_decode_step` know that, so one batched forward can replace them later.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import enum
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from services.common.errors import (
    InvalidRequestError,
    OverloadedError,
    UnavailableError,
)
from services.worker.constraints import (
    WARM_UP_CONSTRAINT,
    ConstraintCompiler,
    ConstraintError,
    SequenceConstraint,
    TokenMasker,
)
from services.worker.detokenizer import (
    IncrementalDetokenizer,
    byte_fallback_ids,
    make_decode_fn,
)
from services.worker.embedding import embed_token_ids, tokenize_for_embedding, validate_inputs
from services.worker.engine import (
    ChatPrompt,
    Conversation,
    Engine,
    EngineStats,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    LoadInfo,
    ModelDescription,
    SamplingParams,
    StoppingParams,
    TokenLogprob,
    TopLogprob,
)
from services.worker.loading import EngineOptions, LoadedModel, LoadPlan, ModelKind
from services.worker.output_parsing import OUTPUT_MARKERS
from services.worker.prompts import (
    EncodedPrompt,
    encode_prompt,
    output_parsers,
    validate_messages,
)
from services.worker.runner import (
    CAPACITY_QUANTUM,
    ForwardItem,
    HFRunner,
    ModelRunner,
    create_runner,
)
from services.worker.sampling import (
    MAX_TOP_LOGPROBS,
    RowLogprobs,
    SamplingState,
    sample,
    validate_logit_bias,
    validate_sampling,
)
from services.worker.stopping import StopStringMatcher

logger = logging.getLogger(__name__)

T = TypeVar("T")
QueueItem = GenerationChunk | BaseException


@dataclass(eq=False)
class SequenceState:
    """One generation request as the engine thread sees it."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int  # already capped by the context window
    min_tokens: int
    stop_ids: frozenset[int]  # token ids that end the sequence (EOS unless ignore_eos, stop ids)
    stop_token_ids: frozenset[int]  # the request's own, reported as stop_reason
    sampling: SamplingState
    detokenizer: IncrementalDetokenizer
    matcher: StopStringMatcher
    # Where chunks go: the request's event loop and queue (None for nobody, e.g. tests).
    loop: asyncio.AbstractEventLoop | None
    queue: asyncio.Queue[QueueItem]
    output_ids: list[int] = field(default_factory=list)
    # Positions whose keys and values are in the runner's cache. Tokens past it are fed next:
    # the prompt in chunks, then one token per step; 0 again after a preemption.
    computed: int = 0
    cancelled: bool = False  # set from the event loop; the engine thread retires it next step
    finished: bool = False  # the final chunk was produced
    # Tokens whose text is still held back (incomplete character or possible stop string).
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_text: str = ""
    # Echo with prompt logprobs: the engine thread sends the echo chunk once every prompt token
    # is scored, then clears this.
    echo_pending: bool = False
    top_prompt_logprobs: int = 0  # alternatives per prompt token
    # One per prompt token scored so far (the first is NaN: nothing precedes it). Kept across a
    # preemption, so recomputing the prompt never scores or sends it again.
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    # The prompt leaves a reasoning block open: said on the first chunk, for output parsing.
    reasoning_open: bool = False
    sent_any: bool = False
    # Prompt tokens the prefix cache supplied (reported on the last chunk), and whether the
    # cache was asked since the sequence last lost its cache row.
    cached_prompt_tokens: int = 0
    prefix_checked: bool = False

    @property
    def scoring_prompt(self) -> bool:
        """Whether the forward must return every prompt position's logits."""
        return self.echo_pending and len(self.prompt_logprobs) < len(self.prompt_ids)

    @property
    def length(self) -> int:
        """Prompt plus output tokens."""
        return len(self.prompt_ids) + len(self.output_ids)

    def pending_tokens(self, limit: int) -> list[int]:
        """Up to `limit` tokens not in the cache yet: a prompt chunk, the last sampled token, or
        after a preemption the prompt and the output so far."""
        start, n_prompt = self.computed, len(self.prompt_ids)
        end = min(self.length, start + limit)
        if start >= n_prompt:
            return self.output_ids[start - n_prompt : end - n_prompt]
        return self.prompt_ids[start:end] + self.output_ids[: max(0, end - n_prompt)]

    def final_chunk(
        self, text: str, reason: FinishReason, stop_reason: str = ""
    ) -> GenerationChunk:
        chunk = self.take_chunk(text)
        chunk.finish_reason = reason
        chunk.prompt_tokens = len(self.prompt_ids)
        chunk.completion_tokens = len(self.output_ids)
        chunk.cached_prompt_tokens = self.cached_prompt_tokens
        chunk.stop_reason = stop_reason
        self.finished = True
        return chunk

    def take_chunk(self, text: str) -> GenerationChunk:
        chunk = GenerationChunk(
            text=text, token_ids=self.pending_ids, logprobs=self.pending_logprobs
        )
        self.pending_ids, self.pending_logprobs = [], []
        return self.stamp(chunk)

    def stamp(self, chunk: GenerationChunk) -> GenerationChunk:
        """Mark the request's first chunk with what the output parser must know up front."""
        if not self.sent_any:
            self.sent_any = True
            chunk.reasoning_open = self.reasoning_open
        return chunk


@dataclass
class _Counters:
    """Totals for metrics; written by the engine thread only, read by scrapes."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    step_seconds: float = 0.0  # engine steps (forward, masks, sampling), wall time
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0


class EngineState(enum.Enum):
    NEW = "new"
    STARTING = "starting"  # loading and warming up: only internal requests
    READY = "ready"
    DRAINING = "draining"  # finishing admitted work, refusing new work
    STOPPING = "stopping"
    STOPPED = "stopped"


class _Job:
    """A callable to run on the engine thread between steps (embedding forwards)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return  # the caller went away
        try:
            self.future.set_result(self.fn())
        except Exception as exc:  # handed to the awaiting caller, which re-raises it
            self.future.set_exception(exc)


@dataclass
class Work:
    """What one engine-thread iteration does."""

    running: list[SequenceState]  # in admission order
    retired: list[SequenceState]  # left since the last step: their cache is to be freed
    jobs: list[_Job]


class Scheduler:
    """Admission queue, running set and engine state, shared by the event loop (submit, cancel,
    load) and the engine thread (next_work, retire). One Condition guards all of it; the engine
    thread sleeps on it when idle."""

    def __init__(self, max_running: int, max_waiting: int) -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._waiting: deque[SequenceState] = deque()
        self._running: list[SequenceState] = []
        self._retired: list[SequenceState] = []
        self._jobs: list[_Job] = []
        self._drained: list[Callable[[], None]] = []
        self.state = EngineState.NEW

    # -- event loop side --------------------------------------------------------------------

    def check_accepting(self, *, internal: bool = False) -> None:
        state = self.state
        if state is EngineState.READY or (internal and state is EngineState.STARTING):
            return
        if state in (EngineState.NEW, EngineState.STARTING):
            raise UnavailableError("the model is still loading")
        raise UnavailableError("the model is shutting down")

    def check_capacity(self) -> None:
        with self._cond:
            self._check_capacity_locked()

    def submit(self, seq: SequenceState, *, internal: bool = False) -> None:
        with self._cond:
            self.check_accepting(internal=internal)
            self._check_capacity_locked()
            self._waiting.append(seq)
            self._cond.notify()

    def submit_job(
        self, fn: Callable[[], T], *, internal: bool = False
    ) -> concurrent.futures.Future[T]:
        job = _Job(fn)
        with self._cond:
            self.check_accepting(internal=internal)
            if len(self._jobs) >= max(self.max_waiting, 1):
                raise OverloadedError("too many embedding requests are queued; retry later")
            self._jobs.append(job)
            self._cond.notify()
        return job.future

    def cancel(self, seq: SequenceState) -> None:
        with self._cond:
            seq.cancelled = True
            try:
                self._waiting.remove(seq)  # never admitted: nothing to free
            except ValueError:
                pass  # running (the engine thread retires it) or already gone
            self._cond.notify()

    def load(self) -> LoadInfo:
        with self._cond:
            running = sum(1 for s in self._running if not s.cancelled)
            return LoadInfo(running=running, waiting=len(self._waiting), capacity=self.max_running)

    def transition(self, expected: EngineState, state: EngineState) -> bool:
        with self._cond:
            if self.state is not expected:
                return False
            self.state = state
            return True

    def set_state(self, state: EngineState) -> EngineState:
        with self._cond:
            previous, self.state = self.state, state
            self._cond.notify_all()
            return previous

    def on_drained(self, callback: Callable[[], None]) -> None:
        """Stop admitting new work; call `callback` (from any thread) once nothing is in flight."""
        with self._cond:
            if self.state in (EngineState.READY, EngineState.STARTING):
                self.state = EngineState.DRAINING
            self._drained.append(callback)
            self._notify_drained_locked()
            self._cond.notify_all()

    # -- engine thread side -----------------------------------------------------------------

    def next_work(self) -> Work | None:
        """Block until there is something to do; None once the engine is stopping."""
        with self._cond:
            while True:
                if self.state is EngineState.STOPPING:
                    return None
                # Cancelled sequences leave here, before anything else runs: their cache is freed.
                for seq in [s for s in self._running if s.cancelled]:
                    self._retire_locked(seq)
                if self._waiting or self._running or self._jobs:
                    break
                self._notify_drained_locked()
                self._cond.wait()
            while self._waiting and len(self._running) < self.max_running:
                self._running.append(self._waiting.popleft())
            jobs, self._jobs = self._jobs, []
            retired, self._retired = self._retired, []
            return Work(list(self._running), retired, jobs)

    def retire(self, seq: SequenceState) -> None:
        with self._cond:
            self._retire_locked(seq)

    def preempt(self, seq: SequenceState) -> None:
        """Send a running sequence back to the head of the queue (its cache was dropped)."""
        with self._cond:
            if seq in self._running:
                self._running.remove(seq)
                if not seq.cancelled:
                    self._waiting.appendleft(seq)

    def take_all(self) -> tuple[list[SequenceState], list[_Job]]:
        """Empty the engine (at stop): everything still waiting or running, and pending jobs."""
        with self._cond:
            seqs = [*self._running, *self._waiting]
            self._running.clear()
            self._waiting.clear()
            jobs, self._jobs = self._jobs, []
            self._notify_drained_locked()
            return seqs, jobs

    def _check_capacity_locked(self) -> None:
        # A request that finds a free slot is not "queued": the bound is on running + waiting.
        active = sum(1 for s in self._running if not s.cancelled)
        if active + len(self._waiting) >= self.max_running + self.max_waiting:
            raise OverloadedError(
                f"the model is busy: {active} running and {len(self._waiting)} waiting "
                f"(limit {self.max_waiting}); retry later"
            )

    def _retire_locked(self, seq: SequenceState) -> None:
        if seq in self._running:
            self._running.remove(seq)
            self._retired.append(seq)

    def _notify_drained_locked(self) -> None:
        if self._drained and not (self._waiting or self._running or self._jobs):
            callbacks, self._drained = self._drained, []
            for callback in callbacks:
                callback()


class HFEngine(Engine):
    """A transformers model served by one engine thread (see the module docstring)."""

    def __init__(self, plan: LoadPlan, options: EngineOptions) -> None:
        self._plan = plan
        self._options = options
        self._scheduler = Scheduler(options.max_running, options.max_waiting)
        self._loaded: LoadedModel | None = None
        self._thread: threading.Thread | None = None
        self._thread_done: concurrent.futures.Future[None] = concurrent.futures.Future()
        # Every tokenizer call that encodes runs on this one thread: HF fast tokenizers mutate
        # their truncation/padding state per call, so concurrent encodes are not safe, and long
        # prompts must not stall the event loop or the decode loop.
        self._tokenizer_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"tokenizer-{plan.names[0]}"
        )
        self._decode_text: Callable[[SequenceOf[int]], str] = lambda ids: ""
        self._decode_special: Callable[[SequenceOf[int]], str] = lambda ids: ""
        self._token_texts: dict[int, str] = {}
        self._byte_tokens: frozenset[int] = frozenset()
        self._encoder: Callable[..., Any] | None = None
        self._runner: ModelRunner | None = None
        self._counters = _Counters()
        # Structured output: built with the model (causal LMs only); the masker is the engine
        # thread's, its time counted for metrics.
        self._constraints: ConstraintCompiler | None = None
        self._masker: TokenMasker | None = None
        self._mask_seconds_at_start = 0.0

    # -- Engine interface -------------------------------------------------------------------

    @property
    def description(self) -> ModelDescription:
        causal = self._plan.kind is ModelKind.CAUSAL_LM
        context = self._loaded.context_length if self._loaded else self._plan.context_length
        # The output parsers follow the chat template (known once loaded).
        tool_call_parser, reasoning_parser = (
            output_parsers(self._loaded.tokenizer) if self._loaded and causal else ("", "")
        )
        return ModelDescription(
            name=self._plan.names[0],
            aliases=self._plan.names[1:],
            context_length=context or 0,  # GGUF: known once started
            supports_generate=causal,
            supports_chat=causal,
            supports_embeddings=True,
            source=self._plan.source.display,
            default_sampling=(
                self._loaded.default_sampling
                if self._loaded
                else self._plan.default_sampling or SamplingParams()
            ),
            tool_call_parser=tool_call_parser,
            reasoning_parser=reasoning_parser,
        )

    async def start(self) -> None:
        if not self._scheduler.transition(EngineState.NEW, EngineState.STARTING):
            raise RuntimeError("an engine can be started only once")
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._thread_main,
            args=(ready,),
            name=f"engine-{self._plan.names[0]}",
            daemon=True,
        )
        self._thread.start()
        try:
            await asyncio.wrap_future(ready)
            await self._warm_up()
            self._counters = _Counters()  # metrics count requests, not the warm-up
            if self._masker is not None:
                self._mask_seconds_at_start = self._masker.seconds
        except BaseException:
            await self.stop()
            raise
        if not self._scheduler.transition(EngineState.STARTING, EngineState.READY):
            raise UnavailableError("the engine was stopped while starting")

    async def drain(self) -> None:
        loop = asyncio.get_running_loop()
        drained: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            loop.call_soon_threadsafe(_resolve, drained)

        self._scheduler.on_drained(wake)
        await drained

    async def stop(self) -> None:
        previous = self._scheduler.set_state(EngineState.STOPPING)
        if previous is EngineState.STOPPED:
            self._scheduler.set_state(EngineState.STOPPED)
            return
        if self._thread is not None:
            await asyncio.wrap_future(self._thread_done)
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        self._loaded = None
        self._encoder = None
        self._scheduler.set_state(EngineState.STOPPED)

    def load(self) -> LoadInfo:
        return self._scheduler.load()

    def stats(self) -> EngineStats:
        load = self._scheduler.load()
        runner = self._runner
        usage = None
        if runner is not None and runner.max_cache_tokens > 0:
            usage = runner.cache_tokens_used() / runner.max_cache_tokens
        counters = self._counters
        masker = self._masker
        return EngineStats(
            running=load.running,
            waiting=load.waiting,
            kv_cache_usage=usage,
            prompt_tokens=counters.prompt_tokens,
            generation_tokens=counters.generation_tokens,
            preemptions=counters.preemptions,
            structured_mask_seconds=(
                masker.seconds - self._mask_seconds_at_start if masker is not None else 0.0
            ),
            step_seconds=counters.step_seconds,
            prefix_cache_queried_tokens=counters.prefix_queried_tokens,
            prefix_cache_hit_tokens=counters.prefix_hit_tokens,
        )

    @property
    def constraint_compiler(self) -> ConstraintCompiler | None:
        """The engine's grammar compiler and its cache (None before load or for embeddings)."""
        return self._constraints

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        return self._generate(request)

    async def tokenize(self, prompt: str | ChatPrompt) -> list[int]:
        loaded = self._require_loaded()
        if isinstance(prompt, str):
            return await self._on_tokenizer(
                lambda: list(loaded.tokenizer.encode(prompt, add_special_tokens=True))
            )
        if self._plan.kind is not ModelKind.CAUSAL_LM:
            raise InvalidRequestError(
                f"{self._plan.names[0]} is an embedding model without a chat template",
                param="messages",
            )
        validate_messages(prompt.messages if isinstance(prompt, Conversation) else prompt)
        encoded = await self._on_tokenizer(
            lambda: encode_prompt(loaded.tokenizer, prompt, loaded.vocab_size)
        )
        return encoded.token_ids

    async def embed(self, texts: SequenceOf[str]) -> tuple[list[list[float]], int]:
        return await self._embed(texts)

    # -- event loop side --------------------------------------------------------------------

    async def _generate(
        self, request: GenerationRequest, *, internal: bool = False
    ) -> AsyncIterator[GenerationChunk]:
        if self._plan.kind is not ModelKind.CAUSAL_LM:
            raise InvalidRequestError(
                f"{self._plan.names[0]} is an embedding model; it cannot generate", param="model"
            )
        self._scheduler.check_accepting(internal=internal)
        loaded = self._require_loaded()
        validate_sampling(request.sampling)
        _validate_request_shape(request, loaded)
        self._scheduler.check_capacity()  # fail fast, before tokenizing
        encoded = await self._on_tokenizer(
            lambda: encode_prompt(loaded.tokenizer, request.prompt, loaded.vocab_size)
        )
        constraint = None
        if request.constraint is not None:
            compiler = self._constraints
            spec = request.constraint
            assert compiler is not None  # built with every causal LM
            # Compiled here, off the engine thread: a bad schema is refused before admission.
            constraint = await self._on_tokenizer(lambda: compiler.compile(spec))
        seq = self._new_sequence(
            request, encoded, loaded, asyncio.get_running_loop(), constraint=constraint
        )
        echo_now = request.echo and not seq.echo_pending
        if echo_now and seq.max_tokens == 0:
            # Score-only without prompt logprobs: nothing for the model to do.
            yield self._echo_chunk(seq)
            yield seq.final_chunk("", FinishReason.LENGTH)
            return
        self._scheduler.submit(seq, internal=internal)
        logger.debug(
            "queued %s: %d prompt tokens, up to %d new",
            request.request_id,
            len(seq.prompt_ids),
            seq.max_tokens,
        )
        try:
            if echo_now:
                yield self._echo_chunk(seq)
            while True:
                item = await seq.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not seq.finished:
                self._scheduler.cancel(seq)

    def _new_sequence(
        self,
        request: GenerationRequest,
        encoded: EncodedPrompt,
        loaded: LoadedModel,
        loop: asyncio.AbstractEventLoop | None,
        *,
        constraint: SequenceConstraint | None = None,
    ) -> SequenceState:
        stopping = request.stopping
        n_prompt, context = len(encoded.token_ids), loaded.context_length
        # OpenAI's wording, which clients and tools look for. Without max_tokens the answer is
        # capped to the room left, so only a prompt that fills the context is refused.
        where = "the messages" if encoded.param == "messages" else "the prompt"
        if n_prompt >= context:
            raise InvalidRequestError(
                f"This model's maximum context length is {context} tokens. However, {where} "
                f"resulted in {n_prompt} tokens, leaving no room for the completion. Please "
                f"reduce the length of {where}.",
                param=encoded.param,
            )
        room = context - n_prompt
        if stopping.max_tokens is not None and stopping.max_tokens > room:
            raise InvalidRequestError(
                f"This model's maximum context length is {context} tokens. However, you "
                f"requested {n_prompt + stopping.max_tokens} tokens ({n_prompt} in {where}, "
                f"{stopping.max_tokens} in the completion). Please reduce the length of {where} "
                "or completion.",
                param="max_tokens",
            )
        max_tokens = room if stopping.max_tokens is None else stopping.max_tokens
        stop_token_ids = frozenset(stopping.stop_token_ids)
        eos = frozenset() if stopping.ignore_eos else loaded.eos_token_ids
        stop_ids = eos | stop_token_ids
        return SequenceState(
            request_id=request.request_id,
            prompt_ids=encoded.token_ids,
            max_tokens=max_tokens,
            min_tokens=stopping.min_tokens,
            stop_ids=stop_ids,
            stop_token_ids=stop_token_ids,
            sampling=SamplingState(
                request.sampling,
                vocab_size=loaded.vocab_size,
                prompt_ids=encoded.token_ids,
                device=loaded.device,
                top_logprobs=request.logprobs,
                suppress_ids=stop_ids,
                min_tokens=stopping.min_tokens,
                logit_bias=request.logit_bias,
                constraint=constraint,
            ),
            detokenizer=IncrementalDetokenizer(
                self._decode_text, encoded.token_ids, self._byte_tokens
            ),
            matcher=StopStringMatcher(stopping.stop),
            loop=loop,
            queue=asyncio.Queue(),
            prompt_text=encoded.text,
            # Prompt logprobs ride on the echo chunk: without echo there is nothing to carry them.
            echo_pending=request.echo and request.prompt_logprobs,
            top_prompt_logprobs=request.logprobs or 0,
            reasoning_open=encoded.reasoning_open,
        )

    @staticmethod
    def _echo_chunk(seq: SequenceState) -> GenerationChunk:
        return seq.stamp(
            GenerationChunk(
                text=seq.prompt_text,
                token_ids=list(seq.prompt_ids),
                logprobs=list(seq.prompt_logprobs),
                is_prompt_echo=True,
                prompt_tokens=len(seq.prompt_ids),
            )
        )

    async def _embed(
        self, texts: SequenceOf[str], *, internal: bool = False
    ) -> tuple[list[list[float]], int]:
        validate_inputs(texts)
        self._scheduler.check_accepting(internal=internal)
        loaded = self._require_loaded()
        encoder = self._encoder
        assert encoder is not None
        batch = await self._on_tokenizer(
            lambda: tokenize_for_embedding(loaded.tokenizer, texts, loaded.context_length)
        )
        pad_id = getattr(loaded.tokenizer, "pad_token_id", None) or 0
        future = self._scheduler.submit_job(
            lambda: embed_token_ids(encoder, batch, loaded.device, pad_id), internal=internal
        )
        vectors: list[list[float]] = await asyncio.wrap_future(future)
        return vectors, sum(len(ids) for ids in batch)

    async def _warm_up(self) -> None:
        """A tiny request through the whole path, so the first real one pays no first-call costs."""
        if self._plan.kind is ModelKind.CAUSAL_LM:
            request = GenerationRequest(
                request_id="warm-up",
                prompt="Hello",
                sampling=SamplingParams(temperature=0.0),
                stopping=StoppingParams(max_tokens=2, ignore_eos=True),
            )
            async for _ in self._generate(request, internal=True):
                pass
            # The first mask of a grammar with JSON strings builds llguidance's lexer for this
            # tokenizer (up to seconds): paid here, not by the first structured request.
            constrained = dataclasses.replace(
                request, request_id="warm-up-constrained", constraint=WARM_UP_CONSTRAINT
            )
            async for _ in self._generate(constrained, internal=True):
                pass
        else:
            await self._embed(["Hello"], internal=True)

    async def _on_tokenizer(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, fn)

    def _require_loaded(self) -> LoadedModel:
        loaded = self._loaded
        if loaded is None:
            state = self._scheduler.state
            loading = state in (EngineState.NEW, EngineState.STARTING)
            raise UnavailableError(
                "the model is still loading" if loading else "the model is shutting down"
            )
        return loaded

    # -- engine thread ----------------------------------------------------------------------

    def _thread_main(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            try:
                self._load()
            except BaseException as exc:  # any load failure belongs to start()'s caller
                ready.set_exception(exc)
                return
            ready.set_result(None)
            with torch.inference_mode():
                self._serve()
        finally:
            self._thread_done.set_result(None)

    def _load(self) -> None:
        loaded = self._plan.load(self._options.threads, self._options.quantization)
        self._decode_text = make_decode_fn(
            loaded.tokenizer, skip_special_tokens=True, keep=OUTPUT_MARKERS
        )
        self._decode_special = make_decode_fn(loaded.tokenizer, skip_special_tokens=False)
        self._byte_tokens = byte_fallback_ids(loaded.tokenizer)
        if self._plan.kind is ModelKind.CAUSAL_LM:
            options = self._options
            self._runner = (
                create_runner(
                    loaded.model,
                    options.max_running,
                    options.kv_cache_tokens,
                    prefix_caching=options.prefix_caching,
                )
                if options.packed
                else HFRunner(loaded.model, options.max_running, options.kv_cache_tokens)
            )
            if options.prefix_caching and not self._runner.prefix_caching:
                logger.info(
                    "%s: prefix caching is off: the per-sequence runner has no prefix cache",
                    self._plan.names[0],
                )
            # One sequence must always fit the KV cache on its own.
            budget = options.kv_cache_tokens // CAPACITY_QUANTUM * CAPACITY_QUANTUM
            if loaded.context_length > budget:
                logger.warning(
                    "%s: context %d capped to the KV cache budget of %d tokens",
                    self._plan.names[0],
                    loaded.context_length,
                    budget,
                )
                loaded = dataclasses.replace(loaded, context_length=budget)
            # The decoder stack without the LM head: last hidden states for embeddings.
            base = loaded.model.base_model

            def encoder(**inputs: Any) -> Any:
                return base(**inputs, use_cache=False)

            self._encoder = encoder
            width = _logits_width(loaded.model, loaded.vocab_size)
            self._constraints = ConstraintCompiler.for_hf_tokenizer(loaded.tokenizer, width)
            self._masker = TokenMasker(self._constraints.vocab_size)
        else:
            self._encoder = loaded.model
        self._loaded = loaded

    def _serve(self) -> None:
        runner = self._runner
        while (work := self._scheduler.next_work()) is not None:
            if runner is not None:
                for seq in work.retired:
                    runner.release(seq)
            for job in work.jobs:
                job.run()
            if not work.running:
                continue
            started = time.perf_counter()
            try:
                self._step(work.running)
            except Exception as exc:  # the engine thread must survive; the step's requests fail
                logger.exception(
                    "engine step failed; failing %d request(s): %s",
                    len(work.running),
                    " ".join(seq.request_id for seq in work.running),
                )
                for seq in work.running:
                    seq.finished = True
                    self._scheduler.retire(seq)
                    if runner is not None:
                        runner.release(seq)
                self._deliver((seq, exc) for seq in work.running)
            self._counters.step_seconds += time.perf_counter() - started
        seqs, jobs = self._scheduler.take_all()
        for job in jobs:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(UnavailableError("the model is shutting down"))
        if runner is not None:
            for seq in seqs:
                runner.release(seq)
        self._deliver(
            (seq, seq.final_chunk("", FinishReason.CANCELLED)) for seq in seqs if not seq.cancelled
        )

    def _step(self, running: list[SequenceState]) -> None:
        """One forward over every running sequence: a token each for those decoding, prompt
        chunks for those joining (within max_batch_tokens), then sampling where due."""
        runner = self._runner
        assert runner is not None
        # Under KV pressure the newest sequences wait (keeping their output) until room frees.
        while len(running) > 1 and not runner.fits([seq.length for seq in running]):
            victim = running.pop()
            runner.release(victim)
            victim.computed = 0
            victim.prefix_checked = False
            self._scheduler.preempt(victim)
            self._counters.preemptions += 1
            # This thread has no request context: the record names its request itself.
            logger.info(
                "preempted %s: the KV cache budget is full",
                victim.request_id,
                extra={"request_id": victim.request_id},
            )
        if runner.prefix_caching:
            self._reuse_prefixes(running)
        budget = self._options.max_batch_tokens
        decoding = [seq for seq in running if seq.computed == seq.length - 1]
        joining = [seq for seq in running if seq.computed < seq.length - 1]
        items: list[ForwardItem] = []
        for seq in decoding:
            tokens = seq.pending_tokens(1)
            items.append(ForwardItem(seq, tokens, seq.computed, True, seq.scoring_prompt))
        budget -= len(decoding)
        for seq in joining:
            if budget <= 0:
                break
            tokens = seq.pending_tokens(budget)
            done = seq.computed + len(tokens) == seq.length
            items.append(ForwardItem(seq, tokens, seq.computed, done, seq.scoring_prompt))
            budget -= len(tokens)
        logits = runner.forward(items)
        batch: list[SequenceState] = []
        rows: list[int] = []
        deliveries: list[tuple[SequenceState, QueueItem]] = []
        cursor = 0
        for item in items:
            fed = item.key
            assert isinstance(fed, SequenceState)
            n_rows = item.logit_rows
            if item.all_logits:
                self._score_prompt(fed, item, logits[cursor : cursor + n_rows])
                if not fed.scoring_prompt:
                    fed.echo_pending = False
                    deliveries.append((fed, self._echo_chunk(fed)))
            fed.computed += len(item.token_ids)
            if item.want_logits:
                if fed.max_tokens == 0:  # score-only: the prompt is all there is
                    self._counters.prompt_tokens += len(fed.prompt_ids)
                    deliveries.append((fed, fed.final_chunk("", FinishReason.LENGTH)))
                    self._scheduler.retire(fed)
                    runner.release(fed)
                else:
                    batch.append(fed)
                    rows.append(cursor + n_rows - 1)
            cursor += n_rows
        if not batch:
            self._deliver(deliveries)
            return
        if len(rows) != logits.shape[0]:
            logits = logits[torch.tensor(rows, dtype=torch.long, device=logits.device)]
        out = sample(logits, [s.sampling for s in batch], self._masker)
        # A sequence without output samples its first token: its prompt is in the cache now.
        self._counters.prompt_tokens += sum(len(s.prompt_ids) for s in batch if not s.output_ids)
        self._counters.generation_tokens += len(batch)
        for seq, token_id, row_logprobs in zip(batch, out.token_ids, out.logprobs, strict=True):
            chunk = self._advance(seq, token_id, row_logprobs)
            if chunk is not None:
                deliveries.append((seq, chunk))
            if seq.finished:
                self._scheduler.retire(seq)
                runner.release(seq)
        self._deliver(deliveries)

    def _reuse_prefixes(self, running: list[SequenceState]) -> None:
        """Sequences without a cache row start from the longest prefix of their tokens the
        prefix cache holds (a preempted one usually finds its own)."""
        runner = self._runner
        assert runner is not None
        counters = self._counters
        for seq in running:
            # Scoring the prompt needs every position's logits: nothing can be skipped.
            if seq.computed or seq.prefix_checked or seq.scoring_prompt:
                continue
            seq.prefix_checked = True
            tokens = seq.prompt_ids + seq.output_ids
            seq.computed = runner.reuse_prefix(seq, tokens)
            counters.prefix_queried_tokens += len(tokens)
            counters.prefix_hit_tokens += seq.computed
            if not seq.output_ids:
                seq.cached_prompt_tokens = seq.computed

    def _score_prompt(self, seq: SequenceState, item: ForwardItem, logits: torch.Tensor) -> None:
        """Record the prompt logprobs these rows give: the row at position p scores prompt token
        p + 1. Positions already scored (before a preemption) are skipped."""
        prompt = seq.prompt_ids
        if not seq.prompt_logprobs:  # nothing precedes the first token
            first_token = TokenLogprob(prompt[0], self._token_text(prompt[0]), math.nan)
            seq.prompt_logprobs.append(first_token)
        first = len(seq.prompt_logprobs) - 1 - item.start  # the row scoring the next unscored
        last = min(len(item.token_ids), len(prompt) - 1 - item.start)  # rows past the prompt
        if first >= last:
            return
        logprobs = torch.log_softmax(logits[first:last].float(), dim=-1)
        targets = prompt[item.start + first + 1 : item.start + last + 1]
        target_t = torch.tensor(targets, dtype=torch.long, device=logprobs.device)
        chosen = logprobs.gather(1, target_t.unsqueeze(1)).squeeze(1).tolist()
        k = seq.top_prompt_logprobs
        top_values: list[list[float]] = [[] for _ in targets]
        top_ids: list[list[int]] = [[] for _ in targets]
        if k > 0:
            top = logprobs.topk(k, dim=-1)
            top_values, top_ids = top.values.tolist(), top.indices.tolist()
        for j, token_id in enumerate(targets):
            row = RowLogprobs(chosen[j], top_ids[j], top_values[j])
            seq.prompt_logprobs.append(self._token_logprob(token_id, row))

    def _advance(
        self, seq: SequenceState, token_id: int, logprobs: RowLogprobs | None
    ) -> QueueItem | None:
        """Append the sampled token, apply the stopping rules; a chunk when there is news."""
        seq.output_ids.append(token_id)
        seq.pending_ids.append(token_id)
        if logprobs is not None:
            seq.pending_logprobs.append(self._token_logprob(token_id, logprobs))
        constraint = seq.sampling.constraint
        if constraint is not None and constraint.error is not None:
            seq.finished = True
            logger.error(
                "structured output failed for %s: %s",
                seq.request_id,
                constraint.error,
                extra={"request_id": seq.request_id},
            )
            return ConstraintError(f"structured output failed: {constraint.error}")
        n = len(seq.output_ids)
        ends_by_token = token_id in seq.stop_ids and n >= seq.min_tokens
        # A complete grammar ends the output as EOS would.
        ends_by_grammar = constraint is not None and constraint.is_stopped and not ends_by_token
        ends_by_length = n >= seq.max_tokens
        if ends_by_token:
            delta = seq.detokenizer.flush()  # a stop token's own text is never returned
        else:
            delta = seq.detokenizer.step(token_id)
            if ends_by_length or ends_by_grammar:
                delta += seq.detokenizer.flush()
        text, matched = seq.matcher.feed(delta, active=n >= seq.min_tokens)
        if matched is not None:
            return seq.final_chunk(text, FinishReason.STOP, matched)
        if ends_by_token:
            reason = str(token_id) if token_id in seq.stop_token_ids else ""
            return seq.final_chunk(text + seq.matcher.flush(), FinishReason.STOP, reason)
        if ends_by_grammar:
            return seq.final_chunk(text + seq.matcher.flush(), FinishReason.STOP)
        if ends_by_length:
            return seq.final_chunk(text + seq.matcher.flush(), FinishReason.LENGTH)
        if not text:
            return None  # keep the ids with the text they will produce
        return seq.take_chunk(text)

    def _token_logprob(self, token_id: int, row: RowLogprobs) -> TokenLogprob:
        top = tuple(
            TopLogprob(i, self._token_text(i), lp)
            for i, lp in zip(row.top_ids, row.top_logprobs, strict=True)
        )
        return TokenLogprob(token_id, self._token_text(token_id), row.logprob, top)

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self._decode_special([token_id])
        return text

    def _deliver(self, items: Iterable[tuple[SequenceState, QueueItem]]) -> None:
        """Hand chunks to their event loops: one thread-safe callback per loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[QueueItem], QueueItem]]]
        by_loop = {}
        for seq, item in items:
            if seq.loop is not None and not seq.cancelled:
                by_loop.setdefault(seq.loop, []).append((seq.queue, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                logger.debug("dropping %d chunk(s) for a closed event loop", len(batch))


def _validate_request_shape(request: GenerationRequest, loaded: LoadedModel) -> None:
    """Checks that need no tokenization."""
    stopping = request.stopping
    if stopping.max_tokens is not None and stopping.max_tokens < 1:
        # 0 with echo scores the prompt and generates nothing (the completions API's echo).
        if stopping.max_tokens < 0 or not request.echo:
            raise InvalidRequestError(
                f"max_tokens must be at least 1, got {stopping.max_tokens}"
                + ("" if stopping.max_tokens < 0 else " (0 is allowed only with echo)"),
                param="max_tokens",
            )
    if stopping.min_tokens < 0:
        raise InvalidRequestError(
            f"min_tokens must be 0 or more, got {stopping.min_tokens}", param="min_tokens"
        )
    if stopping.max_tokens is not None and stopping.min_tokens > stopping.max_tokens:
        raise InvalidRequestError(
            f"min_tokens ({stopping.min_tokens}) exceeds max_tokens ({stopping.max_tokens})",
            param="min_tokens",
        )
    bad = next((t for t in stopping.stop_token_ids if not 0 <= t < loaded.vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(
            f"stop token id {bad} is out of the vocabulary (0..{loaded.vocab_size - 1})",
            param="stop_token_ids",
        )
    if request.logprobs is not None and not 0 <= request.logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(
            f"top logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {request.logprobs}",
            param="logprobs",
        )
    validate_logit_bias(request.logit_bias, loaded.vocab_size)


def _logits_width(model: Any, default: int) -> int:
    """Columns of the model's logits: the LM head's outputs (may differ from the embeddings)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else default


def _put_all(batch: list[tuple[asyncio.Queue[QueueItem], QueueItem]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
