"""The CPU attention kernel (engine/attention.py): softmax attention over each row's own keys,
computed bit for bit alike whatever else the call holds."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from services.worker.engine.attention import (
    CpuAttention,
    LayerGlue,
    load_cpu_attention,
    load_layer_glue,
    scores_needed,
)

HEADS, KV_HEADS, HEAD_DIM, CAPACITY, ROWS = 6, 2, 32, 96, 3


@pytest.fixture(scope="module")
def kernel() -> CpuAttention:
    built = load_cpu_attention()
    assert built is not None, "the attention kernel did not build (is a C compiler on PATH?)"
    return built


def caches(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    shape = (ROWS, KV_HEADS, CAPACITY, HEAD_DIM)
    return torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: list[int], positions: list[int]
) -> torch.Tensor:
    """float64 softmax attention, one query row at a time."""
    out = torch.empty(q.shape, dtype=torch.float64)
    group = HEADS // KV_HEADS
    for i, (row, position) in enumerate(zip(rows, positions, strict=True)):
        keys = k[row, :, : position + 1].double().repeat_interleave(group, 0)
        values = v[row, :, : position + 1].double().repeat_interleave(group, 0)
        weights = (torch.einsum("hd,hjd->hj", q[i].double(), keys) * HEAD_DIM**-0.5).softmax(-1)
        out[i] = torch.einsum("hj,hjd->hd", weights, values)
    return out


def attend(
    kernel: CpuAttention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: list[int],
    positions: list[int],
) -> torch.Tensor:
    scores = torch.empty(scores_needed(HEADS, KV_HEADS, max(positions)))
    return kernel(q, k, v, torch.tensor(rows), torch.tensor(positions), HEAD_DIM**-0.5, scores)


# Queries and caches in one dtype, or float32 queries over a bf16 cache (the served bf16 modes).
DTYPES = [
    pytest.param(torch.float32, torch.float32, 1e-5, id="f32"),
    pytest.param(torch.bfloat16, torch.bfloat16, 2e-2, id="bf16"),
    pytest.param(torch.float32, torch.bfloat16, 1e-2, id="f32-over-bf16"),
]


@pytest.mark.parametrize(("dtype", "kv_dtype", "tolerance"), DTYPES)
def test_matches_softmax_attention_over_each_rows_own_keys(
    kernel: CpuAttention, dtype: torch.dtype, kv_dtype: torch.dtype, tolerance: float
) -> None:
    k, v = caches(kv_dtype)
    rng = random.Random(2)
    # Positions around the kernel's 16-lane blocks, and the last position of the capacity.
    positions = [0, 1, 14, 15, 16, 17, 40, CAPACITY - 1]
    rows = [rng.randrange(ROWS) for _ in positions]
    q = torch.randn(len(positions), HEADS, HEAD_DIM).to(dtype)
    got = attend(kernel, q, k, v, rows, positions)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(
        got.double(), reference(q, k, v, rows, positions), atol=tolerance, rtol=tolerance
    )


@pytest.mark.parametrize(("dtype", "kv_dtype", "tolerance"), DTYPES)
def test_a_row_is_the_same_bit_for_bit_in_any_call(
    kernel: CpuAttention, dtype: torch.dtype, kv_dtype: torch.dtype, tolerance: float
) -> None:
    k, v = caches(kv_dtype)
    rng = random.Random(3)
    n = 40
    rows = [rng.randrange(ROWS) for _ in range(n)]
    positions = [rng.randrange(CAPACITY) for _ in range(n)]
    q = torch.randn(n, HEADS, HEAD_DIM).to(dtype)
    together = attend(kernel, q, k, v, rows, positions)
    for i in range(n):
        alone = attend(kernel, q[i : i + 1], k, v, rows[i : i + 1], positions[i : i + 1])
        assert torch.equal(alone[0], together[i]), i
    # A prefill chunk: consecutive positions of one row, as a strided view of a wider tensor
    # (the runner's q is a slice of q and k rotated together).
    wide = torch.randn(30, HEADS + KV_HEADS, HEAD_DIM).to(dtype)
    chunk = attend(kernel, wide[:, :HEADS], k, v, [1] * 30, list(range(50, 80)))
    for i in (0, 13, 29):
        alone = attend(kernel, wide[i : i + 1, :HEADS], k, v, [1], [50 + i])
        assert torch.equal(alone[0], chunk[i])


def test_shapes_it_does_not_take_are_refused_up_front() -> None:
    assert CpuAttention.supports(torch.bfloat16, 9, 3, 64)
    assert CpuAttention.supports(torch.float32, 9, 3, 64, torch.bfloat16)
    assert not CpuAttention.supports(torch.float32, 9, 3, 64, torch.float16)
    assert not CpuAttention.supports(torch.float16, 9, 3, 64)  # no float16 arithmetic
    assert not CpuAttention.supports(torch.float32, 9, 3, 72)  # not a multiple of 16 lanes
    assert not CpuAttention.supports(torch.float32, 8, 3, 64)  # heads not a multiple
    assert not CpuAttention.supports(torch.float32, 64, 2, 64)  # 32 heads per group
    assert not CpuAttention.supports(torch.float32, 4, 1, 512)  # head_dim over 256


# -- the layer glue (the runner's fused path for bf16 products over a bf16 cache) -------------


@pytest.fixture(scope="module")
def glue() -> LayerGlue:
    built = load_layer_glue()
    assert built is not None, "the kernels did not build (is a C compiler on PATH?)"
    return built


def bf16_ulps(got: torch.Tensor, want: torch.Tensor) -> int:
    """The largest distance between two bf16 tensors in units in the last place."""
    a, b = got.view(torch.int16).int(), want.view(torch.int16).int()
    return int((a - b).abs().max())


def test_add_rms_norm_adds_in_place_and_normalizes_like_transformers(glue: LayerGlue) -> None:
    torch.manual_seed(4)
    hidden = torch.randn(5, 64) * 3
    delta = torch.randn(5, 64).to(torch.bfloat16)
    weight = torch.rand(64) + 0.5
    summed = hidden + delta.float()
    want = F.rms_norm(summed, (64,), weight, 1e-5).to(torch.bfloat16)
    out = torch.empty(5, 64, dtype=torch.bfloat16)
    glue.add_rms_norm(hidden, delta, weight, 1e-5, out)
    assert torch.equal(hidden, summed)  # the residual sum is exact: one rounding each way
    assert bf16_ulps(out, want) <= 1  # the mean's sum runs in another order
    glue.add_rms_norm(hidden, None, weight, 1e-5, out)  # no delta: the norm alone
    assert torch.equal(hidden, summed) and bf16_ulps(out, want) <= 1


def test_silu_mul_gates_like_transformers(glue: LayerGlue) -> None:
    torch.manual_seed(5)
    gate_up = (torch.randn(3, 2 * 48) * 4).to(torch.bfloat16)
    gate_up[0, :4] = torch.tensor([0.0, -0.0, -100.0, 100.0])  # zero, and the exp's far ends
    gate, up = gate_up.float().split(48, dim=-1)
    want = (F.silu(gate) * up).to(torch.bfloat16)
    out = glue.silu_mul(gate_up, torch.empty(3, 48, dtype=torch.bfloat16))
    assert bf16_ulps(out, want) <= 1


def test_rope_attention_is_the_torch_paths_rotation_cache_writes_and_attention(
    kernel: CpuAttention, glue: LayerGlue
) -> None:
    """Bit for bit: the runner's torch path rotates q and k in float32, rounds keys and values
    to the bf16 cache, attends with float32 queries and rounds the output to bf16."""
    torch.manual_seed(6)
    n, half = 7, HEAD_DIM // 2
    rows = torch.tensor([0, 2, 2, 2, 1, 0, 1])
    positions = torch.tensor([5, 30, 31, 32, 0, 6, 95])
    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    qkv = torch.randn(n, width).to(torch.bfloat16)
    angles = positions[:, None].float() * torch.rand(half)
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)
    k_fused, v_fused = caches(torch.bfloat16)
    k_torch, v_torch = k_fused.clone(), v_fused.clone()
    scores = torch.empty(scores_needed(HEADS, KV_HEADS, CAPACITY - 1))

    qk = qkv.float()[:, : (HEADS + KV_HEADS) * HEAD_DIM].unflatten(-1, (HEADS + KV_HEADS, -1))
    flipped = qk.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)[:, None]
    rotated = qk * cos[:, None] + flipped * signed_sin
    v = qkv.float()[:, (HEADS + KV_HEADS) * HEAD_DIM :].unflatten(-1, (KV_HEADS, -1))
    k_torch[rows, :, positions] = rotated[:, HEADS:].to(torch.bfloat16)
    v_torch[rows, :, positions] = v.to(torch.bfloat16)
    want = kernel(rotated[:, :HEADS], k_torch, v_torch, rows, positions, 0.125, scores)

    out = torch.empty(n, HEADS * HEAD_DIM, dtype=torch.bfloat16)
    queries = torch.empty(n, HEADS * HEAD_DIM)
    glue.rope_attention(
        qkv, cos, sin, k_fused, v_fused, rows, positions, 0.125, HEADS, queries, scores, out
    )
    assert torch.equal(k_fused, k_torch) and torch.equal(v_fused, v_torch)
    assert torch.equal(out, want.to(torch.bfloat16).flatten(1))


def test_near_ties_are_recomputed_as_float32_dot_products_and_nothing_else(
    glue: LayerGlue,
) -> None:
    """Random rows: every logit within two bf16 steps of its row's largest (a step: 2^-7 of the
    largest's power of two) becomes the float32 dot product; every other keeps its value."""
    torch.manual_seed(7)
    base = torch.randn(64)
    x = (base + 0.1 * torch.randn(5, 64)).to(torch.bfloat16)
    weight = torch.randn(1000, 64) * 0.4
    weight[:20] = base + 0.01 * torch.randn(20, 64)  # logits of ~64, a few steps apart
    weight = weight.to(torch.bfloat16)
    exact = x.double() @ weight.double().T
    rounded = exact.float().to(torch.bfloat16).float()
    top = rounded.max(dim=-1, keepdim=True).values
    step = torch.exp2(torch.floor(torch.log2(top.abs())) - 7)
    near = rounded >= top - 2 * step
    assert int(near.sum()) > len(x)  # more than the largest alone in some row
    refined = glue.refine_near_ties(rounded.clone(), x, weight)
    torch.testing.assert_close(refined[near].double(), exact[near], atol=1e-5, rtol=1e-6)
    assert torch.equal(refined[~near], rounded[~near])


def test_near_ties_the_bf16_output_rounding_made_are_decided_in_float32(glue: LayerGlue) -> None:
    """Two logits of 25.28125 and 25.3125 both round to 25.25 in bf16, where the first one would
    win argmax; recomputed, the larger one does. Entries far from the top keep their values."""
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    x[:, :2] = 1.0
    weight = torch.zeros(12, 64, dtype=torch.bfloat16)
    weight[:, 0] = -3.0
    weight[5, :2] = torch.tensor([25.25, 0.03125])
    weight[9, :2] = torch.tensor([25.25, 0.0625])
    rounded = (x.float() @ weight.float().T).to(torch.bfloat16).float()
    assert rounded[0, 5] == rounded[0, 9] == 25.25 and int(rounded[0].argmax()) == 5
    refined = glue.refine_near_ties(rounded.clone(), x, weight)
    assert refined[0, 9] == 25.3125 and refined[0, 5] == 25.28125
    assert int(refined[0].argmax()) == int(refined[1].argmax()) == 9
    far = rounded < 20
    assert torch.equal(refined[far], rounded[far])
