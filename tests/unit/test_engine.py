"""The transformers engine on a tiny random Llama: scheduling, sampling, stopping, streaming."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import math
import random
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from models import build_byte_level_tokenizer, save_tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.common.errors import InvalidRequestError, OverloadedError, UnavailableError
from services.worker.engine.factory import create_engine
from services.worker.engine.hf_engine import HFEngine
from services.worker.engine.interface import (
    ChatMessage,
    ConstraintKind,
    Engine,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    OutputConstraint,
    Prompt,
    SamplingParams,
    StoppingParams,
)
from services.worker.engine.loading import EngineOptions, ModelSpec
from services.worker.engine.quantization import quantize_int8

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def hf_model(llama_dir: Path) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(llama_dir).eval()


async def started(path: Path, **options: int) -> Engine:
    # One torch thread: a tiny model gains nothing from more, and suffers when the cores are busy.
    options.setdefault("threads", 1)
    # Full precision, so outputs compare with transformers' own generate on the same weights.
    options.setdefault("quantization", "none")
    engine = create_engine(ModelSpec(str(path), ("tiny",)), EngineOptions(**options))  # type: ignore[arg-type]
    await engine.start()
    return engine


@pytest.fixture
async def engine(llama_dir: Path) -> AsyncIterator[Engine]:
    engine = await started(llama_dir, max_running=4)
    yield engine
    await engine.stop()


@dataclass
class Result:
    chunks: list[GenerationChunk] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        return [t for c in self.chunks if not c.is_prompt_echo for t in c.token_ids]

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks if not c.is_prompt_echo)

    @property
    def final(self) -> GenerationChunk:
        return self.chunks[-1]


def request(
    prompt: Prompt,
    *,
    sampling: SamplingParams = GREEDY,
    request_id: str = "r",
    logprobs: int | None = None,
    echo: bool = False,
    **stopping: object,
) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        prompt=prompt,
        sampling=sampling,
        stopping=StoppingParams(**stopping),  # type: ignore[arg-type]
        logprobs=logprobs,
        echo=echo,
    )


async def collect(
    engine: Engine, req: GenerationRequest, progress: tuple[int, asyncio.Event] | None = None
) -> Result:
    result = Result()
    async for chunk in engine.generate(req):
        result.chunks.append(chunk)
        if progress is not None and len(result.token_ids) >= progress[0]:
            progress[1].set()
    return result


def random_prompt(rng: random.Random, length: int, vocab: int = 512) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(length)]  # no special tokens


def hf_greedy(model: AutoModelForCausalLM, prompt: list[int], max_new_tokens: int) -> list[int]:
    input_ids = torch.tensor([prompt])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the engines under test
    try:
        with torch.inference_mode():
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
    finally:
        torch.set_num_threads(threads)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param({}, id="packed"),
        pytest.param({"packed": False}, id="per-sequence"),
        # Prompts arrive in chunks of a few tokens, interleaved with the others' decoding.
        pytest.param({"max_batch_tokens": 8}, id="chunked-prefill"),
        # Room for one sequence at a time: the newest are preempted and recomputed.
        pytest.param({"kv_cache_tokens": 256}, id="preemption"),
        # Per-token activation scales keep int8 results independent of the batch.
        pytest.param({"quantization": "int8"}, id="int8"),
    ],
)
async def test_concurrent_greedy_matches_hf_generate_alone(
    llama_dir: Path,
    hf_model: AutoModelForCausalLM,
    variant: dict[str, object],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="services.worker.engine.step_loop")
    rng = random.Random(1)
    specs = [(3, 60), (17, 16), (60, 30), (9, 24), (33, 8)]
    prompts = [random_prompt(rng, n) for n, _ in specs]
    # 3 slots for 5 requests: some wait, and they join while others are mid-generation.
    engine = await started(llama_dir, max_running=3, **variant)
    try:
        first_progress = asyncio.Event()
        second_progress = asyncio.Event()
        tasks = [
            asyncio.create_task(
                collect(engine, request(prompts[0], max_tokens=specs[0][1]), (5, first_progress))
            )
        ]
        await first_progress.wait()
        tasks.append(
            asyncio.create_task(
                collect(engine, request(prompts[1], max_tokens=specs[1][1]), (3, second_progress))
            )
        )
        await second_progress.wait()
        for prompt, (_, max_tokens) in zip(prompts[2:], specs[2:], strict=True):
            tasks.append(
                asyncio.create_task(collect(engine, request(prompt, max_tokens=max_tokens)))
            )
        results = await asyncio.gather(*tasks)
    finally:
        await engine.stop()
    reference = hf_model
    if variant.get("quantization") == "int8":
        reference = copy.deepcopy(hf_model)
        quantize_int8(reference)
    for prompt, (_, max_tokens), result in zip(prompts, specs, results, strict=True):
        expected = hf_greedy(reference, prompt, max_tokens)
        assert result.token_ids == expected
        assert result.final.completion_tokens == len(expected)
        assert result.final.prompt_tokens == len(prompt)
    if "kv_cache_tokens" in variant:
        assert any("preempted" in record.getMessage() for record in caplog.records)


async def test_streamed_text_is_the_decoded_completion(engine: Engine, llama_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    prompt = "Hello world"
    result = await collect(engine, request(prompt, max_tokens=60, ignore_eos=True))
    assert result.final.finish_reason is FinishReason.LENGTH
    assert result.final.completion_tokens == 60 == len(result.token_ids)
    prompt_ids = tokenizer.encode(prompt)
    full = tokenizer.decode(prompt_ids + result.token_ids, skip_special_tokens=True)
    assert result.text == full[len(tokenizer.decode(prompt_ids, skip_special_tokens=True)) :]


async def test_same_seed_same_tokens_whatever_else_runs(engine: Engine) -> None:
    prompt = [10, 20, 30, 40]
    seeded = SamplingParams(temperature=1.5, top_p=0.95, seed=1234)
    alone = await collect(engine, request(prompt, sampling=seeded, max_tokens=30, ignore_eos=True))
    others = [
        request([7, 8, 9], sampling=SamplingParams(temperature=1.5), max_tokens=30)
        for _ in range(3)
    ]
    together = await asyncio.gather(
        collect(engine, request(prompt, sampling=seeded, max_tokens=30, ignore_eos=True)),
        *(collect(engine, r) for r in others),
    )
    assert together[0].token_ids == alone.token_ids
    outputs = set()
    for seed in range(5):
        sampling = SamplingParams(temperature=1.5, seed=seed)
        result = await collect(
            engine, request(prompt, sampling=sampling, max_tokens=30, ignore_eos=True)
        )
        outputs.add(tuple(result.token_ids))
    assert len(outputs) > 1  # the seed matters


async def test_stop_string_across_tokens_is_cut_and_never_streamed(
    engine: Engine, llama_dir: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    prompt = "The quick brown fox"
    free = await collect(engine, request(prompt, max_tokens=80, ignore_eos=True))
    ids = free.token_ids
    # Character offsets where tokens end, to pick a stop string that straddles a boundary.
    boundaries = {
        len(tokenizer.decode(ids[:k], skip_special_tokens=True)) for k in range(len(ids) + 1)
    }
    text = free.text
    start = next(
        i
        for i in range(1, len(text) - 4)
        if "\ufffd" not in text[i : i + 4] and any(i < b < i + 4 for b in boundaries)
    )
    stop = text[start : start + 4]
    stopped = await collect(engine, request(prompt, max_tokens=80, ignore_eos=True, stop=(stop,)))
    assert stopped.final.finish_reason is FinishReason.STOP
    assert stopped.final.stop_reason == stop
    assert stopped.text == text[: text.find(stop)]  # nothing of the stop string, before or after


async def test_stop_token_ids_and_min_tokens(engine: Engine) -> None:
    prompt = [11, 12, 13, 14, 15]
    free = await collect(engine, request(prompt, max_tokens=20, ignore_eos=True))
    first = free.token_ids[0]
    stopped = await collect(
        engine, request(prompt, max_tokens=20, ignore_eos=True, stop_token_ids=(first,))
    )
    assert stopped.token_ids == [first]
    assert stopped.final.finish_reason is FinishReason.STOP
    assert stopped.final.stop_reason == str(first)
    assert stopped.text == ""  # a stop token's text is not returned
    held = await collect(
        engine,
        request(prompt, max_tokens=20, ignore_eos=True, stop_token_ids=(first,), min_tokens=6),
    )
    assert first not in held.token_ids[:5]  # suppressed until min_tokens
    assert held.final.completion_tokens >= 6


async def test_min_tokens_suppresses_stop_strings(engine: Engine) -> None:
    prompt = [21, 22, 23]
    free = await collect(engine, request(prompt, max_tokens=30, ignore_eos=True))
    stop = free.text[:2]
    early = await collect(engine, request(prompt, max_tokens=30, ignore_eos=True, stop=(stop,)))
    assert early.text == "" and early.final.finish_reason is FinishReason.STOP
    late = await collect(
        engine, request(prompt, max_tokens=30, ignore_eos=True, stop=(stop,), min_tokens=10)
    )
    assert late.text.startswith(stop)
    assert late.final.completion_tokens >= 10


async def test_max_tokens_none_runs_to_the_context_window(engine: Engine) -> None:
    prompt = list(range(3, 203))
    result = await collect(engine, request(prompt, ignore_eos=True))
    assert result.final.finish_reason is FinishReason.LENGTH
    assert result.final.completion_tokens == engine.description.context_length - len(prompt)


async def test_logprobs(engine: Engine) -> None:
    result = await collect(engine, request([5, 6, 7], max_tokens=8, ignore_eos=True, logprobs=3))
    logprobs = [lp for c in result.chunks for lp in c.logprobs]
    assert [lp.token_id for lp in logprobs] == result.token_ids
    for lp in logprobs:
        assert lp.logprob <= 0
        assert len(lp.top) == 3
        assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
        assert all(t.logprob <= 0 for t in lp.top)
        # Greedy picks the most likely token.
        assert lp.top[0].token_id == lp.token_id and lp.top[0].logprob == lp.logprob
    plain = await collect(engine, request([5, 6, 7], max_tokens=4, ignore_eos=True))
    assert all(c.logprobs == [] for c in plain.chunks)
    only_chosen = await collect(engine, request([5, 6, 7], max_tokens=4, logprobs=0))
    assert all(lp.top == () for c in only_chosen.chunks for lp in c.logprobs)


async def test_sampling_knobs_and_penalties_run(engine: Engine) -> None:
    sampling = SamplingParams(
        temperature=0.8,
        top_k=20,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.3,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        seed=3,
    )
    result = await collect(engine, request([5, 6, 7], sampling=sampling, max_tokens=20))
    assert 1 <= result.final.completion_tokens <= 20
    # A strong repetition penalty keeps greedy output from repeating any token.
    unique = SamplingParams(temperature=0.0, repetition_penalty=1e6)
    distinct = await collect(engine, request([5], sampling=unique, max_tokens=30, ignore_eos=True))
    assert len(set(distinct.token_ids)) == 30


async def test_echo_chat_and_text_prompts(engine: Engine) -> None:
    text = await collect(engine, request("Hello world", max_tokens=3, echo=True))
    echo = text.chunks[0]
    assert echo.is_prompt_echo and echo.text == "Hello world"
    assert echo.token_ids == await engine.tokenize("Hello world")
    messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")]
    chat = await collect(engine, request(messages, max_tokens=3, echo=True))
    assert chat.chunks[0].text.endswith("<|im_start|>assistant\n")
    assert chat.chunks[0].token_ids == await engine.tokenize(messages)
    with pytest.raises(InvalidRequestError) as err:
        await collect(engine, request([ChatMessage("tool", "x")], max_tokens=3))
    assert err.value.param == "messages"
    with pytest.raises(InvalidRequestError) as err:
        await engine.tokenize([ChatMessage("robot", "x")])
    assert err.value.param == "messages"


async def test_fallback_chat_template(tmp_path: Path) -> None:
    path = save_tiny_llama(tmp_path, build_byte_level_tokenizer(chat_template=False))
    engine = await started(path)
    try:
        messages = [
            ChatMessage("user", "Hi"),
            ChatMessage("assistant", "Hello"),
            ChatMessage("user", "Bye"),
        ]
        result = await collect(engine, request(messages, max_tokens=2, echo=True))
        assert result.chunks[0].text == "user: Hi\nassistant: Hello\nuser: Bye\nassistant:"
    finally:
        await engine.stop()


@pytest.mark.parametrize(
    ("prompt", "sampling", "stopping", "logprobs", "param"),
    [
        ("", {}, {}, None, "prompt"),
        ([], {}, {}, None, "prompt"),
        ([1, 99_999], {}, {}, None, "prompt"),
        ([-1], {}, {}, None, "prompt"),
        (list(range(3, 259)), {}, {}, None, "prompt"),
        ([ChatMessage("user", "x" * 2000)], {}, {}, None, "messages"),
        ([5] * 200, {}, {"max_tokens": 100}, None, "max_tokens"),
        ([5], {}, {"max_tokens": 0}, None, "max_tokens"),
        ([5], {"temperature": -0.1}, {}, None, "temperature"),
        ([5], {"top_p": 0.0}, {}, None, "top_p"),
        ([5], {"top_p": 1.5}, {}, None, "top_p"),
        ([5], {"top_k": -1}, {}, None, "top_k"),
        ([5], {"min_p": 1.5}, {}, None, "min_p"),
        ([5], {"repetition_penalty": 0.0}, {}, None, "repetition_penalty"),
        ([5], {"presence_penalty": 2.5}, {}, None, "presence_penalty"),
        ([5], {"frequency_penalty": -3.0}, {}, None, "frequency_penalty"),
        ([5], {}, {}, 21, "logprobs"),
        ([5], {}, {"max_tokens": 3, "min_tokens": 4}, None, "min_tokens"),
        ([5], {}, {"stop_token_ids": (10_000,)}, None, "stop_token_ids"),
    ],
)
async def test_validation_errors_name_the_field(
    engine: Engine,
    prompt: Prompt,
    sampling: dict[str, float],
    stopping: dict[str, object],
    logprobs: int | None,
    param: str,
) -> None:
    req = GenerationRequest(
        request_id="bad",
        prompt=prompt,
        sampling=SamplingParams(**sampling),  # type: ignore[arg-type]
        stopping=StoppingParams(**stopping),  # type: ignore[arg-type]
        logprobs=logprobs,
    )
    with pytest.raises(InvalidRequestError) as err:
        await collect(engine, req)
    assert err.value.param == param
    assert engine.load().running == 0 and engine.load().waiting == 0


async def test_prompt_plus_max_tokens_message_gives_the_counts(engine: Engine) -> None:
    with pytest.raises(InvalidRequestError) as err:
        await collect(engine, request([5] * 200, max_tokens=100))
    assert "200" in err.value.message and "100" in err.value.message and "256" in err.value.message


async def test_closing_the_stream_cancels_and_frees_the_slot(llama_dir: Path) -> None:
    engine = await started(llama_dir, max_running=1, max_waiting=0)
    try:
        stream = engine.generate(request([5, 6], max_tokens=200, ignore_eos=True))
        await anext(stream)
        assert engine.load().running == 1
        # The only slot is taken and nothing may wait: a second request is refused at once.
        with pytest.raises(OverloadedError):
            await collect(engine, request([5], max_tokens=2))
        await stream.aclose()  # type: ignore[attr-defined]
        assert engine.load().running == 0
        result = await collect(engine, request([5], max_tokens=2, ignore_eos=True))
        assert result.final.finish_reason is FinishReason.LENGTH
    finally:
        await engine.stop()


async def test_cancelling_the_consumer_task_cancels_the_request(llama_dir: Path) -> None:
    engine = await started(llama_dir, max_running=1)
    try:
        progress = asyncio.Event()
        task = asyncio.create_task(
            collect(engine, request([5, 6], max_tokens=200, ignore_eos=True), (1, progress))
        )
        await progress.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert engine.load().running == 0
        result = await collect(engine, request([5], max_tokens=2, ignore_eos=True))
        assert result.final.completion_tokens == 2
    finally:
        await engine.stop()


async def test_stop_cancels_outstanding_requests(llama_dir: Path) -> None:
    engine = await started(llama_dir, max_running=2)
    streams = [engine.generate(request([5 + i], max_tokens=200, ignore_eos=True)) for i in range(2)]
    for stream in streams:
        await anext(stream)
    await engine.stop()
    for stream in streams:
        rest = [chunk async for chunk in stream]
        assert rest[-1].finish_reason is FinishReason.CANCELLED
        assert rest[-1].completion_tokens < 200
    with pytest.raises(UnavailableError):
        await collect(engine, request([5], max_tokens=2))
    with pytest.raises(UnavailableError):
        await engine.embed(["x"])


async def test_drain_waits_for_running_work_and_refuses_new(llama_dir: Path) -> None:
    engine = await started(llama_dir, max_running=2)
    try:
        stream = engine.generate(request([5], max_tokens=40, ignore_eos=True))
        chunks = [await anext(stream)]
        drain = asyncio.create_task(engine.drain())
        chunks += [chunk async for chunk in stream]
        await drain
        assert chunks[-1].finish_reason is FinishReason.LENGTH
        assert sum(len(c.token_ids) for c in chunks) == 40  # not cut short
        with pytest.raises(UnavailableError):
            await collect(engine, request([5], max_tokens=2))
    finally:
        await engine.stop()


async def test_generate_before_start_is_unavailable(llama_dir: Path) -> None:
    engine = create_engine(ModelSpec(str(llama_dir)), EngineOptions())
    assert engine.description.name == llama_dir.name
    assert engine.description.context_length == 256
    with pytest.raises(UnavailableError):
        await collect(engine, request([5], max_tokens=2))
    await engine.stop()


async def test_tokenize(engine: Engine, llama_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    assert await engine.tokenize("Hello world") == tokenizer.encode("Hello world")
    ids = await engine.tokenize([ChatMessage("user", "Hi")])
    assert tokenizer.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


async def test_causal_lm_embeddings(engine: Engine) -> None:
    texts = ["Hello world", "The quick brown fox jumps over the lazy dog.", "Café 🙂"]
    vectors, tokens = await engine.embed(texts)
    again, _ = await engine.embed(texts)
    assert vectors == again
    assert len(vectors) == 3 and tokens == sum([len(await engine.tokenize(t)) for t in texts])
    for v in vectors:
        assert len(v) == 64
        assert torch.tensor(v).norm().item() == pytest.approx(1.0, abs=1e-5)
    # Batching (and its padding) does not change a text's vector.
    single, _ = await engine.embed([texts[1]])
    assert torch.allclose(torch.tensor(single[0]), torch.tensor(vectors[1]), atol=1e-5)


async def test_embedding_truncates_to_the_context(engine: Engine) -> None:
    _, tokens = await engine.embed(["hello " * 400])
    assert tokens == engine.description.context_length


@pytest.mark.parametrize("texts", [[], [""], ["ok", ""]])
async def test_embedding_rejects_empty_input(engine: Engine, texts: Sequence[str]) -> None:
    with pytest.raises(InvalidRequestError) as err:
        await engine.embed(texts)
    assert err.value.param == "input"


async def test_mixed_cancellations_leave_no_slot_behind(llama_dir: Path) -> None:
    engine = await started(llama_dir, max_running=3)
    try:

        async def consume(i: int) -> FinishReason | None:
            stream = engine.generate(request([5 + i, 6], max_tokens=30, ignore_eos=True))
            async for chunk in stream:
                if i % 3 == 0:
                    await stream.aclose()  # type: ignore[attr-defined]
                    return None
                if chunk.finish_reason is not None:
                    return chunk.finish_reason
            raise AssertionError("stream ended without a final chunk")

        reasons = await asyncio.gather(*(consume(i) for i in range(12)))
        assert reasons == [None if i % 3 == 0 else FinishReason.LENGTH for i in range(12)]
        load = engine.load()
        assert (load.running, load.waiting, load.capacity) == (0, 0, 3)
    finally:
        await engine.stop()


async def test_int8_quantized_engine_generates(llama_dir: Path) -> None:
    engine = await started(llama_dir, quantization="int8")  # type: ignore[arg-type]
    try:
        result = await collect(engine, request([5, 6, 7], max_tokens=6, ignore_eos=True))
        assert len(result.token_ids) == 6
        assert result.final.finish_reason is FinishReason.LENGTH
    finally:
        await engine.stop()


def test_unknown_quantization_is_refused() -> None:
    with pytest.raises(ValueError, match="quantization"):
        EngineOptions(quantization="int3")


# -- structured output, logit_bias, prompt logprobs, score-only -------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "tag": {"enum": ["red", "green"]},
    },
    "required": ["n", "ok", "tag"],
    "additionalProperties": False,
}


def constrained(
    prompt: Prompt, constraint: OutputConstraint, request_id: str = "c", **stopping: object
) -> GenerationRequest:
    return dataclasses.replace(
        request(prompt, request_id=request_id, **stopping), constraint=constraint
    )


async def test_constrained_output_parses_and_unconstrained_rows_are_untouched(
    engine: Engine,
) -> None:
    rng = random.Random(7)
    prompts = [random_prompt(rng, 5) for _ in range(4)]
    plain = [request(p, request_id=f"p{i}", max_tokens=20) for i, p in enumerate(prompts[:2])]
    alone = [await collect(engine, r) for r in plain]
    regex = r"[a-c]{2,5}-\d\d"
    choices = ("yes", "no", "maybe")
    mixed = await asyncio.gather(
        collect(engine, plain[0]),
        collect(
            engine,
            constrained(
                prompts[2], OutputConstraint(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMA))
            ),
        ),
        collect(engine, constrained(prompts[3], OutputConstraint(ConstraintKind.REGEX, regex))),
        collect(engine, plain[1]),
        collect(
            engine,
            constrained(prompts[0], OutputConstraint(ConstraintKind.CHOICE, choices=choices)),
        ),
    )
    # Batch invariance: the constrained neighbours change nothing for the plain rows.
    assert mixed[0].token_ids == alone[0].token_ids
    assert mixed[3].token_ids == alone[1].token_ids
    value = json.loads(mixed[1].text)
    assert set(value) == {"n", "ok", "tag"} and 0 <= value["n"] <= 99
    assert isinstance(value["ok"], bool) and value["tag"] in ("red", "green")
    assert re.fullmatch(regex, mixed[2].text)
    assert mixed[4].text in choices
    for result in (mixed[1], mixed[2], mixed[4]):
        assert result.final.finish_reason is FinishReason.STOP
    stats = engine.stats()
    assert stats.structured_mask_seconds > 0 and stats.step_seconds > stats.structured_mask_seconds


async def test_compiled_constraints_are_cached_and_bad_ones_refused(engine: Engine) -> None:
    assert isinstance(engine, HFEngine)
    compiler = engine.constraint_compiler
    assert compiler is not None
    schema = OutputConstraint(ConstraintKind.JSON_SCHEMA, '{"type": "boolean"}')
    hits = compiler.stats.hits
    first = await collect(engine, constrained([5, 6], schema))
    second = await collect(engine, constrained([5, 6], schema))
    assert compiler.stats.hits == hits + 1
    assert first.text == second.text and first.text in ("true", "false")
    bad = OutputConstraint(ConstraintKind.JSON_SCHEMA, '{"not": {"type": "string"}}')
    with pytest.raises(InvalidRequestError) as err:
        await collect(engine, constrained([5], bad))
    assert err.value.param == "constraint" and "not" in err.value.message
    with pytest.raises(InvalidRequestError) as err:
        await collect(engine, constrained([5], OutputConstraint(ConstraintKind.JSON_SCHEMA, "{")))
    assert err.value.param == "constraint"
    assert engine.load().running == 0 and engine.load().waiting == 0


async def test_logit_bias_bans_a_token(engine: Engine) -> None:
    prompt = [5, 6, 7]
    base = await collect(engine, request(prompt, max_tokens=12, ignore_eos=True))
    banned = base.token_ids[0]
    biased = dataclasses.replace(
        request(prompt, max_tokens=12, ignore_eos=True), logit_bias=((banned, -100.0),)
    )
    result = await collect(engine, biased)
    assert result.token_ids != base.token_ids
    assert banned not in result.token_ids
    # A strong positive bias makes a token the greedy pick.
    favoured = dataclasses.replace(
        request(prompt, max_tokens=3, ignore_eos=True), logit_bias=((42, 100.0),)
    )
    assert (await collect(engine, favoured)).token_ids == [42, 42, 42]


@pytest.mark.parametrize(
    ("bias", "param"),
    [(((10_000, 1.0),), "logit_bias"), (((5, 101.0),), "logit_bias"),
     (((5, float("nan")),), "logit_bias")],
)  # fmt: skip
async def test_logit_bias_validation(
    engine: Engine, bias: tuple[tuple[int, float], ...], param: str
) -> None:
    with pytest.raises(InvalidRequestError) as err:
        await collect(engine, dataclasses.replace(request([5], max_tokens=2), logit_bias=bias))
    assert err.value.param == param


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="packed"),
        pytest.param({"max_batch_tokens": 8}, id="chunked-prefill"),
        pytest.param({"packed": False}, id="per-sequence"),
        # One sequence at a time: the other is preempted and recomputed, never rescored.
        pytest.param({"kv_cache_tokens": 256}, id="preemption"),
    ],
)
async def test_prompt_logprobs_match_a_plain_forward(
    llama_dir: Path,
    hf_model: AutoModelForCausalLM,
    options: dict[str, object],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="services.worker.engine.step_loop")
    rng = random.Random(3)
    prompts = [random_prompt(rng, 21), random_prompt(rng, 9)]
    engine = await started(llama_dir, max_running=2, **options)  # type: ignore[arg-type]
    try:
        results = await asyncio.gather(
            *(
                collect(
                    engine,
                    dataclasses.replace(
                        request(p, request_id=f"r{i}", max_tokens=30, echo=True, logprobs=2),
                        prompt_logprobs=True,
                    ),
                )
                for i, p in enumerate(prompts)
            )
        )
    finally:
        await engine.stop()
    for prompt, result in zip(prompts, results, strict=True):
        echo = result.chunks[0]
        assert echo.is_prompt_echo and echo.token_ids == prompt
        assert [lp.token_id for lp in echo.logprobs] == prompt
        assert math.isnan(echo.logprobs[0].logprob) and echo.logprobs[0].top == ()
        with torch.inference_mode():
            logits = hf_model(torch.tensor([prompt])).logits[0].float()
        expected = torch.log_softmax(logits, dim=-1)
        for position in range(1, len(prompt)):
            lp = echo.logprobs[position]
            row = expected[position - 1]
            assert lp.logprob == pytest.approx(float(row[prompt[position]]), abs=1e-4)
            assert [t.token_id for t in lp.top] == row.topk(2).indices.tolist()
        assert not any(c.is_prompt_echo for c in result.chunks[1:])
        assert result.final.completion_tokens == len(result.token_ids) > 0
    if "kv_cache_tokens" in options:
        assert any("preempted" in record.getMessage() for record in caplog.records)


async def test_score_only_returns_the_echo_and_length(engine: Engine) -> None:
    prompt = [5, 6, 7, 8]
    for prompt_logprobs in (False, True):
        req = dataclasses.replace(
            request(prompt, max_tokens=0, echo=True), prompt_logprobs=prompt_logprobs
        )
        result = await collect(engine, req)
        assert result.chunks[0].is_prompt_echo and result.chunks[0].token_ids == prompt
        assert len(result.chunks[0].logprobs) == (len(prompt) if prompt_logprobs else 0)
        assert result.token_ids == [] and result.text == ""
        assert result.final.finish_reason is FinishReason.LENGTH
        assert result.final.completion_tokens == 0 and result.final.prompt_tokens == len(prompt)
    with pytest.raises(InvalidRequestError) as err:
        await collect(engine, request(prompt, max_tokens=0))
    assert err.value.param == "max_tokens"
    assert engine.load().running == 0 and engine.load().waiting == 0
