"""The transformers engine: `HFEngine` serves one model with one engine thread (step_loop.py) that
owns the model and runs the scheduler's work (scheduler.py) over per-request sequences
(sequence.py).

The event loop side validates a request (validation.py), tokenizes it and compiles its grammar on
a helper thread, queues it, and reads the chunks the engine thread hands back, so nothing here
blocks asyncio. The engine thread loads the model, builds the runner (runner.py), warms up, then
steps until the engine stops.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as SequenceOf
from typing import Any, TypeVar

import torch

from services.common.errors import InvalidRequestError, UnavailableError
from services.worker.engine.constraints import (
    WARM_UP_CONSTRAINT,
    ConstraintCompiler,
    SequenceConstraint,
    TokenMasker,
)
from services.worker.engine.cores import CoreShare
from services.worker.engine.detokenizer import (
    IncrementalDetokenizer,
    byte_fallback_ids,
    make_decode_fn,
)
from services.worker.engine.embedding import (
    embed_token_ids,
    tokenize_for_embedding,
    validate_inputs,
)
from services.worker.engine.interface import (
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
)
from services.worker.engine.loading import EngineOptions, LoadedModel, LoadPlan, ModelKind
from services.worker.engine.output_parsing import OUTPUT_MARKERS
from services.worker.engine.prompts import (
    EncodedPrompt,
    encode_prompt,
    output_parsers,
    validate_messages,
)
from services.worker.engine.runner import (
    CAPACITY_QUANTUM,
    HFRunner,
    ModelRunner,
    PackedRunner,
    create_runner,
)
from services.worker.engine.sampling import SamplingState
from services.worker.engine.scheduler import EngineState, Scheduler
from services.worker.engine.sequence import SequenceState
from services.worker.engine.step_loop import StepCounters, StepLoop
from services.worker.engine.stopping import StopStringMatcher
from services.worker.engine.validation import check_context, validate_request

logger = logging.getLogger(__name__)

T = TypeVar("T")


class HFEngine(Engine):
    """A transformers model served by one engine thread (see the module docstring)."""

    def __init__(
        self, plan: LoadPlan, options: EngineOptions, cores: CoreShare | None = None
    ) -> None:
        self._plan = plan
        self._options = options
        self._cores = cores
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
        self._byte_tokens: frozenset[int] = frozenset()
        self._encoder: Callable[..., Any] | None = None
        self._runner: ModelRunner | None = None
        self._steps: StepLoop | None = None  # made with the model, on the engine thread
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
            assert self._steps is not None
            self._steps.counters = StepCounters()  # metrics count requests, not the warm-up
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
        counters = self._steps.counters if self._steps is not None else StepCounters()
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
        validate_request(request, loaded.vocab_size)
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
            yield seq.echo_chunk()
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
                yield seq.echo_chunk()
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
        # Without max_tokens the answer is capped to the room the prompt leaves.
        max_tokens = check_context(
            len(encoded.token_ids), stopping.max_tokens, loaded.context_length, encoded.param
        )
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
            assert self._steps is not None
            with torch.inference_mode():
                self._steps.serve()
        finally:
            self._thread_done.set_result(None)

    def _load(self) -> None:
        loaded = self._plan.load(self._options.threads, self._options.quantization)
        self._decode_text = make_decode_fn(
            loaded.tokenizer, skip_special_tokens=True, keep=OUTPUT_MARKERS
        )
        decode_special = make_decode_fn(loaded.tokenizer, skip_special_tokens=False)
        self._byte_tokens = byte_fallback_ids(loaded.tokenizer)
        if self._plan.kind is ModelKind.CAUSAL_LM:
            options = self._options
            self._runner = (
                create_runner(
                    loaded.model,
                    options.max_running,
                    options.kv_cache_tokens,
                    prefix_caching=options.prefix_caching,
                    kv_dtype=loaded.kv_dtype,
                )
                if options.packed
                else HFRunner(loaded.model, options.max_running, options.kv_cache_tokens)
            )
            if isinstance(self._runner, PackedRunner):
                logger.info(
                    "%s: attention by %s, keys and values in %s",
                    self._plan.names[0],
                    self._runner.attention_backend,
                    str(self._runner.kv_dtype).removeprefix("torch."),
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
        self._steps = StepLoop(
            self._scheduler,
            self._runner,
            masker=self._masker,
            max_batch_tokens=self._options.max_batch_tokens,
            decode_special=decode_special,
            cores=self._cores,
        )
        self._loaded = loaded


def _logits_width(model: Any, default: int) -> int:
    """Columns of the model's logits: the LM head's outputs (may differ from the embeddings)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else default


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
