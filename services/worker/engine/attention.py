"""Batch-invariant causal attention on the CPU, in one call per layer (`CpuAttention`).

torch's SDPA chooses its kernel and blocking by shape, so a position's attention would differ in
the last bits between a decode step, a prefill chunk and a batch of other sizes; the runner then
has to call it per block of positions, hundreds of small calls a step. attention_kernel.c
computes every query row by the same arithmetic whatever the call holds (its header says how),
in one call over all packed rows. No maintained library offers that for the CPU, hence the C.

The same library holds the glue between bf16 linear layers (`LayerGlue`): with products of a few
rows, the thirty-odd small torch operations a layer between them (norms, rotary positions, cache
writes, conversions, the gate) took as long as the products. Written by hand, each row's
arithmetic stays fixed whatever the batch, which a generated kernel (torch.compile) does not
promise.

The library also holds the 4-bit products of the int4 and w4a8 modes (int4_kernel.c,
int4_q8_kernel.c, `Int4Product`): torch's own 4-bit kernel costs twice oneDNN's bf16 per row at
eight rows; the hand-written int4 one (bf16 dot products over codes placed under a bf16
exponent) less than bf16 up to 8 rows and about as much beyond, the w4a8 one (inputs rounded to
8 bits, int8 dot products) 0.7x bf16 at 256 rows (bench/README.md); both sum each output alike in
any batch.

The kernels are compiled with the system's C compiler on first use (about a second) into a cache
keyed by their sources, their flags and this CPU, and loaded with ctypes. Where no compiler works
the runner keeps the per-block SDPA path and int4 layers torch's kernel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in ("attention_kernel.c", "int4_kernel.c", "int4_q8_kernel.c")
)
_HEADERS = tuple(Path(__file__).with_name(name) for name in ("bf16.h", "int4_blocks.h"))
_FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC")
_NATIVE = "-march=native"
# What the kernel takes (attention_kernel.c): head_dim a multiple of LANES, fixed buffers.
LANES, MAX_HEAD_DIM, MAX_GROUP = 16, 256, 16
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


class CpuAttention:
    """attention_kernel.c's entry point over torch tensors."""

    def __init__(self, library: ctypes.CDLL) -> None:
        function = library.chatfleet_attention
        pointer, int64 = ctypes.c_void_p, ctypes.c_int64
        function.argtypes = [
            pointer, int64, pointer, pointer, pointer, int64, pointer, pointer,
            int64, int64, int64, int64, int64, ctypes.c_float, ctypes.c_int, ctypes.c_int,
            pointer,
        ]  # fmt: skip
        function.restype = ctypes.c_int
        self._function = function

    @staticmethod
    def supports(
        dtype: torch.dtype,
        heads: int,
        kv_heads: int,
        head_dim: int,
        kv_dtype: torch.dtype | None = None,
    ) -> bool:
        """Queries in `dtype`, keys and values in `kv_dtype` (None: the same)."""
        return (
            dtype in _DTYPES
            and (kv_dtype or dtype) in _DTYPES
            and heads % kv_heads == 0
            and heads // kv_heads <= MAX_GROUP
            and head_dim <= MAX_HEAD_DIM
            and head_dim % LANES == 0
        )

    def __call__(
        self,
        q: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        rows: torch.Tensor,
        positions: torch.Tensor,
        scale: float,
        scores: torch.Tensor,
    ) -> torch.Tensor:
        """Attention of the query rows q [N, heads, head_dim], token i at positions[i] of cache
        row rows[i], over keys [0, positions[i]] of caches [rows, kv_heads, capacity, head_dim],
        in q's dtype (the caches may be bf16 under float32 queries: rounding the queries too
        changes a small model's answers). `scores` is float32 scratch of at least
        `scores_needed` floats."""
        n, heads, head_dim = q.shape
        _, kv_heads, capacity, _ = cache_k.shape
        if q.stride(2) != 1 or q.stride(1) != head_dim:
            q = q.contiguous()
        for tensor in (cache_k, cache_v, rows, positions, scores):
            assert tensor.is_contiguous() and tensor.device.type == "cpu"
        assert rows.dtype == positions.dtype == torch.int64 and len(rows) == len(positions) == n
        assert cache_k.dtype == cache_v.dtype
        out = torch.empty((n, heads, head_dim), dtype=q.dtype)
        status = self._function(
            q.data_ptr(), q.stride(0), cache_k.data_ptr(), cache_v.data_ptr(), out.data_ptr(),
            out.stride(0), rows.data_ptr(), positions.data_ptr(), n, heads, kv_heads, head_dim,
            capacity, scale, _DTYPES[q.dtype], _DTYPES[cache_k.dtype], scores.data_ptr(),
        )  # fmt: skip
        if status != 0:
            raise ValueError(f"attention kernel refused shapes {tuple(q.shape)} / {kv_heads}")
        return out


def scores_needed(heads: int, kv_heads: int, max_position: int) -> int:
    """Floats of scratch a call needs whose last position is `max_position`."""
    return heads // kv_heads * -(-(max_position + 1) // LANES) * LANES


class LayerGlue:
    """attention_kernel.c's glue between bf16 linear layers (its last section): for the
    runner's fused path, bf16 products with float32 activations and a bf16 KV cache."""

    def __init__(self, library: ctypes.CDLL) -> None:
        pointer, int64, c_float = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        self._norm = library.chatfleet_add_rms_norm
        self._norm.argtypes = [pointer, pointer, int64, int64, pointer, c_float, pointer]
        self._norm.restype = None
        self._silu = library.chatfleet_silu_mul
        self._silu.argtypes = [pointer, int64, int64, pointer]
        self._silu.restype = None
        self._rope = library.chatfleet_rope_attention
        self._rope.argtypes = [
            pointer, int64, pointer, pointer, pointer, pointer, pointer, pointer,
            int64, int64, int64, int64, c_float, pointer, pointer, pointer,
        ]  # fmt: skip
        self._rope.restype = ctypes.c_int
        self._ties = library.chatfleet_refine_near_ties
        self._ties.argtypes = [pointer, int64, int64, pointer, pointer, int64]
        self._ties.restype = None

    @staticmethod
    def supports(hidden: int, intermediate: int, head_dim: int) -> bool:
        return hidden % 32 == 0 and intermediate % LANES == 0 and head_dim % LANES == 0

    def refine_near_ties(
        self, logits: torch.Tensor, x: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        """In place: the logits [n, vocab] (float32, from bf16 x [n, d] times weight [vocab, d]
        rounded to bf16 by oneDNN) whose order that rounding may have changed, those within two
        bf16 steps of their row's largest, recomputed as float32 dot products. A step is 0.125
        at a logit of 25, and a small model's top two tokens can be closer than that (the
        default model's first answer to "What is the capital of France?" is one such tie).
        Which entries are recomputed depends on the row alone: still batch-invariant. One
        compiled pass a row (in torch, a max, a comparison and a gather cost 1.6 ms a step at
        16 rows)."""
        n, vocab = logits.shape
        d = x.shape[1]
        assert logits.is_contiguous() and logits.dtype == torch.float32
        assert x.is_contiguous() and weight.is_contiguous() and weight.shape == (vocab, d)
        assert x.dtype == weight.dtype == torch.bfloat16 and len(x) == n
        self._ties(logits.data_ptr(), n, vocab, x.data_ptr(), weight.data_ptr(), d)
        return logits

    def add_rms_norm(
        self,
        hidden: torch.Tensor,
        delta: torch.Tensor | None,
        weight: torch.Tensor,
        eps: float,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """hidden [n, d] float32 += delta (bf16, or None) in place; out [n, d] bf16 = the RMS
        norm of the sum times `weight` (float32)."""
        n, d = hidden.shape
        delta_pointer = None if delta is None else delta.data_ptr()
        self._norm(hidden.data_ptr(), delta_pointer, n, d, weight.data_ptr(), eps, out.data_ptr())
        return out

    def silu_mul(self, gate_up: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out [n, w] bf16 = silu(gate) * up of gate_up [n, 2w] = [gate | up] (bf16)."""
        n, width = out.shape
        self._silu(gate_up.data_ptr(), n, width, out.data_ptr())
        return out

    def rope_attention(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        rows: torch.Tensor,
        positions: torch.Tensor,
        scale: float,
        heads: int,
        q_scratch: torch.Tensor,
        scores: torch.Tensor,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """The attention of one layer from its q/k/v product qkv [n, (heads + 2 kv_heads) *
        head_dim] (bf16): rotary positions (cos, sin [n, head_dim] float32), keys and values
        written to the bf16 caches at (rows[i], positions[i]), then out [n, heads * head_dim]
        (bf16). q_scratch: float32 [n, heads * head_dim]; scores as for CpuAttention."""
        n = len(qkv)
        _, kv_heads, capacity, head_dim = cache_k.shape
        status = self._rope(
            qkv.data_ptr(), n, cos.data_ptr(), sin.data_ptr(), cache_k.data_ptr(),
            cache_v.data_ptr(), rows.data_ptr(), positions.data_ptr(), heads, kv_heads, head_dim,
            capacity, scale, q_scratch.data_ptr(), scores.data_ptr(), out.data_ptr(),
        )  # fmt: skip
        if status != 0:
            raise ValueError(f"attention kernel refused {heads} heads / {kv_heads} x {head_dim}")
        return out


class Int4Product:
    """bf16 rows times 4-bit weights in groups of 32 inputs (quantization.py's Int4Linear), in the
    kernel's own weight layout: int4_kernel.c (bf16 dot products over the bf16 inputs), or with
    `eight_bit_inputs` int4_q8_kernel.c (the inputs rounded to 8 bits per group, int8 dot
    products, as llama.cpp; twice the products an instruction)."""

    TILE = 16

    def __init__(self, library: ctypes.CDLL, eight_bit_inputs: bool = False) -> None:
        pointer, int64 = ctypes.c_void_p, ctypes.c_int64
        self.eight_bit_inputs = eight_bit_inputs
        name = "chatfleet_int4_q8" if eight_bit_inputs else "chatfleet_int4"
        self._bytes = library.chatfleet_int4_layout_bytes
        self._bytes.argtypes = [int64, int64]
        self._bytes.restype = int64
        self._layout = getattr(library, f"{name}_layout")
        self._layout.argtypes = [pointer, pointer, pointer, int64, int64, pointer]
        self._layout.restype = ctypes.c_int
        self._product = getattr(library, f"{name}_product")
        self._product.argtypes = [pointer, int64, int64, pointer, int64, int64, int64, pointer]
        self._product.restype = ctypes.c_int
        vectorized = getattr(library, f"{name}_vectorized")
        vectorized.restype = ctypes.c_int
        # AVX512-BF16 (AVX512-VNNI for 8-bit inputs) dot products; else a plain C loop (as
        # exact, several times slower).
        self.vectorized = bool(vectorized())

    def layout(
        self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
    ) -> torch.Tensor:
        """codes [n, k] uint8 (0..15, one a byte), scales and zeros [n, k / 32] bf16 -> the
        kernel's weight bytes."""
        n, k = codes.shape
        size = self._bytes(n, k)
        if size < 0:
            raise ValueError(f"the int4 kernel takes whole groups and tiles, not {n} x {k}")
        codes, scales, zeros = codes.contiguous(), scales.contiguous(), zeros.contiguous()
        assert codes.dtype == torch.uint8 and scales.dtype == zeros.dtype == torch.bfloat16
        assert scales.shape == zeros.shape == (n, k // 32)
        out = torch.empty(size, dtype=torch.uint8)
        self._layout(codes.data_ptr(), scales.data_ptr(), zeros.data_ptr(), n, k, out.data_ptr())
        return out

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, out_features: int) -> torch.Tensor:
        """bf16 x [m, k] times laid-out weights -> bf16 [m, out_features]."""
        x = x.contiguous()
        assert x.dtype == torch.bfloat16
        m, k = x.shape
        out = torch.empty((m, out_features), dtype=torch.bfloat16)
        tiles = out_features // self.TILE
        status = self._product(
            x.data_ptr(), m, k, weights.data_ptr(), out_features, 0, tiles, out.data_ptr()
        )
        if status != 0:
            raise ValueError(f"the int4 kernel refused {m} x {k} -> {out_features}")
        return out


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (logged once) where they cannot be built."""
    try:
        return ctypes.CDLL(str(_build()))
    except (OSError, subprocess.CalledProcessError) as exc:
        logger.warning("no compiled attention kernel (%s): attention runs per block in SDPA", exc)
        return None


def load_cpu_attention() -> CpuAttention | None:
    """The compiled attention kernel, or None where it cannot be built."""
    library = _library()
    return None if library is None else CpuAttention(library)


def load_layer_glue() -> LayerGlue | None:
    """The compiled layer glue, or None where it cannot be built."""
    library = _library()
    return None if library is None else LayerGlue(library)


@functools.cache
def load_int4_product(eight_bit_inputs: bool = False) -> Int4Product | None:
    """The compiled int4 product (one, shared by every layer), or None where it cannot be
    built."""
    library = _library()
    return None if library is None else Int4Product(library, eight_bit_inputs)


def _build() -> Path:
    sources = [path.read_bytes() for path in (*_SOURCES, *_HEADERS)]
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc, gcc or $CC) on PATH")
    key = hashlib.sha256(
        b"\0".join([*sources, " ".join(_FLAGS).encode(), _cpu_identity().encode()])
    ).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "chatfleet"
    library = cache / "kernels" / f"attention-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed into place: processes racing to build it each
    # rename a complete file.
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        built = Path(scratch) / library.name
        base = [compiler, *_FLAGS, "-o", str(built), *map(str, _SOURCES), "-lm"]
        try:
            subprocess.run([*base[:1], _NATIVE, *base[1:]], check=True, capture_output=True)
        except subprocess.CalledProcessError:
            # Compilers without -march=native (some for ARM) build for the generic target.
            subprocess.run(base, check=True, capture_output=True)
        os.replace(built, library)
    logger.info("built the attention kernel: %s", library)
    return library


def _cpu_identity() -> str:
    """What -march=native builds for: the CPU's model and feature flags where Linux says."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join([platform.machine(), *sorted(set(wanted))])
