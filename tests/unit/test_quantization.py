"""The bf16 linear layers (pre-packed oneDNN weights) and the choice of quantization mode."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from services.worker.engine import quantization
from services.worker.engine.attention import load_int4_product
from services.worker.engine.factory import create_engine
from services.worker.engine.interface import Engine
from services.worker.engine.loading import (
    QUANTIZATION_EXACTNESS,
    QUANTIZATIONS,
    EngineOptions,
    ModelKind,
    ModelSpec,
    resolve_quantization,
)
from services.worker.engine.quantization import (
    INT4_GROUP,
    BF16Linear,
    Int4Linear,
    Int8WeightLinear,
    RowSplit,
    SplitLinear,
    int4_prompts_are_fast,
    quantize,
    quantize_bf16,
)
from services.worker.engine.runner import ForwardItem, PackedRunner, fuse_linears
from tests.unit.models import save_tiny_llama
from tests.unit.test_engine import collect, hf_greedy, random_prompt, request

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    reason="no bfloat16 oneDNN products on this CPU",
)

# torch.cpu.get_capabilities() subsets: the AMX Xeon of bench/README.md, a VNNI-only CPU.
WITH_AMX = {"avx512_vnni": True, "amx_int8": True, "amx_bf16": True, "avx512_bf16": True}
WITH_VNNI = {"avx512_vnni": True}
AVX2_ONLY = {"avx2": True}


def linear(in_features: int, out_features: int, bias: bool = False, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(layer.weight, std=0.05)
    return layer


@pytest.mark.parametrize("bias", [False, True])
def test_bf16_linear_matches_float32_within_bfloat16_rounding(bias: bool) -> None:
    dense = linear(576, 960, bias)
    x = torch.randn(5, 576)
    with torch.inference_mode():
        expected = dense(x)
        got = BF16Linear.from_linear(dense)(x)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    # bfloat16 keeps 8 significant bits: about 0.4% per weight, activation and output.
    assert float((got - expected).abs().max()) <= 0.02 * float(expected.abs().max())


PACKED = [BF16Linear, Int4Linear]


@pytest.mark.parametrize("kind", [*PACKED, Int8WeightLinear])
@pytest.mark.parametrize("shape", [(576, 960), (1536, 576), (64, 1024)])
def test_packed_rows_do_not_depend_on_the_batch(
    kind: type[BF16Linear | Int4Linear | Int8WeightLinear], shape: tuple[int, int]
) -> None:
    """Up to a prefill step of 300 rows: oneDNN computes the rows of a 1536-input bf16 product
    otherwise from 130 rows on, which BF16_MAX_ROWS keeps out of reach."""
    layer = kind.from_linear(linear(*shape))
    x = torch.randn(300, shape[0])
    with torch.inference_mode():
        alone = torch.cat([layer(x[i : i + 1]) for i in range(len(x))])
        for rows in (2, 3, 4, 5, 8, 16, 17, 32, 33, 64, 65, 129, 130, 160, 208, 300):
            assert torch.equal(layer(x[:rows]), alone[:rows]), rows
        # A 3-d input [batch, tokens, features] as transformers passes it.
        assert torch.equal(layer(x[:32].reshape(4, 8, -1)).reshape(32, -1), alone[:32])


@pytest.mark.parametrize("kind", PACKED)
def test_fused_packed_layers_answer_with_their_columns(
    kind: type[BF16Linear | Int4Linear],
) -> None:
    parts = [linear(64, n, bias=True, seed=n) for n in (64, 32, 32)]
    layers = [kind.from_linear(p) for p in parts]
    x = torch.randn(7, 64)
    with torch.inference_mode():
        before = [layer(x) for layer in layers]
        fused = fuse_linears(layers)
        assert isinstance(fused, kind) and fused.out_features == 128
        assert torch.equal(fused(x), torch.cat(before, dim=1))
        for layer, expected in zip(layers, before, strict=True):
            assert layer.weight_packed is None  # no second copy of the weights
            assert torch.equal(layer(x), expected)
        # A second runner on the same model fuses the same layers again.
        assert torch.equal(fuse_linears(layers)(x), fused(x))


def grid_linear(
    in_features: int, out_features: int, seed: int = 0
) -> tuple[nn.Linear, torch.Tensor]:
    """Weights on a GGUF Q4_1-like grid: 16 levels per group of 32 inputs, w = d * q + m with
    d and m exact in bfloat16 (as a file's fp16 scales mostly are after rounding)."""
    generator = torch.Generator().manual_seed(seed)
    groups = in_features // INT4_GROUP
    d = (torch.rand(out_features, groups, 1, generator=generator) * 0.01 + 0.001).bfloat16()
    m = (torch.randn(out_features, groups, 1, generator=generator) * 0.05).bfloat16()
    q = torch.randint(0, 16, (out_features, groups, INT4_GROUP), generator=generator)
    q[..., 0], q[..., 1] = 0, 15  # every group spans its whole grid, as a quantizer makes it
    layer = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        layer.weight.copy_((q * d.float() + m.float()).reshape(out_features, in_features))
    return layer, q.reshape(out_features, in_features)


def test_int4_layers_keep_a_4_bit_grid_as_it_is() -> None:
    dense, grid = grid_linear(576, 192)
    layer = Int4Linear.from_linear(dense)
    # The file's codes come back as they are; d * q + m == (q - 8) * d + (m + 8 d) to within a
    # bfloat16 rounding of the offset m + 8 d.
    codes = torch.stack((layer.codes & 15, layer.codes >> 4), dim=-1).flatten(-2)
    assert torch.equal(codes.long(), grid)
    error = (layer.dequantized() - dense.weight.detach()).abs()
    assert float(error.max()) <= 2**-8 * float(dense.weight.abs().max())
    assert layer.codes.shape == (192, 576 // 2) and layer.codes.dtype == torch.uint8
    x = torch.randn(5, 576)
    with torch.inference_mode():
        expected = x @ layer.dequantized().t()
        got = layer(x)
    assert got.dtype == torch.float32
    assert float((got - expected).abs().max()) <= 0.02 * float(expected.abs().max())


@pytest.mark.parametrize("bias", [False, True])
def test_int8_weights_keep_every_row_on_its_own_scale(bias: bool) -> None:
    dense = linear(576, 4096, bias)
    with torch.no_grad():
        dense.weight[7] *= 1000  # one row far larger than the rest
    layer = Int8WeightLinear.from_linear(dense)
    weight = dense.weight.detach()
    assert layer.weight_int8.dtype == torch.int8 and layer.scale.dtype == torch.bfloat16
    # The bfloat16 scale is rounded up: no row clips, and each row's largest weight takes the
    # full range or one step short of it.
    dequantized = layer.weight_int8.float() * layer.scale.float()[:, None]
    error = (dequantized - weight).abs().amax(dim=1)
    assert bool((error <= 0.5 * layer.scale.float() * (1 + 2**-7)).all())
    assert int(layer.weight_int8.abs().amax(dim=1).min()) >= 126
    x = torch.randn(5, 576)
    with torch.inference_mode():
        expected = dense(x)
        got = layer(x)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert float((got - expected).abs().max()) <= 0.02 * float(expected.abs().max())


def test_split_layers_take_the_kernel_of_each_row() -> None:
    parts = [linear(64, n, seed=n) for n in (64, 32)]
    layers = [SplitLinear.from_linear(p) for p in parts]
    fused = fuse_linears(layers)
    assert isinstance(fused, SplitLinear) and fused.out_features == 96
    x = torch.randn(6, 64)
    generated = torch.tensor([1, 4])
    prompt = torch.tensor([0, 2, 3, 5])
    with torch.inference_mode():
        as_int4 = fused.generated(x)
        as_bf16 = fused.prompt(x)
        assert not torch.equal(as_int4, as_bf16)  # two kernels, two roundings
        mixed = fused(x, RowSplit(generated, prompt))
        assert torch.equal(mixed[generated], as_int4[generated])
        assert torch.equal(mixed[prompt], as_bf16[prompt])
        empty = torch.tensor([], dtype=torch.long)
        assert torch.equal(fused(x, RowSplit(torch.arange(6), empty)), as_int4)
        assert torch.equal(fused(x, RowSplit(empty, torch.arange(6))), as_bf16)
        assert torch.equal(fused(x), as_bf16)  # transformers' own forward: prompt rows
        assert torch.equal(layers[1](x, RowSplit(generated, prompt)), mixed[:, 64:])


@pytest.mark.parametrize("int4_prompts", [True, False])
def test_int4_keeps_the_output_layer_at_8_or_16_bits_and_odd_shapes_in_bf16(
    llama_dir: Path, int4_prompts: bool
) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    model.model.layers[0].mlp.down_proj = linear(128, 40)  # 40 outputs: not a multiple of 16
    quantize(model, "int4", int4_prompts=int4_prompts)
    if int4_prompts:
        assert isinstance(model.lm_head, BF16Linear)
    else:
        assert isinstance(model.lm_head, SplitLinear)
        assert isinstance(model.lm_head.generated, Int8WeightLinear)
        assert isinstance(model.lm_head.prompt, BF16Linear)
    assert isinstance(model.model.layers[0].mlp.down_proj, BF16Linear)
    layer = Int4Linear if int4_prompts else SplitLinear
    assert isinstance(model.model.layers[0].self_attn.q_proj, layer)
    assert isinstance(model.model.layers[1].mlp.down_proj, layer)


def test_w4a8_takes_4_bits_with_8_bit_inputs_for_every_token(llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    quantize(model, "w4a8", int4_prompts=False)  # w4a8 has no bf16 prompt layers
    assert isinstance(model.lm_head, BF16Linear)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Int4Linear) and q_proj.eight_bit_inputs
    assert "8-bit inputs" in repr(q_proj)


def test_int4_prompts_take_bf16_where_amx_multiplies_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not int4_prompts_are_fast({"amx_bf16": True, "avx512_bf16": True})
    kernel = load_int4_product()
    assert int4_prompts_are_fast({"avx512_bf16": True}) == (
        kernel is not None and kernel.vectorized
    )
    monkeypatch.setattr(quantization, "load_int4_product", lambda: None)  # no C compiler
    assert not int4_prompts_are_fast({})


def test_quantize_replaces_every_linear() -> None:
    model = nn.Sequential(linear(8, 16), nn.ReLU(), nn.Sequential(linear(16, 8)))
    quantize(model, "bf16")
    assert [type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__] == [
        "BF16Linear",
        "BF16Linear",
    ]
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize(model, "int3")


@pytest.mark.parametrize(
    ("requested", "device", "kind", "features", "expected"),
    [
        # auto: bf16 on AMX or AVX512-BF16, int8 on int8 dot products alone, else full precision
        ("auto", "cpu", ModelKind.CAUSAL_LM, WITH_AMX, "bf16"),
        ("auto", "cpu", ModelKind.CAUSAL_LM, {"amx_bf16": True}, "bf16"),
        ("auto", "cpu", ModelKind.CAUSAL_LM, WITH_VNNI, "int8"),
        ("auto", "cpu", ModelKind.CAUSAL_LM, {"amx_int8": True}, "int8"),
        ("auto", "cpu", ModelKind.CAUSAL_LM, {"avx512_bf16": True}, "bf16"),
        ("auto", "cpu", ModelKind.CAUSAL_LM, {**WITH_VNNI, "avx512_bf16": True}, "bf16"),
        ("auto", "cpu", ModelKind.CAUSAL_LM, AVX2_ONLY, "none"),
        ("auto", "cpu", ModelKind.ENCODER, WITH_AMX, "none"),
        ("auto", "cuda", ModelKind.CAUSAL_LM, WITH_AMX, "none"),
        # an explicit choice is kept
        ("bf16", "cpu", ModelKind.CAUSAL_LM, AVX2_ONLY, "bf16"),
        ("int8", "cpu", ModelKind.CAUSAL_LM, WITH_AMX, "int8"),
        ("int4", "cpu", ModelKind.CAUSAL_LM, WITH_AMX, "int4"),
        ("w4a8", "cpu", ModelKind.CAUSAL_LM, WITH_VNNI, "w4a8"),
        ("none", "cpu", ModelKind.CAUSAL_LM, WITH_AMX, "none"),
    ],
)
def test_quantization_follows_the_cpu(
    requested: str, device: str, kind: ModelKind, features: dict[str, object], expected: str
) -> None:
    assert resolve_quantization(requested, torch.device(device), kind, features) == expected


@pytest.mark.parametrize(
    ("mode", "warning"), [("bf16", "without amx_bf16"), ("w4a8", "without avx512_vnni")]
)
def test_explicit_modes_warn_where_they_are_slow(
    caplog: pytest.LogCaptureFixture, mode: str, warning: str
) -> None:
    with caplog.at_level("WARNING", logger="services.worker.engine.loading"):
        resolve_quantization(mode, torch.device("cpu"), ModelKind.CAUSAL_LM, AVX2_ONLY)
    assert warning in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="services.worker.engine.loading"):
        resolve_quantization(mode, torch.device("cpu"), ModelKind.CAUSAL_LM, WITH_AMX)
    assert caplog.text == ""


def test_every_mode_states_whether_it_is_exact() -> None:
    modes = set(QUANTIZATIONS) - {"auto"}
    assert set(QUANTIZATION_EXACTNESS) == modes
    assert [m for m in modes if QUANTIZATION_EXACTNESS[m].startswith("exact")] == ["none"]
    assert all(QUANTIZATION_EXACTNESS[m].startswith("approximate") for m in modes - {"none"})


def test_in_process_engines_default_to_exact_and_the_worker_to_auto() -> None:
    from services.worker.config import WorkerConfig

    assert EngineOptions().quantization == "none"
    assert WorkerConfig(models=(ModelSpec("model"),)).engine_options().quantization == "auto"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


async def started(path: Path, quantization: str = "bf16", **options: object) -> Engine:
    engine = create_engine(
        ModelSpec(str(path), ("tiny",)),
        EngineOptions(threads=1, quantization=quantization, **options),  # type: ignore[arg-type]
    )
    await engine.start()
    return engine


@pytest.mark.parametrize("mode", ["bf16", "int4", "w4a8"])
async def test_engine_greedy_is_batch_invariant(
    llama_dir: Path, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    """Each request of a concurrent mixed batch gets the tokens it gets alone; the modes with
    bf16 products keep keys and values in bf16."""
    rng = random.Random(2)
    specs = [(3, 40), (17, 16), (60, 24), (9, 30)]
    prompts = [random_prompt(rng, n) for n, _ in specs]
    caplog.set_level("INFO", logger="services.worker.engine")
    engine = await started(llama_dir, mode, max_running=4, max_batch_tokens=16)
    try:
        assert f"quantization {mode} (requested {mode}): approximate" in caplog.text
        assert "keys and values in bfloat16" in caplog.text
        together = await asyncio.gather(
            *(
                collect(engine, request(p, max_tokens=n))
                for p, (_, n) in zip(prompts, specs, strict=True)
            )
        )
        alone = [
            await collect(engine, request(p, max_tokens=n))
            for p, (_, n) in zip(prompts, specs, strict=True)
        ]
    finally:
        await engine.stop()
    for (_, max_tokens), mixed, single in zip(specs, together, alone, strict=True):
        assert len(mixed.token_ids) == max_tokens
        assert mixed.token_ids == single.token_ids


def test_bf16_layers_with_a_float32_cache_decode_as_generate(llama_dir: Path) -> None:
    """The packed runner over bf16 layers, keys and values kept in float32, decodes greedily the
    tokens transformers' generate gives over the same layers: only the products are bf16."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    quantize_bf16(model)
    runner = PackedRunner(model, max_rows=2, max_cache_tokens=1024)
    assert runner.kv_dtype == torch.float32
    prompt = random_prompt(random.Random(4), 19)
    tokens = list(prompt)
    with torch.inference_mode():
        logits = runner.forward([ForwardItem("s", prompt, 0, True)])
        for _ in range(24):
            tokens.append(int(logits[-1].argmax()))
            logits = runner.forward([ForwardItem("s", tokens[-1:], len(tokens) - 1, True)])
    assert tokens[len(prompt) :] == hf_greedy(model, prompt, 24)
