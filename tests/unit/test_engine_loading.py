"""Resolving model paths, devices and dtypes, and the default model specs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, LlamaConfig

from services.worker.default_models import (
    DEFAULT_CHAT_MODEL_NAME,
    DEFAULT_EMBEDDING_MODEL_NAME,
    default_model_specs,
)
from services.worker.engine.factory import create_engine
from services.worker.engine.loading import (
    MAX_CONTEXT_LENGTH,
    EngineOptions,
    ModelKind,
    ModelSource,
    ModelSpec,
    context_length_of,
    derive_name,
    model_kind,
    resolve_device,
    resolve_dtype,
    resolve_quantization,
    resolve_source,
)


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        create_engine(ModelSpec(str(tmp_path / "nope")), EngineOptions())


def test_sources(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"neither a config\.json nor a \.gguf"):
        resolve_source(str(tmp_path / "empty"))
    one = tmp_path / "one"
    one.mkdir()
    (one / "m.Q4_K_M.gguf").write_bytes(b"")
    assert resolve_source(str(one)) == ModelSource(one.resolve(), "m.Q4_K_M.gguf")
    assert resolve_source(str(one / "m.Q4_K_M.gguf")) == ModelSource(one.resolve(), "m.Q4_K_M.gguf")
    assert derive_name(resolve_source(str(one))) == "m"
    (one / "n.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"holds 2 \.gguf files"):
        resolve_source(str(one))
    (one / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"not a \.gguf file"):
        resolve_source(str(one / "weights.bin"))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolve_source(str(hf)) == ModelSource(hf.resolve())


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        EngineOptions(dtype="float8")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        EngineOptions(device="tpu")
    with pytest.raises(ValueError, match="max_running"):
        EngineOptions(max_running=0)
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("half", torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:1")
    assert resolve_device("auto").type in {"cpu", "mps"}


def test_dtypes() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("mps")) == torch.float16
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


# torch.cpu.get_capabilities() of two CPUs: an AVX2-only AMD EPYC and a CPU with AVX-512 VNNI.
AVX2_ONLY = {"architecture": "x86_64", "avx2": True, "avx512_vnni": False, "avx_vnni": False}
WITH_VNNI = {"architecture": "x86_64", "avx2": True, "avx512_vnni": True}


@pytest.mark.parametrize(
    ("requested", "device", "kind", "features", "expected"),
    [
        # auto: int8 only for generative models on a CPU that multiplies int8 in hardware
        ("auto", "cpu", ModelKind.CAUSAL_LM, WITH_VNNI, "int8"),
        ("auto", "cpu", ModelKind.CAUSAL_LM, {"avx_vnni": True}, "int8"),
        ("auto", "cpu", ModelKind.CAUSAL_LM, {"amx_int8": True}, "int8"),
        ("auto", "cpu", ModelKind.CAUSAL_LM, AVX2_ONLY, "none"),
        ("auto", "cpu", ModelKind.ENCODER, WITH_VNNI, "none"),
        ("auto", "cuda", ModelKind.CAUSAL_LM, WITH_VNNI, "none"),
        # an explicit choice is kept
        ("int8", "cpu", ModelKind.CAUSAL_LM, AVX2_ONLY, "int8"),
        ("none", "cpu", ModelKind.CAUSAL_LM, WITH_VNNI, "none"),
    ],
)
def test_quantization_follows_the_cpu(
    requested: str, device: str, kind: ModelKind, features: dict[str, object], expected: str
) -> None:
    assert resolve_quantization(requested, torch.device(device), kind, features) == expected


def test_explicit_int8_warns_where_it_is_slow(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="services.worker.engine.loading"):
        resolve_quantization("int8", torch.device("cpu"), ModelKind.CAUSAL_LM, AVX2_ONLY)
    assert "without int8 dot-product instructions" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="services.worker.engine.loading"):
        resolve_quantization("int8", torch.device("cpu"), ModelKind.CAUSAL_LM, WITH_VNNI)
    assert caplog.text == ""


def test_kind_and_context_length(tmp_path: Path) -> None:
    source = ModelSource(tmp_path)
    llama = LlamaConfig(max_position_embeddings=131_072, architectures=["LlamaForCausalLM"])
    assert model_kind(llama) is ModelKind.CAUSAL_LM
    assert context_length_of(llama, ModelKind.CAUSAL_LM, source) == MAX_CONTEXT_LENGTH
    assert model_kind(LlamaConfig()) is ModelKind.CAUSAL_LM  # no architectures recorded
    bert = BertConfig(max_position_embeddings=512, architectures=["BertModel"])
    assert model_kind(bert) is ModelKind.ENCODER
    assert model_kind(BertConfig()) is ModelKind.ENCODER
    (tmp_path / "sentence_bert_config.json").write_text('{"max_seq_length": 256}')
    assert context_length_of(bert, ModelKind.ENCODER, source) == 256


def test_default_model_specs() -> None:
    try:
        specs = default_model_specs()
    except FileNotFoundError as exc:
        assert "make install" in str(exc)
        pytest.skip("default models not installed")
    assert [s.names[0] for s in specs] == [DEFAULT_CHAT_MODEL_NAME, DEFAULT_EMBEDDING_MODEL_NAME]
    assert specs[0].path.endswith(".gguf") and Path(specs[0].path).is_file()
    assert (Path(specs[1].path) / "config.json").is_file()
