"""The bf16 linear layers (pre-packed oneDNN weights) and the choice of quantization mode."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

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
from services.worker.engine.quantization import BF16Linear, quantize, quantize_bf16
from services.worker.engine.runner import fuse_linears
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


@pytest.mark.parametrize("shape", [(576, 960), (1536, 576), (64, 1000)])
def test_bf16_rows_do_not_depend_on_the_batch(shape: tuple[int, int]) -> None:
    layer = BF16Linear.from_linear(linear(*shape))
    x = torch.randn(33, shape[0])
    with torch.inference_mode():
        alone = torch.cat([layer(x[i : i + 1]) for i in range(len(x))])
        for rows in (2, 3, 8, 16, 17, 32, 33):
            assert torch.equal(layer(x[:rows]), alone[:rows]), rows
        # A 3-d input [batch, tokens, features] as transformers passes it.
        assert torch.equal(layer(x[:32].reshape(4, 8, -1)).reshape(32, -1), alone[:32])


def test_fused_bf16_layers_answer_with_their_columns() -> None:
    parts = [linear(64, n, bias=True, seed=n) for n in (64, 16, 16)]
    layers = [BF16Linear.from_linear(p) for p in parts]
    x = torch.randn(7, 64)
    with torch.inference_mode():
        before = [layer(x) for layer in layers]
        fused = fuse_linears(layers)
        assert isinstance(fused, BF16Linear) and fused.out_features == 96
        assert torch.equal(fused(x), torch.cat(before, dim=1))
        for layer, expected in zip(layers, before, strict=True):
            assert layer.weight_packed is None  # no second copy of the weights
            assert torch.equal(layer(x), expected)


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
        # auto: bf16 on AMX-BF16, int8 on int8 dot products, else full precision
        ("auto", "cpu", ModelKind.CAUSAL_LM, WITH_AMX, "bf16"),
        ("auto", "cpu", ModelKind.CAUSAL_LM, {"amx_bf16": True}, "bf16"),
        ("auto", "cpu", ModelKind.CAUSAL_LM, WITH_VNNI, "int8"),
        ("auto", "cpu", ModelKind.CAUSAL_LM, {"amx_int8": True}, "int8"),
        ("auto", "cpu", ModelKind.CAUSAL_LM, {"avx512_bf16": True}, "none"),  # not measured
        ("auto", "cpu", ModelKind.CAUSAL_LM, AVX2_ONLY, "none"),
        ("auto", "cpu", ModelKind.ENCODER, WITH_AMX, "none"),
        ("auto", "cuda", ModelKind.CAUSAL_LM, WITH_AMX, "none"),
        # an explicit choice is kept
        ("bf16", "cpu", ModelKind.CAUSAL_LM, AVX2_ONLY, "bf16"),
        ("int8", "cpu", ModelKind.CAUSAL_LM, WITH_AMX, "int8"),
        ("none", "cpu", ModelKind.CAUSAL_LM, WITH_AMX, "none"),
    ],
)
def test_quantization_follows_the_cpu(
    requested: str, device: str, kind: ModelKind, features: dict[str, object], expected: str
) -> None:
    assert resolve_quantization(requested, torch.device(device), kind, features) == expected


def test_explicit_bf16_warns_where_it_is_slow(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="services.worker.engine.loading"):
        resolve_quantization("bf16", torch.device("cpu"), ModelKind.CAUSAL_LM, AVX2_ONLY)
    assert "without amx_bf16" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="services.worker.engine.loading"):
        resolve_quantization("bf16", torch.device("cpu"), ModelKind.CAUSAL_LM, WITH_AMX)
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


async def started(path: Path, **options: object) -> Engine:
    engine = create_engine(
        ModelSpec(str(path), ("tiny",)),
        EngineOptions(threads=1, quantization="bf16", **options),  # type: ignore[arg-type]
    )
    await engine.start()
    return engine


async def test_bf16_engine_greedy_is_batch_invariant(
    llama_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each request of a concurrent mixed batch gets the tokens it gets alone, and those of
    transformers' generate on the same bf16 layers."""
    rng = random.Random(2)
    specs = [(3, 40), (17, 16), (60, 24), (9, 30)]
    prompts = [random_prompt(rng, n) for n, _ in specs]
    caplog.set_level("INFO", logger="services.worker.engine.loading")
    engine = await started(llama_dir, max_running=4, max_batch_tokens=16)
    try:
        assert "quantization bf16 (requested bf16): approximate" in caplog.text
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
    reference = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    quantize_bf16(reference)
    for prompt, (_, max_tokens), mixed, single in zip(prompts, specs, together, alone, strict=True):
        assert mixed.token_ids == single.token_ids
        assert mixed.token_ids == hf_greedy(reference, prompt, max_tokens)
