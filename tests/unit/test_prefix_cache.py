"""Prefix caching: the block store, the packed runner reusing cached keys and values (greedy
output equal to transformers' generate alone), eviction within the KV budget, and sequences that
were cancelled or failed mid-prefill never leaving a block a later request reuses wrongly."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from models import save_tiny_llama
from prometheus_client import generate_latest
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from services.worker.config import WorkerConfig, add_arguments
from services.worker.engine import quantization as quantization_module
from services.worker.engine.factory import create_engine
from services.worker.engine.hf_engine import HFEngine
from services.worker.engine.interface import (
    Engine,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
    StoppingParams,
)
from services.worker.engine.loading import EngineOptions, ModelSpec
from services.worker.engine.prefix_cache import BLOCK_SIZE, PrefixCache
from services.worker.engine.runner import ForwardItem, HFRunner, PackedRunner
from services.worker.metrics import worker_metrics_registry

VOCAB = 300
SHAPE: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": VOCAB,
    "max_position_embeddings": 1024,
}
B = BLOCK_SIZE


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(kind: str = "llama") -> PreTrainedModel:
    torch.manual_seed(0)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**SHAPE)).eval()
    return LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()


def greedy_alone(model: PreTrainedModel, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(  # type: ignore[operator]
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


class Driver:
    """A minimal scheduler over a runner: requests join when submitted, start from what the
    prefix cache holds, prefill in chunks and decode greedily; the budget is checked every step."""

    def __init__(self, runner: PackedRunner, *, chunk: int = 1000) -> None:
        self.runner = runner
        self.chunk = chunk
        self.seqs: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        self.wanted: dict[str, int] = {}
        self.outputs: dict[str, list[int]] = {}
        self.hits: dict[str, int] = {}

    def submit(self, key: str, prompt: list[int], n: int) -> None:
        self.seqs[key] = list(prompt)
        self.wanted[key] = n
        self.outputs[key] = []
        self.computed[key] = self.runner.reuse_prefix(key, prompt)
        self.hits[key] = self.computed[key]

    def step(self) -> None:
        runner = self.runner
        items = []
        for key, seq in self.seqs.items():
            pending = seq[self.computed[key] : self.computed[key] + self.chunk]
            done = self.computed[key] + len(pending) == len(seq)
            items.append(ForwardItem(key, pending, self.computed[key], done))
        with torch.inference_mode():
            logits = runner.forward(items)
        assert runner.allocated_tokens() + runner.prefix_cache_tokens() <= runner.max_cache_tokens
        row = 0
        for item in items:
            key = str(item.key)
            self.computed[key] += len(item.token_ids)
            if item.want_logits:
                token = int(logits[row].argmax())
                row += 1
                self.outputs[key].append(token)
                self.seqs[key].append(token)
        for key in [k for k in self.seqs if len(self.outputs[k]) >= self.wanted[k]]:
            del self.seqs[key]
            runner.release(key)

    def run(self) -> None:
        while self.seqs:
            self.step()

    def generate(self, key: str, prompt: list[int], n: int) -> list[int]:
        self.submit(key, prompt, n)
        self.run()
        return self.outputs[key]


# -- the store ----------------------------------------------------------------------------------


def test_store_matches_whole_blocks_of_exact_prefixes() -> None:
    cache = PrefixCache(block_size=2)
    cache.set_limit(100)
    a = cache.add(cache.block_key(None, [1, 2]), torch.zeros(1))
    b = cache.add(cache.block_key(a, [3, 4]), torch.zeros(1))
    assert cache.match([1, 2, 3, 4, 5]) == [a, b]
    assert cache.match([1, 2, 3]) == [a]  # full blocks only
    assert cache.match([1, 2, 3, 5]) == [a]
    assert cache.match([3, 4]) == []  # the same tokens after another prefix are another block
    assert cache.tokens == 4


def test_store_evicts_least_recently_used_leaves_first() -> None:
    cache = PrefixCache(block_size=1)
    cache.set_limit(4)
    root = cache.add(cache.block_key(None, [1]), torch.zeros(1))
    old = cache.add(cache.block_key(root, [2]), torch.zeros(1))
    cache.touch([root, old])
    new = cache.add(cache.block_key(root, [3]), torch.zeros(1))
    cache.touch([root, new])
    # The root was used last of all, yet it goes last: its children depend on it.
    cache.set_limit(2)
    assert not old.alive and new.alive and root.alive
    assert cache.match([1, 3]) == [root, new]
    cache.set_limit(1)
    assert not new.alive and root.alive
    assert cache.evictions == 2
    # Room for new blocks is made by evicting, except the blocks a caller still extends.
    assert cache.room(1, protected=[root]) == 0 and root.alive
    assert cache.room(1, protected=[]) == 1 and not root.alive


# -- the packed runner --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_cached_prefixes_give_the_same_greedy_output(kind: str) -> None:
    model = tiny(kind)
    rng = random.Random(3)
    base = tokens(rng, 40)
    driver = Driver(PackedRunner(model, 8, 8192, prefix_caching=True), chunk=24)
    n = 10
    first = driver.generate("first", base, n)
    assert first == greedy_alone(model, base, n) and driver.hits["first"] == 0
    # Computed: 40 prompt + 9 output positions -> three full blocks cached, the third holding
    # the start of the answer.
    assert driver.runner.prefix_cache_tokens() == 3 * B
    follow_up = base + first[:8] + tokens(rng, 5)  # the next turn repeats the answer
    cases = [
        ("same-prompt", base, 32),
        ("whole-prompt-cached", base[:32], 31),  # all but the last token
        ("cached-plus-one", [*base[:32], 7], 32),
        ("diverges-mid-block", base[:20] + tokens(rng, 9), 16),
        ("next-turn", follow_up, 48),
        ("nothing-shared", tokens(rng, 30), 0),
    ]
    for key, prompt, hit in cases:
        assert driver.generate(key, prompt, n) == greedy_alone(model, prompt, n), key
        assert driver.hits[key] == hit, key


def test_concurrent_sharing_chunked_and_preempted_sequences_stay_exact() -> None:
    model = tiny()
    rng = random.Random(11)
    system = tokens(rng, 37)
    prompts = {f"r{i}": system + tokens(rng, rng.randrange(1, 30)) for i in range(6)}
    n = 12
    expected = {key: greedy_alone(model, p, n) for key, p in prompts.items()}
    driver = Driver(PackedRunner(model, 8, 8192, prefix_caching=True), chunk=7)
    driver.generate("r0", prompts["r0"], n)
    for key in ("r1", "r2", "r3"):  # join together, each beside the others' prefill
        driver.submit(key, prompts[key], n)
    driver.step()
    driver.step()
    # r1 loses its row mid-way (preempted) and is recomputed from what the cache holds.
    driver.runner.release("r1")
    resumed = driver.seqs["r1"]
    driver.computed["r1"] = driver.runner.reuse_prefix("r1", resumed)
    assert driver.computed["r1"] == 32
    driver.submit("r4", prompts["r4"], n)
    driver.run()
    driver.generate("r5", prompts["r5"], n)
    assert driver.outputs == {k: v for k, v in expected.items() if k in driver.outputs}
    assert len(driver.outputs) == 6
    assert all(driver.hits[key] == 32 for key in ("r1", "r2", "r3", "r4", "r5"))


def test_cache_stays_within_the_budget_and_evicts_least_recently_used() -> None:
    model = tiny()
    rng = random.Random(5)
    # Two rows of 256 positions take half the budget while a request runs; the store the rest.
    runner = PackedRunner(model, 2, 1024, prefix_caching=True)
    driver = Driver(runner, chunk=64)  # checks rows + store <= budget after every step
    prompts = [tokens(rng, 150) for _ in range(5)]
    whole = 9 * B  # 153 positions computed per request: nine blocks

    def cached(i: int) -> int:
        hit = runner.reuse_prefix("probe", prompts[i] + [1])  # touches what it finds
        runner.release("probe")
        return hit

    for i in range(4):
        driver.generate(f"p{i}", prompts[i], 4)
    # 32 blocks while p3 ran: p3, p2, p1 whole, and p0's five first (its last ones went first).
    assert [cached(i) for i in (3, 2, 0)] == [whole, whole, 5 * B]
    # p1 is now the least recently used: p4 takes its room, not that of p0 (older, but reused).
    driver.generate("p4", prompts[4], 4)
    assert [cached(i) for i in (1, 0, 2, 3, 4)] == [0, 5 * B, whole, whole, whole]
    # A running sequence is never starved by the cache: it takes the whole budget if it needs.
    long_prompt = tokens(rng, 900)
    assert runner.fits([len(long_prompt) + 4])
    assert driver.generate("long", long_prompt, 4) == greedy_alone(model, long_prompt, 4)
    assert [cached(i) for i in range(5)] == [0] * 5
    # Once it is done its blocks are kept (room for them came back with its row).
    assert runner.reuse_prefix("again", [*long_prompt, 2]) == 896
    assert runner.prefix_cache_tokens() <= 1024


def test_a_sequence_cancelled_mid_prefill_shares_only_what_it_computed() -> None:
    model = tiny()
    rng = random.Random(9)
    prompt = tokens(rng, 70)
    runner = PackedRunner(model, 4, 4096, prefix_caching=True)
    with torch.inference_mode():
        runner.forward([ForwardItem("cancelled", prompt[:20], 0, False)])
        runner.forward([ForwardItem("cancelled", prompt[20:45], 20, False)])
    runner.release("cancelled")  # as the engine does for a cancelled request
    assert runner.prefix_cache_tokens() == 2 * B  # 45 positions computed: two whole blocks
    driver = Driver(runner)
    other = prompt[:60] + tokens(rng, 3)
    assert driver.generate("later", other, 8) == greedy_alone(model, other, 8)
    assert driver.hits["later"] == 2 * B


def test_a_failed_forward_shares_nothing_it_wrote(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny()
    rng = random.Random(4)
    prompt = tokens(rng, 64)
    runner = PackedRunner(model, 4, 4096, prefix_caching=True)

    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("out of memory")

    with torch.inference_mode():
        runner.forward([ForwardItem("failed", prompt[:16], 0, False)])
        # Layer 0 writes the chunk's keys and values, then layer 1 fails.
        monkeypatch.setattr(model.model.layers[1].mlp.down_proj, "forward", broken)
        with pytest.raises(RuntimeError):
            runner.forward([ForwardItem("failed", prompt[16:], 16, True)])
        monkeypatch.undo()
    runner.release("failed")  # the engine drops the rows of a failed step
    assert runner.prefix_cache_tokens() == B
    driver = Driver(runner)
    assert driver.generate("later", prompt, 6) == greedy_alone(model, prompt, 6)
    assert driver.hits["later"] == B


def test_runners_without_a_prefix_cache_find_nothing() -> None:
    model = tiny()
    for runner in (HFRunner(model, 4, 4096), PackedRunner(model, 4, 4096)):
        assert not runner.prefix_caching
        with torch.inference_mode():
            runner.forward([ForwardItem("a", list(range(40)), 0, True)])
        assert runner.reuse_prefix("b", list(range(41))) == 0
        assert runner.prefix_cache_tokens() == 0


# -- the engine ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


async def started(path: Path, **options: object) -> Engine:
    options.setdefault("threads", 1)
    options.setdefault("quantization", "none")
    engine = create_engine(ModelSpec(str(path), ("tiny",)), EngineOptions(**options))  # type: ignore[arg-type]
    await engine.start()
    return engine


async def answer(engine: Engine, prompt: Sequence[int], max_tokens: int) -> GenerationChunk:
    """Greedy completion; the final chunk carries the whole answer's token ids."""
    request = GenerationRequest(
        request_id="r",
        prompt=list(prompt),
        sampling=SamplingParams(temperature=0.0),
        stopping=StoppingParams(max_tokens=max_tokens, ignore_eos=True),
    )
    token_ids: list[int] = []
    async for chunk in engine.generate(request):
        token_ids += chunk.token_ids
    chunk.token_ids = token_ids
    return chunk


BF16_AVAILABLE = (
    torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
)


NEEDS_BF16 = pytest.mark.skipif(not BF16_AVAILABLE, reason="no bfloat16 oneDNN products")


INT4_LAYOUTS = [
    pytest.param("int4", True, marks=NEEDS_BF16, id="int4"),
    pytest.param("int4", False, marks=NEEDS_BF16, id="int4-bf16-prompts"),
]


@pytest.fixture
def int4_prompts(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Whether int4 prompts take the 4-bit layers (else bf16 ones, as on an AMX CPU), whatever
    this CPU would choose."""
    chosen = bool(getattr(request, "param", True))
    monkeypatch.setattr(quantization_module, "int4_prompts_are_fast", lambda: chosen)
    return chosen


@pytest.mark.parametrize(
    ("quantization", "int4_prompts"),
    [
        ("none", True),
        pytest.param("bf16", True, marks=NEEDS_BF16, id="bf16"),
        *INT4_LAYOUTS,
        pytest.param("w4a8", True, marks=NEEDS_BF16, id="w4a8"),
    ],
    indirect=["int4_prompts"],
)
async def test_engine_reuses_earlier_turns_and_answers_as_without_the_cache(
    llama_dir: Path, quantization: str, int4_prompts: bool
) -> None:
    rng = random.Random(2)
    system = [rng.randrange(3, 512) for _ in range(40)]
    engines = [
        await started(llama_dir, quantization=quantization),
        await started(llama_dir, prefix_caching=False, quantization=quantization),
    ]
    try:
        answers: list[list[GenerationChunk]] = [[], []]
        for engine, turns in zip(engines, answers, strict=True):
            history = list(system)
            for _ in range(4):  # each turn resends the conversation so far
                history += [rng.randrange(3, 512) for _ in range(7)]
                turns.append(await answer(engine, history, 12))
                history += turns[-1].token_ids
            rng = random.Random(2)  # the same conversation for the other engine
            system = [rng.randrange(3, 512) for _ in range(40)]
        cached, cold = answers
        assert [t.token_ids for t in cached] == [t.token_ids for t in cold]
        assert [t.cached_prompt_tokens for t in cold] == [0] * 4
        hits = [t.cached_prompt_tokens for t in cached]
        assert hits[0] == 0
        for turn, previous in zip(cached[1:], cached, strict=False):
            if quantization == "int4" and not int4_prompts:
                # Only prompt positions are shared (answers took the 4-bit kernel, prompts the
                # bf16 one): every later turn finds the earlier prompt but its last partial block.
                assert turn.cached_prompt_tokens == previous.prompt_tokens // B * B
            else:
                # The whole earlier conversation but its last partial block.
                assert turn.cached_prompt_tokens == (previous.prompt_tokens + 11) // B * B
        stats = [engine.stats() for engine in engines]
        assert stats[0].prefix_cache_hit_tokens == sum(hits)
        assert stats[0].prefix_cache_queried_tokens == sum(t.prompt_tokens for t in cached)
        assert stats[1].prefix_cache_hit_tokens == stats[1].prefix_cache_queried_tokens == 0
        exposed = generate_latest(worker_metrics_registry(engines[:1])).decode()
        labels = '{model_name="tiny"}'
        assert f"chatfleet:prefix_cache_hit_tokens_total{labels} {float(sum(hits))}" in exposed
        queried = float(stats[0].prefix_cache_queried_tokens)
        assert f"chatfleet:prefix_cache_queried_tokens_total{labels} {queried}" in exposed
    finally:
        for engine in engines:
            await engine.stop()


async def test_a_request_cancelled_mid_prefill_leaves_no_poisoned_block(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(8)
    prompt = [rng.randrange(3, 512) for _ in range(200)]
    later = prompt[:150] + [rng.randrange(3, 512) for _ in range(9)]
    cold = await started(llama_dir, prefix_caching=False)
    try:
        expected = (await answer(cold, later, 16)).token_ids
    finally:
        await cold.stop()
    # 16 tokens a step: the prompt takes 13 steps; the request is cancelled during the third.
    engine = await started(llama_dir, max_batch_tokens=16, max_running=2)
    assert isinstance(engine, HFEngine)
    runner = engine._runner
    assert runner is not None
    loop = asyncio.get_running_loop()
    third_step = asyncio.Event()
    cancelled = threading.Event()
    original = runner.forward
    steps = 0

    def forward(items: Sequence[ForwardItem]) -> torch.Tensor:
        nonlocal steps
        steps += 1
        if steps == 3:
            loop.call_soon_threadsafe(third_step.set)
            assert cancelled.wait(timeout=30)  # the step ends after the cancellation
        return original(items)

    try:
        monkeypatch.setattr(runner, "forward", forward)
        task = asyncio.create_task(answer(engine, prompt, 16))
        await third_step.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        cancelled.set()
        result = await answer(engine, later, 16)
        assert result.token_ids == expected
        assert result.cached_prompt_tokens == 3 * B  # the three chunks computed, no more
    finally:
        cancelled.set()
        await engine.stop()


@pytest.mark.parametrize(
    ("quantization", "int4_prompts"), [("none", True), *INT4_LAYOUTS], indirect=["int4_prompts"]
)
async def test_preempted_requests_reuse_prefixes_and_answer_as_without_the_cache(
    llama_dir: Path, quantization: str, int4_prompts: bool
) -> None:
    rng = random.Random(6)
    system = [rng.randrange(3, 512) for _ in range(70)]
    prompts = [system + [rng.randrange(3, 512) for _ in range(5 + i)] for i in range(4)]
    results = []
    for prefix_caching in (True, False):
        # Room for one sequence at a time: the newest are preempted and recomputed.
        engine = await started(
            llama_dir,
            max_running=4,
            kv_cache_tokens=256,
            prefix_caching=prefix_caching,
            quantization=quantization,
        )
        try:
            await answer(engine, [*system, 5], 4)  # the shared part is cached before the burst
            results.append(await asyncio.gather(*(answer(engine, p, 50) for p in prompts)))
            stats = engine.stats()
            assert stats.preemptions > 0
        finally:
            await engine.stop()
    cached, cold = results
    assert [r.token_ids for r in cached] == [r.token_ids for r in cold]
    if quantization == "none":
        assert all(r.cached_prompt_tokens > 0 for r in cached)
    else:
        # With room for one sequence, some requests start after the rows' growth evicted the
        # shared blocks (with bf16 prompts, int4 shares prompt blocks only).
        assert any(r.cached_prompt_tokens > 0 for r in cached)
        # Batch-invariant modes: each answer is the one the request gets alone, never preempted.
        engine = await started(llama_dir, quantization=quantization, prefix_caching=False)
        try:
            alone = [await answer(engine, p, 50) for p in prompts]
        finally:
            await engine.stop()
        assert [r.token_ids for r in alone] == [r.token_ids for r in cold]


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        ([], {}, True),
        (["--no-prefix-caching"], {}, False),
        ([], {"CHATFLEET_PREFIX_CACHING": "false"}, False),
        (["--prefix-caching"], {"CHATFLEET_PREFIX_CACHING": "0"}, True),
    ],
)
def test_the_worker_flag(argv: list[str], environ: dict[str, str], expected: bool) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, environ)
    config = WorkerConfig.from_namespace(parser.parse_args(["--model-path", "/m", *argv]))
    assert config.engine_options().prefix_caching is expected
