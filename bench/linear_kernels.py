"""Micro-benchmark of the linear-layer kernels a CPU decode step could use, on the products of the
default chat model (SmolLM2-135M: hidden 576, intermediate 1536, vocabulary 49152).

    .venv/bin/python bench/linear_kernels.py [--rows 1 16 32] [--threads 1 2] [--rounds 5]

For each row count and thread count, every kernel runs the same products in interleaved rounds
(A, B, C, A, B, C, ...), so machine noise hits them all alike; the median round is printed per
product, with the load average. "layer" is one decoder layer's products (fused q/k/v, o, fused
gate/up, down); "step" estimates a whole decode step's linear work: 30 layers plus the LM head.
The error column is the largest difference from the float32 product, relative to its largest
magnitude. torchao's configurations are measured when it imports (it is not a dependency).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from services.worker.engine.quantization import BF16Linear, Int8Linear

HIDDEN, INTERMEDIATE, VOCAB, LAYERS = 576, 1536, 49152, 30
KV = 192  # 3 key/value heads of 64
# (name, in_features, out_features)
PRODUCTS = (
    ("qkv", HIDDEN, HIDDEN + 2 * KV),
    ("o", HIDDEN, HIDDEN),
    ("gate_up", HIDDEN, 2 * INTERMEDIATE),
    ("down", INTERMEDIATE, HIDDEN),
    ("lm_head", HIDDEN, VOCAB),
)


class WeightOnlyInt8Linear(nn.Module):
    """int8 weights with one scale per output channel; activations stay in `dtype`
    (torch.ops.aten._weight_int8pack_mm)."""

    weight_int8: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        weight_int8: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.dtype = dtype
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("weight_scale", weight_scale.to(dtype))
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, dtype: torch.dtype = torch.float32
    ) -> WeightOnlyInt8Linear:
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        quantized = torch.round(weight / scale[:, None]).clamp(-127.0, 127.0).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        return cls(quantized, scale, bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features).to(self.dtype)
        result = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, self.weight_scale)
        if self.bias is not None:
            result = result + self.bias
        return result.to(x.dtype).reshape(*shape[:-1], self.out_features)


INT4_GROUP = 32  # as GGUF's Q4_0 / Q4_1 blocks


class Int4Linear(nn.Module):
    """4-bit weights in groups of 32 along the input, each group with its own scale and zero
    point, as GGUF's Q4_0 / Q4_1 blocks are; activations stay in `dtype`
    (torch.ops.aten._weight_int4pack_mm_for_cpu)."""

    weight_packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        weight_packed: torch.Tensor,
        scales_and_zeros: torch.Tensor,
        bias: torch.Tensor | None,
        in_features: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = weight_packed.shape[0]
        self.dtype = dtype
        self.register_buffer("weight_packed", weight_packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(dtype))
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype = torch.float32) -> Int4Linear:
        weight = linear.weight.detach().float()
        out_features, in_features = weight.shape
        groups = weight.reshape(out_features, in_features // INT4_GROUP, INT4_GROUP)
        low = groups.amin(dim=2)
        scale = ((groups.amax(dim=2) - low) / 15).clamp(min=1e-12)
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.reshape(out_features, in_features).to(torch.int32), 2
        )
        # The kernel dequantizes (q - 8) * scale + zero; [groups, out, 2].
        scales_and_zeros = torch.stack([scale, low + 8 * scale], dim=2).transpose(0, 1)
        bias = None if linear.bias is None else linear.bias.detach().float()
        return cls(packed, scales_and_zeros.contiguous(), bias, in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features).to(self.dtype)
        result = torch.ops.aten._weight_int4pack_mm_for_cpu(
            rows, self.weight_packed, INT4_GROUP, self.scales_and_zeros
        )
        if self.bias is not None:
            result = result + self.bias
        return result.to(x.dtype).reshape(*shape[:-1], self.out_features)


@dataclass(frozen=True)
class Kernel:
    name: str
    # Builds a module from an fp32 nn.Linear; None: not available here.
    build: Callable[[nn.Linear], nn.Module]
    dtype: torch.dtype = torch.float32  # activations it takes


class _Cast(nn.Module):
    """Runs `inner` on activations of `dtype` (the cast is part of the measured time)."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = inner
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.dtype)).float()


def _bf16(linear: nn.Linear) -> nn.Module:
    return _Cast(copy.deepcopy(linear).to(torch.bfloat16), torch.bfloat16)


def _torchao(config_name: str) -> Callable[[nn.Linear], nn.Module] | None:
    try:
        import torchao.quantization as tq  # type: ignore[import-not-found]
    except ImportError:
        return None
    configs: dict[str, Callable[[], object]] = {
        "torchao int8 weight-only": lambda: tq.Int8WeightOnlyConfig(),
        "torchao int8 dynamic": lambda: tq.Int8DynamicActivationInt8WeightConfig(),
        "torchao int4 weight-only": lambda: tq.Int4WeightOnlyConfig(
            group_size=32, int4_packing_format="opaque"
        ),
    }

    def build(linear: nn.Linear) -> nn.Module:
        holder = nn.Sequential(copy.deepcopy(linear).to(torch.bfloat16))
        tq.quantize_(holder, configs[config_name]())
        return _Cast(holder, torch.bfloat16)

    return build


def kernels() -> list[Kernel]:
    found = [
        Kernel("fp32 nn.Linear", lambda linear: linear),
        Kernel("bf16 nn.Linear", _bf16),
        Kernel("bf16 oneDNN pre-packed", BF16Linear.from_linear),
        Kernel("int8 W8A8 _int_mm", Int8Linear.from_linear),
        Kernel("int8 weight-only fp32", WeightOnlyInt8Linear.from_linear),
        Kernel(
            "int8 weight-only bf16",
            lambda linear: _Cast(
                WeightOnlyInt8Linear.from_linear(linear, torch.bfloat16), torch.bfloat16
            ),
        ),
        Kernel("int4 g32 weight-only fp32", Int4Linear.from_linear),
        Kernel(
            "int4 g32 weight-only bf16",
            lambda linear: _Cast(Int4Linear.from_linear(linear, torch.bfloat16), torch.bfloat16),
        ),
    ]
    for name in ("torchao int8 weight-only", "torchao int8 dynamic", "torchao int4 weight-only"):
        build = _torchao(name)
        if build is not None:
            found.append(Kernel(name, build))
    return found


def _time(module: nn.Module, x: torch.Tensor, iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        module(x)
    return (time.perf_counter() - start) / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.02, help="seconds per measurement")
    parser.add_argument("--only", nargs="*", help="kernels whose name contains one of these")
    args = parser.parse_args()

    torch.manual_seed(0)
    linears = {name: nn.Linear(k, n, bias=False) for name, k, n in PRODUCTS}
    for linear in linears.values():
        nn.init.normal_(linear.weight, std=0.02)
    chosen = [k for k in kernels() if not args.only or any(s in k.name for s in args.only)]
    modules: dict[str, dict[str, nn.Module]] = {}
    for kernel in chosen:
        try:
            modules[kernel.name] = {name: kernel.build(lin) for name, lin in linears.items()}
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as error:
            print(f"{kernel.name}: unavailable ({type(error).__name__}: {error})"[:200])
    print(f"torch {torch.__version__}, {torch.cpu.get_capabilities().get('cpu_name')}")

    with torch.inference_mode():
        for threads in args.threads:
            torch.set_num_threads(threads)
            for rows in args.rows:
                xs = {name: torch.randn(rows, k) for name, k, _ in PRODUCTS}
                exact = {name: linears[name](xs[name]) for name in linears}
                errors: dict[str, float] = {}
                iterations: dict[tuple[str, str], int] = {}
                for kname, mods in modules.items():
                    worst = 0.0
                    for name, module in mods.items():
                        out = module(xs[name])
                        ref = exact[name]
                        worst = max(worst, float((out - ref).abs().max() / ref.abs().max()))
                        # Calibrate so one measurement lasts about min_time.
                        single = max(_time(module, xs[name], 3), 1e-6)
                        iterations[kname, name] = max(3, int(args.min_time / single))
                    errors[kname] = worst
                samples: dict[tuple[str, str], list[float]] = {key: [] for key in iterations}
                for _ in range(args.rounds):
                    for name in linears:
                        for kname, mods in modules.items():
                            it = iterations[kname, name]
                            samples[kname, name].append(_time(mods[name], xs[name], it))
                load = os.getloadavg()
                print(
                    f"\nrows {rows}, threads {threads}, load average "
                    f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (ms, median of {args.rounds})"
                )
                header = [name for name, _, _ in PRODUCTS] + ["layer", "step", "rel.err"]
                print(f"{'kernel':28}" + "".join(f"{h:>9}" for h in header))
                for kname in modules:
                    ms = {n: statistics.median(samples[kname, n]) * 1e3 for n in linears}
                    layer = ms["qkv"] + ms["o"] + ms["gate_up"] + ms["down"]
                    step = LAYERS * layer + ms["lm_head"]
                    cells = [ms[n] for n in linears] + [layer, step]
                    print(
                        f"{kname:28}"
                        + "".join(f"{c:9.3f}" for c in cells)
                        + f"{errors[kname]:9.1e}"
                    )


if __name__ == "__main__":
    main()
