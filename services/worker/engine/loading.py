"""What a model is and how to run it (ModelSpec, EngineOptions), and how it is loaded: path,
device, dtype and quantization resolution up front (`plan_load`), then the transformers loading
code that runs on the engine thread (`LoadPlan.load`).

torch and transformers are imported where used, so configs and the CLI can import ModelSpec and
EngineOptions without paying seconds of import time.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.worker.engine.interface import SamplingParams

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "mps")  # plus cuda:N
DTYPES = ("auto", "float32", "float16", "bfloat16")  # names of torch dtypes, plus auto
QUANTIZATIONS = ("auto", "none", "int8", "bf16", "int4", "w4a8")
# What each resolved mode means for the output, for logs and --help: only none is exact.
QUANTIZATION_EXACTNESS = {
    "none": "exact: greedy output equals float32 generate",
    "int8": "approximate: differs from float32 generate",
    "bf16": "approximate: differs from float32 generate",
    "int4": "approximate: differs from float32 generate",
    "w4a8": "approximate: differs from float32 generate, sooner than int4",
}
# Quantization modes whose KV cache is bf16 for a float32 model (`LoadedModel.kv_dtype`).
BF16_KV_MODES = frozenset({"bf16", "int4", "w4a8"})
# A config may claim 128k positions; a KV cache that long per request does not fit a worker's memory
# budget, so the served context is capped. Models without any position limit get the fallback.
MAX_CONTEXT_LENGTH = 32_768
FALLBACK_CONTEXT_LENGTH = 2_048
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
# "SmolLM2-135M-Instruct.Q4_1" -> "SmolLM2-135M-Instruct": the quantisation is not part of the name.
_QUANT_SUFFIX = re.compile(r"[.\-_](i?q\d\w*|f16|f32|bf16)$", re.IGNORECASE)


@dataclass(frozen=True)
class ModelSpec:
    """A model to serve."""

    path: str  # a HF folder, a .gguf file, or a folder holding exactly one .gguf
    # Served names: names[0] canonical, the rest aliases; empty -> derived from the path.
    names: tuple[str, ...] = ()
    # Sampling for fields a request leaves unset; None: the model's generation_config, if it
    # samples, else plain defaults.
    default_sampling: SamplingParams | None = None


@dataclass(frozen=True)
class EngineOptions:
    """How to run a model; validated on construction."""

    device: str = "auto"  # auto|cpu|cuda|cuda:N|mps
    dtype: str = "auto"  # auto|float32|float16|bfloat16
    max_running: int = 32  # requests decoded together
    max_waiting: int = 256  # bounded admission queue; beyond it -> OverloadedError
    # torch intra-op threads; None: all usable cores but one, which is left to the gRPC server,
    # the gateway and the controller (on 2 cores, OpenMP threads preempted by the serving threads
    # stall at every barrier: measured 24 tok/s single stream with 2 threads, 29.5 with 1).
    threads: int | None = None
    # Tokens one engine step may forward: every decoding sequence's next token, and prompt
    # chunks of joining sequences filling the rest (chunked prefill).
    max_batch_tokens: int = 512
    # KV cache budget, in token positions over all running sequences (rows x capacity).
    kv_cache_tokens: int = 65_536
    # The packed batched runner for Llama-family models; False forces the per-sequence path.
    packed: bool = True
    # Linear layers with smaller weights (engine/quantization.py; CPU only), each row independent
    # of the batch, and approximate (greedy output drifts from float32 generate after
    # some tokens: bench/README.md):
    # int8: int8 weights and per-token int8 activations, a quarter of the float32 bytes;
    # bf16: bfloat16 weights pre-packed for oneDNN (AMX), half the bytes, faster than int8 on AMX.
    # int4: 4-bit weights (a Q4 GGUF's own grid) for generated tokens, and for prompts too where
    # that is faster than bf16 layers (no AMX): fastest for few streams (bench/README.md).
    # w4a8: int4 with inputs rounded to 8 bits (int8 dot products, as llama.cpp): faster than int4
    # under load and for prompts, further from float32.
    # auto: for generative models on a CPU, bf16 where it has AMX-BF16, else int8 where it has
    # int8 dot products (VNNI, AMX-INT8), else none (int8 is slower without them).
    # In-process engines (tests, bench scripts) default to none, exact; the worker's flag defaults
    # to auto (services/worker/config.py). Every mode is batch-invariant: each row's linear
    # products and its decode attention are computed as if it ran alone. The worker logs the mode
    # it resolved to and whether it is exact.
    quantization: str = "none"
    # Reuse the keys and values of prompt prefixes earlier requests computed (the packed runner
    # of engine/runner.py only), inside the kv_cache_tokens budget. Exact: greedy output is the
    # same.
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.device not in DEVICES and not re.fullmatch(r"cuda:\d+", self.device):
            raise ValueError(
                f"unknown device {self.device!r}: expected one of {', '.join(DEVICES)} or cuda:N"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.max_running < 1:
            raise ValueError(f"max_running must be at least 1, got {self.max_running}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be 0 or more, got {self.max_waiting}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.max_batch_tokens < self.max_running:
            raise ValueError(
                f"max_batch_tokens ({self.max_batch_tokens}) must be at least max_running "
                f"({self.max_running}): every running sequence decodes one token per step"
            )
        if self.kv_cache_tokens < 256:
            raise ValueError(f"kv_cache_tokens must be at least 256, got {self.kv_cache_tokens}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"unknown quantization {self.quantization!r}: expected one of "
                f"{', '.join(QUANTIZATIONS)}"
            )


class ModelKind(enum.Enum):
    CAUSAL_LM = "causal-lm"  # generates, chats and embeds (mean of the last hidden state)
    ENCODER = "encoder"  # embeds only (BERT-like)


@dataclass(frozen=True)
class ModelSource:
    """Where from_pretrained reads: a folder, plus the file name when the weights are GGUF."""

    directory: Path
    gguf_file: str | None = None

    @property
    def display(self) -> str:
        return str(self.directory / self.gguf_file) if self.gguf_file else str(self.directory)

    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


@dataclass
class LoadedModel:
    """What the engine thread works with once loading is done."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    context_length: int
    vocab_size: int  # rows of the model's embedding matrix: valid token ids are below it
    eos_token_ids: frozenset[int]
    device: torch.device
    default_sampling: SamplingParams
    # The KV cache's dtype where it differs from the model's (None: the model's).
    kv_dtype: torch.dtype | None = None


@dataclass(frozen=True)
class LoadPlan:
    """Everything create_engine resolved up front; `load()` does the heavy part."""

    source: ModelSource
    kind: ModelKind
    names: tuple[str, ...]
    device: torch.device
    dtype: torch.dtype
    # Known before loading for HF folders; GGUF metadata is only read by load().
    context_length: int | None = None
    default_sampling: SamplingParams | None = None

    def load(self, threads: int | None = None, quantization: str = "none") -> LoadedModel:
        """Load tokenizer and weights (seconds to minutes): call it off the event loop."""
        import torch
        from transformers import AutoModel, AutoModelForCausalLM

        torch.set_num_threads(threads or default_threads())
        started = time.monotonic()
        # Progress for `chatfleet up`, which shows these lines (and transformers' progress bars)
        # as a status line per model: a GGUF tokenizer alone takes seconds to convert.
        logger.info("loading %s from %s", self.names[0], self.source.display)
        tokenizer = _load_tokenizer(self.source)
        logger.info("loading %s: tokenizer ready, reading the weights", self.names[0])
        auto_class = AutoModelForCausalLM if self.kind is ModelKind.CAUSAL_LM else AutoModel
        model = _from_pretrained(auto_class, self.source, self.device, self.dtype)
        model.eval()
        requested = quantization
        quantization = resolve_quantization(quantization, self.device, self.kind)
        logger.info(
            "quantization %s (requested %s): %s",
            quantization,
            requested,
            QUANTIZATION_EXACTNESS[quantization],
        )
        if quantization != "none":
            model = _quantize(model, self.device, quantization)
        config = model.config
        context_length = self.context_length or context_length_of(
            config, self.kind, self.source, tokenizer
        )
        eos_ids = _eos_token_ids(model, tokenizer) if self.kind is ModelKind.CAUSAL_LM else set()
        logger.info(
            "loaded %s (%s, %s, %s, quantization %s) in %.1fs, context %d",
            self.names[0],
            self.kind.value,
            self.device,
            str(self.dtype).removeprefix("torch."),
            quantization,
            time.monotonic() - started,
            context_length,
        )
        return LoadedModel(
            model=model,
            tokenizer=tokenizer,
            context_length=context_length,
            vocab_size=_vocab_size(model),
            eos_token_ids=frozenset(eos_ids),
            device=self.device,
            default_sampling=self.default_sampling or _generation_config_sampling(model),
            # The modes with bf16 products keep keys and values in bf16 as well: half the cache's
            # memory and attention reads, and AVX512-BF16's dot products in the attention kernel.
            # (int8 is for CPUs without bf16 instructions; it keeps them in float32.)
            kv_dtype=torch.bfloat16
            if quantization in BF16_KV_MODES and self.dtype == torch.float32
            else None,
        )


def usable_cores() -> int:
    """The cores this process may run on (all of them where affinity is unknown: macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_threads() -> int:
    """All usable cores but one, at least one: for an engine inside the gRPC process."""
    return max(1, usable_cores() - 1)


def plan_load(spec: ModelSpec, options: EngineOptions) -> LoadPlan:
    """Check the path, the device and the dtype, and decide which kind of engine the model needs."""
    source = resolve_source(spec.path)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    names = spec.names or (derive_name(source),)
    if source.gguf_file:
        # transformers reads GGUF only as decoder-only LMs; the context comes with the weights.
        return LoadPlan(
            source, ModelKind.CAUSAL_LM, names, device, dtype,
            default_sampling=spec.default_sampling,
        )  # fmt: skip
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.directory)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{source.display} is not a loadable model folder: {exc}") from exc
    kind = model_kind(config)
    context = context_length_of(config, kind, source)
    return LoadPlan(source, kind, names, device, dtype, context, spec.default_sampling)


def resolve_source(path: str) -> ModelSource:
    """A HF folder (config.json), a .gguf file, or a folder holding exactly one .gguf file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"model path {path!r} does not exist")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ValueError(f"model path {path!r} is a file but not a .gguf file")
        return ModelSource(p.parent.resolve(), p.name)
    if (p / "config.json").is_file():
        return ModelSource(p.resolve())
    ggufs = sorted(f.name for f in p.iterdir() if f.suffix.lower() == ".gguf")
    if len(ggufs) == 1:
        return ModelSource(p.resolve(), ggufs[0])
    if not ggufs:
        raise ValueError(f"model folder {path!r} has neither a config.json nor a .gguf file")
    raise ValueError(f"model folder {path!r} holds {len(ggufs)} .gguf files; pass one file's path")


def resolve_device(name: str) -> torch.device:
    """auto -> cuda if available, else mps, else cpu; an explicit accelerator must exist."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    mps_available = bool(mps is not None and mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} requested but only "
                f"{torch.cuda.device_count()} CUDA device(s) exist"
            )
        return device
    if name == "mps" and not mps_available:
        raise ValueError("device 'mps' requested but MPS is not available on this machine")
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}: expected one of {', '.join(DEVICES)} or cuda:N")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto -> float32 on CPU, bfloat16 on GPUs that support it, else float16."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: expected one of {', '.join(DTYPES)}")
    if name != "auto":
        dtype: torch.dtype = getattr(torch, name)
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def model_kind(config: PretrainedConfig) -> ModelKind:
    """Decoder-only LMs generate; encoders (BERT-like) only embed; encoder-decoders are refused."""
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"encoder-decoder models ({config.model_type}) are not supported")
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return ModelKind.CAUSAL_LM
    if architectures:
        return ModelKind.ENCODER
    # No architectures recorded: trust the model type's registrations.
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if (
        config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    ):
        return ModelKind.CAUSAL_LM
    return ModelKind.ENCODER


def context_length_of(
    config: PretrainedConfig,
    kind: ModelKind,
    source: ModelSource,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> int:
    """The model's position limit, capped at MAX_CONTEXT_LENGTH.

    Encoders also honour sentence-transformers' max_seq_length (all-MiniLM-L6-v2: 256) and the
    tokenizer's model_max_length, the lengths their embeddings were trained for.
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limits = [
        int(value)
        for key in _POSITION_KEYS
        if isinstance(value := getattr(text_config, key, None), int) and value > 0
    ][:1] or [FALLBACK_CONTEXT_LENGTH]
    if kind is ModelKind.ENCODER:
        st_config = source.directory / "sentence_bert_config.json"
        if st_config.is_file():
            try:
                limit = json.loads(st_config.read_text()).get("max_seq_length")
            except (OSError, ValueError):
                limit = None
            if isinstance(limit, int) and limit > 0:
                limits.append(limit)
        model_max = getattr(tokenizer, "model_max_length", None)
        if isinstance(model_max, int) and 0 < model_max < 1_000_000:
            limits.append(model_max)
    return min([*limits, MAX_CONTEXT_LENGTH])


def derive_name(source: ModelSource) -> str:
    if source.gguf_file:
        return _QUANT_SUFFIX.sub("", Path(source.gguf_file).stem) or source.gguf_file
    return source.directory.name


def tokenizer_cache_root() -> Path:
    """Where converted GGUF tokenizers are kept: $CHATFLEET_CACHE_DIR, else the XDG cache."""
    root = os.environ.get("CHATFLEET_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "chatfleet"
    )
    return Path(root) / "gguf-tokenizers"


def _load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    """The model's tokenizer. Converting a GGUF file's vocabulary takes seconds at every start, so
    the converted tokenizer is saved once (keyed by the file and the transformers version) and read
    back from there; a cache that can't be read or written only costs the conversion."""
    import transformers
    from transformers import AutoTokenizer

    if not source.gguf_file:
        return AutoTokenizer.from_pretrained(source.directory)
    gguf = source.directory / source.gguf_file
    stat = gguf.stat()
    key = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}"
    cached = tokenizer_cache_root() / hashlib.sha256(key.encode()).hexdigest()[:24]
    if (cached / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(cached)
        except Exception as error:  # whatever a damaged copy raises: convert again instead
            logger.warning("replacing the unreadable cached tokenizer in %s: %s", cached, error)
            shutil.rmtree(cached, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".staging-"))
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(cached)  # atomic: readers never see a half-written folder
        except OSError:  # another process saved it first, or a stale copy is there
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:
        logger.warning("could not cache the converted tokenizer in %s: %s", cached.parent, error)
    return tokenizer


def _from_pretrained(
    auto_class: Any, source: ModelSource, device: torch.device, dtype: torch.dtype
) -> PreTrainedModel:
    kwargs: dict[str, Any] = {"dtype": dtype, **source.kwargs()}
    if device.type != "cpu":
        kwargs["device_map"] = str(device)  # accelerate places weights straight on the device
    try:
        model = auto_class.from_pretrained(source.directory, attn_implementation="sdpa", **kwargs)
    except (ValueError, ImportError) as exc:
        # A few architectures have no SDPA kernel; eager attention is slower but correct.
        logger.warning("SDPA attention unavailable for %s (%s); using eager", source.display, exc)
        model = auto_class.from_pretrained(source.directory, attn_implementation="eager", **kwargs)
    if device.type == "cpu":
        model.to(device)
    return model


def resolve_quantization(
    requested: str,
    device: torch.device,
    kind: ModelKind,
    cpu_features: Mapping[str, object] | None = None,
) -> str:
    """auto -> for generative models on a CPU: bf16 with AMX or AVX512-BF16, else int8 with int8
    dot-product instructions, else none; none off the CPU and for encoders (embeddings stay
    full precision). An explicit mode is kept, with a warning where it runs slower than full
    precision."""
    from services.worker.engine.quantization import (
        BF16_MATMUL_FEATURES,
        INT8_DOT_FEATURES,
        bf16_matmul_is_fast,
        int8_matmul_is_fast,
        w4a8_is_vectorized,
    )

    on_cpu = device.type == "cpu"
    if requested == "auto":
        if not on_cpu or kind is not ModelKind.CAUSAL_LM:
            return "none"
        # Measured on an AMX CPU (bench/linear_kernels.py) and on an AVX512-BF16 EPYC
        # (bench/quantization_modes.py), bench/README.md: bf16 is as fast as int8 under load and
        # far closer to float32 (int8's per-token activations change a small model's answers).
        if bf16_matmul_is_fast(cpu_features):
            return "bf16"
        if int8_matmul_is_fast(cpu_features):
            return "int8"
        logger.info(
            "quantization auto: none, this CPU has none of %s (int8 and bf16 would be slower)",
            ", ".join(INT8_DOT_FEATURES + BF16_MATMUL_FEATURES),
        )
        return "none"
    if requested in ("bf16", "int4", "w4a8") and on_cpu and not bf16_matmul_is_fast(cpu_features):
        logger.warning(
            "--quantization %s on a CPU without %s: bfloat16 products may be slower than "
            "full precision here",
            requested,
            ", ".join(BF16_MATMUL_FEATURES),
        )
    if requested == "w4a8" and on_cpu and not w4a8_is_vectorized(cpu_features):
        logger.warning(
            "--quantization w4a8 on a CPU without avx512_vnni: its 4-bit kernel takes a plain C "
            "loop here, slower than int4 or full precision"
        )
    if requested == "int8" and on_cpu and not int8_matmul_is_fast(cpu_features):
        logger.warning(
            "--quantization int8 on a CPU without int8 dot-product instructions (%s): int8 "
            "products take a generic path here, slower than full precision",
            ", ".join(INT8_DOT_FEATURES),
        )
    return requested


def _quantize(model: PreTrainedModel, device: torch.device, mode: str) -> PreTrainedModel:
    """Batch-invariant int8, bf16 or int4 linear layers (engine/quantization.py): CPU only."""
    from services.worker.engine.quantization import quantize

    if device.type != "cpu":
        raise ValueError(f"{mode} quantization runs on the CPU only, not on {device}")
    quantize(model, mode)
    return model


def _generation_config_sampling(model: PreTrainedModel) -> SamplingParams:
    """The sampling a model's generation_config.json recommends, as vLLM applies it by default."""
    config = getattr(model, "generation_config", None)
    if config is None or not getattr(config, "do_sample", False):
        return SamplingParams()
    fallback = SamplingParams()
    return SamplingParams(
        temperature=float(getattr(config, "temperature", None) or fallback.temperature),
        top_p=float(getattr(config, "top_p", None) or fallback.top_p),
        top_k=int(getattr(config, "top_k", None) or fallback.top_k),
        repetition_penalty=float(
            getattr(config, "repetition_penalty", None) or fallback.repetition_penalty
        ),
    )


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokenizer's EOS plus generation_config's (an int or a list)."""
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    for value in (
        getattr(generation_config, "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _vocab_size(model: PreTrainedModel) -> int:
    """Rows of the input embedding matrix (the config's vocab_size may be padded differently)."""
    import torch

    weight = model.get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor)
    return int(weight.shape[0])
