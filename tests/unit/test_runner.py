"""Model runners driven step by step: the packed batch equals transformers' own generate."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from services.worker.engine.runner import (
    CacheFullError,
    ForwardItem,
    HFRunner,
    ModelRunner,
    PackedRunner,
    create_runner,
    packed_unsupported_reason,
)

VOCAB = 300
SHAPE = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": VOCAB,
    "max_position_embeddings": 1024,
}


# The packed runner's portable attention path (per-block SDPA, as on GPUs), beside the CPU kernel.
SDPA_RUNNER = functools.partial(PackedRunner, attention_kernel=False)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # A tiny model gains nothing from more threads, and suffers when the cores are busy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(kind: str) -> PreTrainedModel:
    torch.manual_seed(0)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**SHAPE)).eval()
    return LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()


def greedy_alone(model: PreTrainedModel, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def run_greedy(
    runner: ModelRunner,
    prompts: list[list[int]],
    n: int,
    *,
    chunk: int,
    preempt_at: int | None = None,
) -> list[list[int]]:
    """A minimal scheduler: one request joins per step, prompts go in chunks, and optionally
    one sequence loses its cache mid-way and is recomputed."""
    tokens = [list(p) for p in prompts]
    computed = [0] * len(prompts)
    outputs: list[list[int]] = [[] for _ in prompts]
    active: list[int] = []
    step = 0
    with torch.inference_mode():
        while step < len(prompts) or active:
            if step < len(prompts):
                active.append(step)
            items = []
            for i in active:
                pending = tokens[i][computed[i] : computed[i] + chunk]
                done = computed[i] + len(pending) == len(tokens[i])
                items.append(ForwardItem(i, pending, computed[i], done))
            logits = runner.forward(items)
            row = 0
            for item in items:
                i = int(item.key)  # type: ignore[call-overload]
                computed[i] += len(item.token_ids)
                if item.want_logits:
                    token = int(logits[row].argmax())
                    row += 1
                    outputs[i].append(token)
                    tokens[i].append(token)
            for i in [i for i in active if len(outputs[i]) >= n]:
                active.remove(i)
                runner.release(i)
            if step == preempt_at and active:
                runner.release(active[-1])
                computed[active[-1]] = 0
            step += 1
    return outputs


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize(
    ("make_runner", "chunk", "preempt_at"),
    [
        pytest.param(PackedRunner, 1000, None, id="packed"),
        pytest.param(PackedRunner, 5, None, id="packed-chunked"),
        pytest.param(PackedRunner, 7, 6, id="packed-preempted"),
        pytest.param(SDPA_RUNNER, 5, 6, id="packed-sdpa-chunked-preempted"),
        pytest.param(HFRunner, 5, 6, id="per-sequence"),
    ],
)
def test_batched_greedy_equals_generate_alone(
    kind: str,
    make_runner: Callable[[PreTrainedModel, int, int], ModelRunner],
    chunk: int,
    preempt_at: int | None,
) -> None:
    model = tiny(kind)
    rng = random.Random(7)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (4, 19, 33, 1, 12)]
    n = 10
    expected = [greedy_alone(model, p, n) for p in prompts]
    runner = make_runner(model, 8, 8192)
    assert run_greedy(runner, prompts, n, chunk=chunk, preempt_at=preempt_at) == expected


def test_packed_cache_grows_shrinks_and_keeps_rows_dense() -> None:
    model = tiny("llama")
    runner = PackedRunner(model, max_rows=4, max_cache_tokens=1536)
    assert runner.fits([256, 256, 256, 256])
    assert not runner.fits([257, 1, 1, 1])  # capacity rounds up to 512 for every row
    assert not runner.fits([1] * 5)  # more rows than max_rows
    with torch.inference_mode():
        runner.forward([ForwardItem("a", [1, 2, 3], 0, True), ForwardItem("b", [4], 0, True)])
        runner.forward([ForwardItem("c", list(range(300)), 0, True)])
        with pytest.raises(CacheFullError):
            # Four rows of 512 positions exceed 1536.
            runner.forward([ForwardItem("d", [5], 0, True)])
        runner.release("c")  # its row is refilled by the last one; rows stay 0..n-1
        runner.release("a")
        logits = runner.forward([ForwardItem("b", [6], 1, True), ForwardItem("d", [5], 0, True)])
        assert logits.shape == (2, VOCAB)
        runner.release("b")
        runner.release("d")
    assert runner.fits([512, 512])


def test_runner_choice() -> None:
    llama = tiny("llama")
    assert packed_unsupported_reason(llama) is None
    packed = create_runner(llama, 4, 4096)
    assert isinstance(packed, PackedRunner) and packed.attention_backend == "kernel"
    assert SDPA_RUNNER(llama, 4, 4096).attention_backend == "sdpa"
    odd = LlamaForCausalLM(LlamaConfig(**{**SHAPE, "num_attention_heads": 8})).eval()
    assert PackedRunner(odd, 4, 4096).attention_backend == "sdpa"  # head_dim 8: not 16 lanes
    windowed = LlamaForCausalLM(LlamaConfig(**SHAPE))
    windowed.config.model_type = "gpt2"  # any architecture without a packed path
    assert isinstance(create_runner(windowed, 4, 4096), HFRunner)


@pytest.mark.parametrize("kind", ["packed", "per-sequence"])
def test_all_logits_items_return_every_position(kind: str) -> None:
    model = tiny("llama")
    runner: ModelRunner = (
        PackedRunner(model, 4, 4096) if kind == "packed" else HFRunner(model, 4, 4096)
    )
    rng = random.Random(5)
    prompt = [rng.randrange(VOCAB) for _ in range(13)]
    other = [rng.randrange(VOCAB) for _ in range(6)]
    with torch.inference_mode():
        expected = model(torch.tensor([prompt])).logits[0].float()
        # The prompt in two chunks beside another sequence's prefill (last-position logits).
        first = runner.forward(
            [ForwardItem("a", prompt[:8], 0, False, True), ForwardItem("b", other, 0, True)]
        )
        second = runner.forward([ForwardItem("a", prompt[8:], 8, True, True)])
    assert first.shape == (8 + 1, VOCAB) and second.shape == (5, VOCAB)
    torch.testing.assert_close(first[:8], expected[:8], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(second, expected[8:], atol=1e-4, rtol=1e-4)
    assert ForwardItem("a", prompt[:8], 0, False, True).logit_rows == 8
    assert ForwardItem("a", prompt[:8], 0, True).logit_rows == 1


@pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no bfloat16 oneDNN products"
)
@pytest.mark.parametrize(
    ("attention_kernel", "kv_dtype", "fused_layers"),
    [
        pytest.param(True, torch.float32, False, id="kernel-kv32"),
        pytest.param(True, torch.bfloat16, True, id="kernel-kv16-fused"),
        pytest.param(True, torch.bfloat16, False, id="kernel-kv16"),
        pytest.param(False, torch.float32, False, id="sdpa-kv32"),
        pytest.param(False, torch.bfloat16, False, id="sdpa-kv16"),
    ],
)
def test_a_bf16_position_computes_the_same_whatever_the_chunking_batch_or_decode(
    attention_kernel: bool, kv_dtype: torch.dtype, fused_layers: bool
) -> None:
    """With bf16 layers (the served default on AMX CPUs), the logits after a prompt are equal bit
    for bit whether it is prefilled whole, in chunks of any size (1 and 2 included), or decoded
    token by token, alone or beside other sequences: oneDNN's bf16 products compute each row
    alike for any number of rows, and attention computes each row alike (attention_kernel.c)
    or runs per block (runner._attention_groups); with keys and values in float32 or in bf16
    (as the served approximate modes keep them), the layers' glue in torch or compiled (the
    fused path, bf16 cache only).
    (float32 products are not row-invariant in MKL, which picks its kernel by the row count; the
    float32 path is checked against generate's greedy tokens instead.)"""
    from services.worker.engine.quantization import quantize

    model = quantize(tiny("llama"), "bf16")
    rng = random.Random(5)
    prompt = [rng.randrange(3, VOCAB) for _ in range(41)]
    other = [rng.randrange(3, VOCAB) for _ in range(23)]

    def last_logits(chunks: list[int], *, neighbour: bool) -> torch.Tensor:
        runner = PackedRunner(
            model,
            max_rows=4,
            max_cache_tokens=4096,
            attention_kernel=attention_kernel,
            kv_dtype=kv_dtype,
            fused_layers=fused_layers,
        )
        assert runner.fused_layers == fused_layers
        start = 0
        logits = torch.empty(0)
        for size in chunks:
            piece = prompt[start : start + size]
            last = start + size == len(prompt)
            items = [ForwardItem("p", piece, start, want_logits=last)]
            if neighbour:
                items.insert(0, ForwardItem(("o", start), other[: 1 + start % 20], 0, True))
            result = runner.forward(items)
            if last:
                logits = result[-1]
            if neighbour:
                runner.release(("o", start))
            start += size
        return logits

    whole = last_logits([41], neighbour=False)
    for chunks in ([7, 16, 1, 2, 15], [1] * 41, [40, 1], [16, 16, 9], [2, 2, 37]):
        for neighbour in (False, True):
            assert torch.equal(last_logits(chunks, neighbour=neighbour), whole), (chunks, neighbour)


@pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no bfloat16 oneDNN products"
)
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16], ids=["kv32", "kv16-fused"])
@pytest.mark.parametrize("int4_prompts", [True, False], ids=["int4-prompts", "bf16-prompts"])
def test_an_int4_position_computes_the_same_whatever_the_batch_chunking_or_recompute(
    kv_dtype: torch.dtype, int4_prompts: bool
) -> None:
    """Under int4 quantization generated positions take the 4-bit kernel, and prompt positions
    the 4-bit one too or the bf16 one, by what the position holds: a generated token's logits
    are equal bit for bit whether it was decoded step by step, alone or beside another
    sequence, or recomputed with the prompt in one or several chunks after a preemption. With
    4-bit prompts, earlier answers resent as a prompt compute as they did when generated (what
    lets a prefix cache share them)."""
    from services.worker.engine.quantization import quantize

    model = quantize(tiny("llama"), "int4", int4_prompts=int4_prompts)
    rng = random.Random(9)
    prompt = [rng.randrange(3, VOCAB) for _ in range(21)]
    generated = [rng.randrange(3, VOCAB) for _ in range(12)]
    tokens = prompt + generated
    other = [rng.randrange(3, VOCAB) for _ in range(30)]

    def last_logits(
        chunks: list[int], *, neighbour: bool, prompt_length: int | None
    ) -> torch.Tensor:
        runner = PackedRunner(model, max_rows=4, max_cache_tokens=4096, kv_dtype=kv_dtype)
        assert runner.fused_layers == (kv_dtype == torch.bfloat16)
        start = 0
        logits = torch.empty(0)
        for size in chunks:
            items = [
                ForwardItem("s", tokens[start : start + size], start, True, False, prompt_length)
            ]
            if neighbour:
                items.append(ForwardItem(("o", start), other[: 2 + start % 25], 0, True, False, 3))
            logits = runner.forward(items)[0]
            if neighbour:
                runner.release(("o", start))
            start += size
        return logits

    decoded = last_logits([21] + [1] * 12, neighbour=False, prompt_length=21)
    for chunks in ([21] + [1] * 12, [5, 16] + [1] * 12, [33], [22, 11], [7, 7, 7, 12]):
        for neighbour in (False, True):
            got = last_logits(chunks, neighbour=neighbour, prompt_length=21)
            assert torch.equal(got, decoded), (chunks, neighbour)
    # The answer resent as a prompt, then one more token generated (with bf16 prompts the
    # output layer differs for prompt and generated positions, so compare a generated one): the
    # same logits where prompts take the 4-bit layers, another rounding where they take bf16.
    tokens.append(rng.randrange(3, VOCAB))
    after_decoding = last_logits([21] + [1] * 13, neighbour=False, prompt_length=21)
    after_prompt = last_logits([33, 1], neighbour=False, prompt_length=33)
    assert torch.equal(after_prompt, after_decoding) == int4_prompts


@pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no bfloat16 oneDNN products"
)
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["bf16", "int4", "int4-bf16-prompts", "w4a8"])
def test_fused_layers_compute_what_the_torch_path_does_up_to_the_norms_rounding(
    kind: str, mode: str
) -> None:
    """The compiled glue between bf16 products (rotary positions, cache writes, attention, norms,
    activation) gives the torch path's logits within the last bits its norms and activation
    round otherwise, prefilling and decoding several sequences at once."""
    from services.worker.engine.quantization import quantize

    model = quantize(tiny(kind), mode.split("-")[0], int4_prompts=mode == "int4")
    rng = random.Random(11)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (19, 40, 7)]

    def logits(fused: bool) -> list[torch.Tensor]:
        runner = PackedRunner(model, 4, 4096, kv_dtype=torch.bfloat16, fused_layers=fused)
        assert runner.fused_layers == fused
        items = [ForwardItem(i, p, 0, True, prompt_length=len(p)) for i, p in enumerate(prompts)]
        steps = [runner.forward(items)]
        for extra in range(3):  # decode the same tokens for both paths (int4: 4-bit rows)
            items = [
                ForwardItem(i, [5 + extra], len(p) + extra, True, prompt_length=len(p))
                for i, p in enumerate(prompts)
            ]
            steps.append(runner.forward(items))
        return steps

    with torch.inference_mode():
        fused, plain = logits(True), logits(False)
    for got, want in zip(fused, plain, strict=True):
        assert got.shape == want.shape == (3, VOCAB)
        # Logits of about +-0.5 here (equal bit for bit when this was written: the bf16 rounding
        # after each norm hides their float32 differences).
        torch.testing.assert_close(got, want, atol=1e-2, rtol=0)
        assert float(want.abs().max()) > 0.1


def test_fused_layers_only_where_the_glue_computes_the_model() -> None:
    """float32 layers, a float32 cache or torch's attention keep the torch path."""
    from services.worker.engine.quantization import quantize

    assert not PackedRunner(tiny("llama"), 4, 4096, kv_dtype=torch.bfloat16).fused_layers
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        bf16 = quantize(tiny("llama"), "bf16")
        assert not PackedRunner(bf16, 4, 4096).fused_layers  # float32 cache
        assert not PackedRunner(
            bf16, 4, 4096, kv_dtype=torch.bfloat16, attention_kernel=False
        ).fused_layers
        for int4_prompts in (True, False):
            int4 = quantize(tiny("llama"), "int4", int4_prompts=int4_prompts)
            assert PackedRunner(int4, 4, 4096, kv_dtype=torch.bfloat16).fused_layers
            assert not PackedRunner(int4, 4, 4096).fused_layers
