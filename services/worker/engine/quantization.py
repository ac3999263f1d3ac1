"""Linear layers with smaller weights whose results do not depend on the batch.

Four modes, all approximate (greedy output differs from float32 `generate` after some tokens):

- int8: int8 weights with one scale per output channel; activations are quantized per token (per
  row) at each call; the product accumulates exactly in int32 (torch._int_mm). Because every row
  keeps its own scale and integer sums are exact, a request's logits are the same whatever else is
  in the batch. (torch.ao's dynamic quantization uses one activation scale per call, which couples
  the rows of a batch.) A quarter of the float32 weight bytes.
- bf16: bfloat16 weights pre-packed once for oneDNN, bfloat16 activations, float32 accumulation,
  on AMX tiles where the CPU has them (torch.ops.mkldnn._linear_pointwise, the kernel
  torch.compile's CPU backend uses). Half the float32 bytes, and on an AMX CPU faster than int8
  at every batch size measured (bench/linear_kernels.py, bench/README.md). Rows are
  independent: each output row is the same in any batch (tested).
- int4: 4-bit weights in groups of 32 with a bfloat16 scale and zero each (Int4Linear: a GGUF
  file's own Q4 grid, an eighth of the float32 bytes, bfloat16 activations, float32
  accumulation; the compiled kernel of int4_kernel.c, or torch's where no C compiler works). On
  CPUs where bf16 products are much faster than the 4-bit ones for hundreds of rows (AMX tiles,
  or no vectorized 4-bit kernel), only generated tokens take them and prompt tokens go through
  bf16 layers (SplitLinear, `int4_prompts_are_fast`); the output layer then takes 8-bit weights
  for generated tokens (Int8WeightLinear; a GGUF keeps it at 8 bits or more), else it is bf16
  for all (oneDNN's bf16 product beats torch's 8-bit one from 8 rows on: 2.5 against 3.8 ms at
  8 rows of the default model's, 1.9 against 1.8 ms at one). Rows are independent, and which
  kernel a row takes depends on its position's token only.
- w4a8: int4's layers for every token, but the compiled kernel rounds each row's inputs to 8
  bits per group of 32 and multiplies them by the codes with int8 dot products (AVX512-VNNI), as
  llama.cpp does: twice the products an instruction, and greedy output leaves float32's far
  sooner than int4's (bench/README.md). Rows are independent here too.

Everything outside the linear layers (norms, attention, rotary positions) stays float32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn
from transformers import PreTrainedModel

from services.worker.engine.attention import load_int4_product

logger = logging.getLogger(__name__)

_QMAX = 127.0
# Rows per oneDNN bf16 product. With one thread, each row of a product of up to ~129 rows equals
# the same row alone, bit for bit; from 130 rows on, the 1536-input down projection of the
# default model takes another kernel whose rows differ in the last bits (tested).
BF16_MAX_ROWS = 64
# oneDNN also computes products of fewer than this many rows otherwise on CPUs with avx512_bf16
# but no AMX (an AMD EPYC, 2026-12-05: one row of four in a hundred differed in the last bit
# from the same row alone, for the 1536-input shape): such products are padded to it.
BF16_MIN_ROWS = 4
# Input features per 4-bit group: a GGUF Q4_0 / Q4_1 block, a Q4_K sub-block.
INT4_GROUP = 32
# CPU features that multiply int8 in hardware (dot-product instructions), which torch._int_mm
# needs to be fast. Without them it runs a generic path: measured on an AVX2-only AMD EPYC,
# 1 GOP/s against about 26 GFLOP/s for the float32 product of the same shape, and served int8
# decoding 2.5 times slower than float32 (bench/README.md). ARM's i8mm is not listed: not measured.
INT8_DOT_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")
# CPU features that multiply bfloat16 in hardware: AMX tiles, or AVX512-BF16 dot products. Measured
# on an AMD EPYC with avx512_bf16 and no AMX (bench/quantization_modes.py, bench/README.md): bf16
# 34.5 tok/s single stream and 290 at 16 streams against float32's 19.3 and 127, as fast as int8
# under load and far closer to float32's greedy tokens.
BF16_MATMUL_FEATURES = ("amx_bf16", "avx512_bf16")


def int4_prompts_are_fast(features: Mapping[str, object] | None = None) -> bool:
    """Whether prompt positions take the 4-bit layers too under int4 (else bf16 ones): where the
    compiled 4-bit product is vectorized (AVX512-BF16) and no AMX tiles make bf16 several times
    faster for prompt-sized batches. Measured on an AMD EPYC with AVX512-BF16 and no AMX, one
    thread, 1536 x 576: 1.13 ms against oneDNN bf16's 1.00 ms at 256 rows (bench/README.md). A
    prefix cache can then share the blocks of answers too (engine/runner.py)."""
    if features is None:
        features = torch.cpu.get_capabilities()
    if features.get("amx_bf16", False):
        return False
    kernel = load_int4_product()
    return kernel is not None and kernel.vectorized


def int8_matmul_is_fast(features: Mapping[str, object] | None = None) -> bool:
    """Whether this CPU (or the given torch.cpu.get_capabilities() mapping) has int8 dot-product
    instructions, so int8 layers are a speed-up rather than a slowdown."""
    if features is None:
        features = torch.cpu.get_capabilities()
    return any(bool(features.get(name, False)) for name in INT8_DOT_FEATURES)


def w4a8_is_vectorized(features: Mapping[str, object] | None = None) -> bool:
    """Whether this CPU (or the given capabilities mapping) has AVX512-VNNI, which the vector
    build of w4a8's kernel (int4_q8_kernel.c) needs; without it a plain C loop runs."""
    if features is None:
        features = torch.cpu.get_capabilities()
    return bool(features.get("avx512_vnni", False))


def bf16_matmul_is_fast(features: Mapping[str, object] | None = None) -> bool:
    """Whether this CPU (or the given capabilities mapping) multiplies bfloat16 in hardware
    (AMX tiles or AVX512-BF16)."""
    if features is None:
        features = torch.cpu.get_capabilities()
    return any(bool(features.get(name, False)) for name in BF16_MATMUL_FEATURES)


class Int8Linear(nn.Module):
    """A drop-in for nn.Linear with int8 weights and per-token int8 activations."""

    weight_int8: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        # [out, in] kept contiguous; _int_mm takes its transpose as a view.
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / _QMAX
        quantized = torch.round(weight / scale[:, None]).clamp(-_QMAX, _QMAX).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        return cls(quantized, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features).float()
        scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / _QMAX
        quantized = torch.round(rows / scale).to(torch.int8)
        out = torch._int_mm(quantized, self.weight_int8.t())
        result = out.float() * scale * self.weight_scale
        if self.bias is not None:
            result = result + self.bias
        return result.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: nn.Module) -> int:
    """Replace every nn.Linear of `model` in place; returns how many were replaced."""
    probe = torch.zeros(1, 8, dtype=torch.int8)
    try:
        torch._int_mm(probe, torch.zeros(8, 8, dtype=torch.int8))
    except RuntimeError as error:
        raise ValueError(f"int8 matrix products are not available here: {error}") from error
    replaced = _replace_linears(model, Int8Linear.from_linear)
    logger.info("quantized %d linear layers to int8", replaced)
    return replaced


_Packed = TypeVar("_Packed", bound="_PackedLinear")


class _PackedLinear(nn.Module):
    """What the pre-packed layers share: an nn.Linear drop-in (float32 in, float32 out) whose
    weights are in a kernel's own layout, and `fuse`: one layer computing the concatenated outputs
    of several (same input), each of which then drops its weights and answers with its columns of
    the fused product (a packed weight cannot be sliced into views)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # Set by `fuse`: this layer's outputs are columns [start, end) of `_source`'s.
        self._source: _PackedLinear | None = None
        self._columns = (0, out_features)

    @classmethod
    def _concatenate(cls: type[_Packed], layers: Sequence[_Packed]) -> _Packed:
        raise NotImplementedError

    def _drop_weights(self) -> None:
        raise NotImplementedError

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in_features] -> [rows, out_features], float32."""
        raise NotImplementedError

    @classmethod
    def fuse(cls: type[_Packed], layers: Sequence[_Packed]) -> _Packed:
        fused = cls._concatenate(layers)
        start = 0
        for layer in layers:
            end = start + layer.out_features
            layer._drop_weights()
            # object.__setattr__: not a submodule, so model.modules() lists the fused layer once.
            object.__setattr__(layer, "_source", fused)
            layer._columns = (start, end)
            start = end
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._source is not None:
            start, end = self._columns
            return self._source(x)[..., start:end]
        out = self._product(x.reshape(-1, self.in_features))
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class BF16Linear(_PackedLinear):
    """bfloat16 weights pre-packed for oneDNN. The packed weight is an opaque oneDNN tensor: it
    cannot be sliced, copied or moved."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(weight.shape[1], weight.shape[0])
        # A plain attribute, not a buffer: state_dict() and .to() cannot handle opaque tensors.
        self.weight_packed: torch.Tensor | None = torch.ops.mkldnn._reorder_linear_weight(
            weight.detach().to(torch.bfloat16).contiguous(), 1
        )
        self.bias_bf16: torch.Tensor | None = (
            None if bias is None else bias.detach().to(torch.bfloat16).contiguous()
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BF16Linear:
        return cls(linear.weight, linear.bias)

    def weight_bf16(self) -> torch.Tensor:
        """The plain [out, in] bfloat16 weight (unpacked: a copy)."""
        if self._source is not None:
            start, end = self._columns
            assert isinstance(self._source, BF16Linear)
            return self._source.weight_bf16()[start:end]
        assert self.weight_packed is not None
        return self.weight_packed.to_dense()

    def bias(self) -> torch.Tensor | None:
        """The bfloat16 bias, if any (a slice of the fused layer's once fused)."""
        if self._source is not None:
            assert isinstance(self._source, BF16Linear)
            bias = self._source.bias()
            start, end = self._columns
            return None if bias is None else bias[start:end]
        return self.bias_bf16

    @classmethod
    def _concatenate(cls, layers: Sequence[BF16Linear]) -> BF16Linear:
        biases = [layer.bias() for layer in layers]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat(
                [
                    b if b is not None else torch.zeros(layer.out_features, dtype=torch.bfloat16)
                    for b, layer in zip(biases, layers, strict=True)
                ]
            )
        return cls(torch.cat([layer.weight_bf16() for layer in layers]), bias)

    def _drop_weights(self) -> None:
        self.weight_packed = self.bias_bf16 = None

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return self.bf16_product(x.to(torch.bfloat16))

    def bf16_product(self, x: torch.Tensor) -> torch.Tensor:
        """bf16 rows [rows, in_features] -> bf16 rows [rows, out_features] (the runner's fused
        path keeps products in bf16 between its compiled glue)."""
        if len(x) <= BF16_MAX_ROWS:
            return self._call(x)
        # oneDNN picks another kernel (another order of the sums) for many rows: one product
        # per BF16_MAX_ROWS rows keeps every row's result what it is alone.
        out = x.new_empty(len(x), self.out_features)
        for start in range(0, len(x), BF16_MAX_ROWS):
            out[start : start + BF16_MAX_ROWS] = self._call(x[start : start + BF16_MAX_ROWS])
        return out

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        rows = len(x)
        if rows < BF16_MIN_ROWS:
            x = torch.cat((x, x.new_zeros(BF16_MIN_ROWS - rows, x.shape[1])))
        out = torch.ops.mkldnn._linear_pointwise(
            x, self.weight_packed, self.bias_bf16, "none", [], ""
        )
        return out[:rows]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16"


class Int4Linear(_PackedLinear):
    """4-bit weights in groups of INT4_GROUP input features, w = (code - 8) * scale + zero with a
    bfloat16 scale and zero per group and output feature; bfloat16 activations, float32
    accumulation, bfloat16 results: int4_kernel.c (attention.Int4Product), or
    torch._weight_int4pack_mm_for_cpu where it cannot be built; with `eight_bit_inputs` (the
    w4a8 mode) int4_q8_kernel.c, which rounds the inputs to 8 bits per group first. A GGUF
    Q4_0 / Q4_1 / Q4_K tensor is such a grid already (16 levels per block of 32), so its codes
    come back as they are in the file and only the scales are rounded to bfloat16. Every kernel
    computes each output row from its input row alone, in the same order for any number of rows:
    batch-invariant (tested).
    torch's costs twice oneDNN's bf16 per row at 8 rows; the compiled one less than bf16 up to
    8 rows and about as much at 16 (bench/README.md)."""

    def __init__(
        self,
        codes: torch.Tensor,
        scales_zeros: torch.Tensor,
        bias: torch.Tensor | None,
        eight_bit_inputs: bool = False,
    ) -> None:
        out_features, half = codes.shape
        super().__init__(half * 2, out_features)
        self.eight_bit_inputs = eight_bit_inputs
        # Two codes a byte, [out, in / 2] (low nibble first): kept to fuse layers, as the
        # kernel's packed layout interleaves rows and cannot be concatenated.
        self.register_buffer("codes", codes)
        self.register_buffer("scales_zeros", scales_zeros)  # [in / group, out, 2] bfloat16
        self.register_buffer("bias", bias)  # float32 or None
        # The compiled kernel's layout where it builds (attention.py), else torch's (whose
        # inputs are bf16: the w4a8 mode needs the compiled one).
        self._kernel = load_int4_product(eight_bit_inputs)
        if self._kernel is None and eight_bit_inputs:
            raise ValueError("w4a8 needs the compiled int4 kernel, which did not build here")
        self.weight_packed: torch.Tensor | None = (
            torch._convert_weight_to_int4pack_for_cpu(_unpack_nibbles(codes).to(torch.int32), 1)
            if self._kernel is None
            else self._kernel.layout(
                _unpack_nibbles(codes), scales_zeros[..., 0].t(), scales_zeros[..., 1].t()
            )
        )

    @staticmethod
    def supports(linear: nn.Linear) -> bool:
        """The kernel's shape constraints: whole groups of inputs, outputs in sixteens."""
        return linear.in_features % INT4_GROUP == 0 and linear.out_features % 16 == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, eight_bit_inputs: bool = False) -> Int4Linear:
        """Round each group to 16 levels between its minimum and its maximum (exactly the
        file's levels when the weights came from a 4-bit GGUF grid)."""
        weight = linear.weight.detach().float()
        out_features, in_features = weight.shape
        groups = weight.reshape(out_features, in_features // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = ((high - low) / 15).clamp(min=torch.finfo(torch.bfloat16).tiny)
        scale_bf16 = scale.to(torch.bfloat16)
        zero_bf16 = (low + 8 * scale).to(torch.bfloat16)
        # Codes against the rounded scale and zero, so their rounding is not counted twice.
        codes = torch.round(
            (groups - zero_bf16.float()[..., None]) / scale_bf16.float()[..., None] + 8
        ).clamp(0, 15)
        codes = codes.to(torch.uint8).reshape(out_features, in_features)
        scales_zeros = torch.stack((scale_bf16.t(), zero_bf16.t()), dim=-1).contiguous()
        bias = None if linear.bias is None else linear.bias.detach().float()
        return cls(_pack_nibbles(codes), scales_zeros, bias, eight_bit_inputs)

    def dequantized(self) -> torch.Tensor:
        """The [out, in] float32 weights the kernel multiplies by."""
        packed_codes, scales_zeros, _ = self.parts()
        codes = _unpack_nibbles(packed_codes).float() - 8
        scale = scales_zeros[..., 0].t().float().repeat_interleave(INT4_GROUP, dim=1)
        zero = scales_zeros[..., 1].t().float().repeat_interleave(INT4_GROUP, dim=1)
        return codes * scale + zero

    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(codes, scales_zeros, bias) of this layer, slices of the fused layer's once fused."""
        if self._source is not None:
            assert isinstance(self._source, Int4Linear)
            codes, scales_zeros, bias = self._source.parts()
            start, end = self._columns
            return (
                codes[start:end],
                scales_zeros[:, start:end],
                None if bias is None else bias[start:end],
            )
        return self.codes, self.scales_zeros, self.bias

    @classmethod
    def _concatenate(cls, layers: Sequence[Int4Linear]) -> Int4Linear:
        parts = [layer.parts() for layer in layers]
        return cls(
            torch.cat([codes for codes, _, _ in parts]),
            torch.cat([scales_zeros for _, scales_zeros, _ in parts], dim=1),
            cat_optional([bias for _, _, bias in parts], [n.out_features for n in layers]),
            layers[0].eight_bit_inputs,
        )

    def _drop_weights(self) -> None:
        self.weight_packed = None
        self.codes = self.scales_zeros = torch.empty(0)
        self.bias = None

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        out = self._bf16_out(x.to(torch.bfloat16)).float()
        return out if self.bias is None else out + self.bias

    def bf16_product(self, x: torch.Tensor) -> torch.Tensor:
        """bf16 rows -> bf16 rows (the runner's fused path)."""
        if self.bias is None:
            return self._bf16_out(x)
        return self._product(x).to(torch.bfloat16)

    def _bf16_out(self, x: torch.Tensor) -> torch.Tensor:
        """The product without the bias, bf16."""
        assert self.weight_packed is not None
        if self._kernel is not None:
            return self._kernel(x, self.weight_packed, self.out_features)
        return torch._weight_int4pack_mm_for_cpu(
            x.contiguous(), self.weight_packed, INT4_GROUP, self.scales_zeros
        )

    def extra_repr(self) -> str:
        inputs = ", 8-bit inputs" if self.eight_bit_inputs else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int4{inputs}"


class Int8WeightLinear(_PackedLinear):
    """8-bit weights with one bfloat16 scale per output feature, bfloat16 activations
    (torch._weight_int8pack_mm): the int4 mode's output layer for generated tokens, which a GGUF
    keeps at 8 bits (Q8_0). Each output row comes from its input row alone, in the same order
    for any number of rows (tested). It reads half the bf16 bytes: the default model's 49,152 x
    576 output layer takes 3.4 ms a decoding step against 4.4 ms in bf16 (one thread)."""

    weight_int8: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(weight_int8.shape[1], weight_int8.shape[0])
        self.register_buffer("weight_int8", weight_int8)  # [out, in]
        self.register_buffer("scale", scale)  # [out] bfloat16
        self.register_buffer("bias", bias)  # float32 or None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightLinear:
        """Symmetric per-row scales, rounded up to bfloat16 before the codes are taken against
        them: the kernel multiplies by the rounded scale, so no row is scaled off and none clips."""
        weight = linear.weight.detach().float()
        wanted = (weight.abs().amax(dim=1) / _QMAX).clamp(min=torch.finfo(torch.bfloat16).tiny)
        scale = wanted.to(torch.bfloat16)
        up = torch.nextafter(scale, torch.full_like(scale, torch.inf))
        scale = torch.where(scale.float() < wanted, up, scale)
        codes = torch.round(weight / scale.float()[:, None]).clamp(-_QMAX, _QMAX).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        return cls(codes, scale, bias)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        out = torch._weight_int8pack_mm(
            x.to(torch.bfloat16).contiguous(), self.weight_int8, self.scale
        ).float()
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


@dataclass(frozen=True)
class RowSplit:
    """Which rows of a step's packed tokens hold generated tokens (the rest are prompt tokens)."""

    generated: torch.Tensor  # row indices, long
    prompt: torch.Tensor  # row indices, long


class SplitLinear(nn.Module):
    """The int4 mode's layer where `int4_prompts_are_fast` says no, and its output layer: the
    same weights twice, low-bit (Int4Linear, Int8WeightLinear) for the positions of generated
    tokens, bfloat16 (BF16Linear) for those of prompt tokens. Decoding feeds one row per stream
    per step, where reading the weights is the cost and 4 bits read four times less; prompts
    feed hundreds of rows, where the products are the cost and AMX's bf16 tiles win
    (bench/README.md). The kernel is chosen by what a position holds, never by the batch: each
    position computes the same in any batch, chunking or preemption (tested). A prefix cache must
    share only blocks of prompt positions (engine/runner.py). Without a RowSplit (transformers'
    own forward) every row is a prompt row."""

    def __init__(self, generated: Int4Linear | Int8WeightLinear, prompt: BF16Linear) -> None:
        super().__init__()
        self.generated, self.prompt = generated, prompt
        self.in_features, self.out_features = prompt.in_features, prompt.out_features

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SplitLinear:
        return cls(Int4Linear.from_linear(linear), BF16Linear.from_linear(linear))

    @classmethod
    def fuse(cls, layers: Sequence[SplitLinear]) -> SplitLinear:
        generated = [layer.generated for layer in layers if isinstance(layer.generated, Int4Linear)]
        if len(generated) != len(layers):
            raise ValueError("only int4 split layers fuse")
        return cls(
            Int4Linear.fuse(generated),
            BF16Linear.fuse([layer.prompt for layer in layers]),
        )

    def forward(self, x: torch.Tensor, rows: RowSplit | None = None) -> torch.Tensor:
        return self._by_row_kind(x, rows, self.generated, self.prompt)

    def bf16_product(self, x: torch.Tensor, rows: RowSplit | None) -> torch.Tensor:
        """forward() for bf16 rows, in bf16 (the runner's fused path)."""
        generated = self.generated

        def low_bits(part: torch.Tensor) -> torch.Tensor:
            if isinstance(generated, Int4Linear):
                return generated.bf16_product(part)
            return generated._product(part).to(torch.bfloat16)

        return self._by_row_kind(x, rows, low_bits, self.prompt.bf16_product)

    def _by_row_kind(
        self,
        x: torch.Tensor,
        rows: RowSplit | None,
        generated: Callable[[torch.Tensor], torch.Tensor],
        prompt: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Generated rows through `generated`, prompt rows through `prompt`."""
        if rows is None or not len(rows.generated):
            return prompt(x)
        if not len(rows.prompt):
            return generated(x)
        out = x.new_empty(x.shape[0], self.out_features)
        out[rows.generated] = generated(x[rows.generated])
        out[rows.prompt] = prompt(x[rows.prompt])
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 + bf16"


def quantize_bf16(model: nn.Module) -> int:
    """Replace every nn.Linear of `model` in place by a BF16Linear; returns how many."""
    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise ValueError("bfloat16 oneDNN matrix products are not available here")
    replaced = _replace_linears(model, BF16Linear.from_linear)
    logger.info("converted %d linear layers to bfloat16 (oneDNN, pre-packed)", replaced)
    return replaced


def quantize_int4(
    model: nn.Module, int4_prompts: bool | None = None, eight_bit_inputs: bool = False
) -> int:
    """Replace the nn.Linear layers of `model` in place by Int4Linear (`int4_prompts`, by
    default where `int4_prompts_are_fast`) or SplitLinear (4-bit for generated tokens, bf16 for
    prompts), all but the output layer (bf16; with bf16 prompts, 8-bit for generated tokens) and
    those whose shape the 4-bit kernel cannot take, which become BF16Linear (float32 rows would
    depend on the batch: MKL picks its kernel by the row count). `eight_bit_inputs`: the w4a8
    mode, every row through the 4-bit layers with inputs rounded to 8 bits. Returns how many
    layers take 4 bits."""
    try:
        torch._convert_weight_to_int4pack_for_cpu(torch.zeros(16, INT4_GROUP, dtype=torch.int32), 1)
    except (RuntimeError, AttributeError) as error:
        raise ValueError(f"int4 matrix products are not available here: {error}") from error
    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise ValueError("the int4 modes' bf16 layers need oneDNN bfloat16 products: not here")
    if eight_bit_inputs:
        int4_prompts = True
    elif int4_prompts is None:
        int4_prompts = int4_prompts_are_fast()
    output = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    int4 = bf16_only = 0

    def convert(linear: nn.Linear) -> nn.Module:
        nonlocal int4, bf16_only
        if linear is output and not int4_prompts:
            return SplitLinear(Int8WeightLinear.from_linear(linear), BF16Linear.from_linear(linear))
        if linear is output:
            return BF16Linear.from_linear(linear)
        if Int4Linear.supports(linear):
            int4 += 1
            if int4_prompts:
                return Int4Linear.from_linear(linear, eight_bit_inputs)
            return SplitLinear.from_linear(linear)
        bf16_only += 1
        return BF16Linear.from_linear(linear)

    _replace_linears(model, convert)
    logger.info(
        "quantized %d linear layers to int4%s for %s, %d others to bfloat16",
        int4,
        " with 8-bit inputs (w4a8)" if eight_bit_inputs else "",
        "every token, the output layer to bfloat16"
        if int4_prompts
        else "generated tokens and bfloat16 for prompts, the output layer to int8 and bfloat16",
        bf16_only,
    )
    return int4


def quantize(model: nn.Module, mode: str, *, int4_prompts: bool | None = None) -> nn.Module:
    """Apply a resolved quantization mode ("none", "int8", "bf16", "int4", "w4a8") to `model` in
    place (`int4_prompts`: see quantize_int4)."""
    if mode == "int8":
        quantize_int8(model)
    elif mode == "bf16":
        quantize_bf16(model)
    elif mode == "int4":
        quantize_int4(model, int4_prompts)
    elif mode == "w4a8":
        quantize_int4(model, eight_bit_inputs=True)
    elif mode != "none":
        raise ValueError(f"unknown quantization mode {mode!r}")
    return model


def _replace_linears(model: nn.Module, convert: Callable[[nn.Linear], nn.Module]) -> int:
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, convert(child))
                replaced += 1
    return replaced


def cat_optional(
    tensors: Sequence[torch.Tensor | None], sizes: Sequence[int]
) -> torch.Tensor | None:
    """Concatenated biases of fused layers: None if none has one, zeros for those without."""
    if all(t is None for t in tensors):
        return None
    like = next(t for t in tensors if t is not None)
    return torch.cat(
        [t if t is not None else like.new_zeros(n) for t, n in zip(tensors, sizes, strict=True)]
    )


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[rows, 2k] uint8 codes in 0..15 -> [rows, k] bytes, the even column in the low nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)
