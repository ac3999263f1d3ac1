"""Linear layers with smaller weights whose results do not depend on the batch.

Two modes, both approximate (greedy output differs from float32 `generate` after some tokens):

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

Everything outside the linear layers (norms, attention, rotary positions) stays float32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

_QMAX = 127.0
# CPU features that multiply int8 in hardware (dot-product instructions), which torch._int_mm
# needs to be fast. Without them it runs a generic path: measured on an AVX2-only AMD EPYC,
# 1 GOP/s against about 26 GFLOP/s for the float32 product of the same shape, and served int8
# decoding 2.5 times slower than float32 (bench/README.md). ARM's i8mm is not listed: not measured.
INT8_DOT_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")
# CPU features that multiply bfloat16 in hardware tiles (AMX). avx512_bf16 alone is not listed:
# not measured.
BF16_MATMUL_FEATURES = ("amx_bf16",)


def int8_matmul_is_fast(features: Mapping[str, object] | None = None) -> bool:
    """Whether this CPU (or the given torch.cpu.get_capabilities() mapping) has int8 dot-product
    instructions, so int8 layers are a speed-up rather than a slowdown."""
    if features is None:
        features = torch.cpu.get_capabilities()
    return any(bool(features.get(name, False)) for name in INT8_DOT_FEATURES)


def bf16_matmul_is_fast(features: Mapping[str, object] | None = None) -> bool:
    """Whether this CPU (or the given capabilities mapping) multiplies bfloat16 in AMX tiles."""
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


class BF16Linear(nn.Module):
    """A drop-in for nn.Linear (float32 in, float32 out) with bfloat16 weights pre-packed for
    oneDNN. The packed weight is an opaque oneDNN tensor: it cannot be sliced, copied or moved,
    so fused layers (`fuse`) hand their originals a slice of the fused product instead."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # A plain attribute, not a buffer: state_dict() and .to() cannot handle opaque tensors.
        self.weight_packed: torch.Tensor | None = torch.ops.mkldnn._reorder_linear_weight(
            weight.detach().to(torch.bfloat16).contiguous(), 1
        )
        self.bias_bf16: torch.Tensor | None = (
            None if bias is None else bias.detach().to(torch.bfloat16).contiguous()
        )
        # Set by `fuse`: this layer's outputs are columns [start, end) of `_source`'s.
        self._source: BF16Linear | None = None
        self._columns = (0, self.out_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BF16Linear:
        return cls(linear.weight, linear.bias)

    def weight_bf16(self) -> torch.Tensor:
        """The plain [out, in] bfloat16 weight (unpacked: a copy)."""
        if self._source is not None:
            start, end = self._columns
            return self._source.weight_bf16()[start:end]
        assert self.weight_packed is not None
        return self.weight_packed.to_dense()

    @classmethod
    def fuse(cls, layers: Sequence[BF16Linear]) -> BF16Linear:
        """One layer computing the concatenated outputs of `layers` (same input); each of them
        drops its packed weight and answers with its columns of the fused product."""
        biases = [layer.bias_bf16 for layer in layers]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat(
                [
                    b if b is not None else torch.zeros(layer.out_features, dtype=torch.bfloat16)
                    for b, layer in zip(biases, layers, strict=True)
                ]
            )
        fused = cls(torch.cat([layer.weight_bf16() for layer in layers]), bias)
        start = 0
        for layer in layers:
            end = start + layer.out_features
            layer.weight_packed = layer.bias_bf16 = None
            # object.__setattr__: not a submodule, so model.modules() lists the fused layer once.
            object.__setattr__(layer, "_source", fused)
            layer._columns = (start, end)
            start = end
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._source is not None:
            start, end = self._columns
            return self._source(x)[..., start:end]
        out = torch.ops.mkldnn._linear_pointwise(
            x.to(torch.bfloat16), self.weight_packed, self.bias_bf16, "none", [], ""
        )
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16"


def quantize_bf16(model: nn.Module) -> int:
    """Replace every nn.Linear of `model` in place by a BF16Linear; returns how many."""
    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise ValueError("bfloat16 oneDNN matrix products are not available here")
    replaced = _replace_linears(model, BF16Linear.from_linear)
    logger.info("converted %d linear layers to bfloat16 (oneDNN, pre-packed)", replaced)
    return replaced


def quantize(model: nn.Module, mode: str) -> nn.Module:
    """Apply a resolved quantization mode ("none", "int8", "bf16") to `model` in place."""
    if mode == "int8":
        quantize_int8(model)
    elif mode == "bf16":
        quantize_bf16(model)
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
