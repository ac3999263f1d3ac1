"""int8 linear layers whose results do not depend on the batch.

Weights are int8 with one scale per output channel; activations are quantized per token (per
row) at each call; the product accumulates exactly in int32 (torch._int_mm). Because every row
keeps its own scale and integer sums are exact, a request's logits are the same whatever else is
in the batch: greedy output and seeded sampling stay batch-invariant. (torch.ao's dynamic
quantization uses one activation scale per call, which couples the rows of a batch.) On a CPU
this reads a quarter of the fp32 weight bytes per step, which is what bounds decoding speed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

logger = logging.getLogger(__name__)

_QMAX = 127.0
# CPU features that multiply int8 in hardware (dot-product instructions), which torch._int_mm
# needs to be fast. Without them it runs a generic path: measured on an AVX2-only AMD EPYC,
# 1 GOP/s against about 26 GFLOP/s for the float32 product of the same shape, and served int8
# decoding 2.5 times slower than float32 (bench/README.md). ARM's i8mm is not listed: not measured.
INT8_DOT_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")


def int8_matmul_is_fast(features: Mapping[str, object] | None = None) -> bool:
    """Whether this CPU (or the given torch.cpu.get_capabilities() mapping) has int8 dot-product
    instructions, so int8 layers are a speed-up rather than a slowdown."""
    if features is None:
        features = torch.cpu.get_capabilities()
    return any(bool(features.get(name, False)) for name in INT8_DOT_FEATURES)


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
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear.from_linear(child))
                replaced += 1
    logger.info("quantized %d linear layers to int8", replaced)
    return replaced
