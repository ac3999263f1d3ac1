"""The 4-bit products (int4_kernel.c and int4_q8_kernel.c, attention.Int4Product): bf16 rows
times 4-bit weights in groups of 32 (the int4 mode), or the same with the inputs rounded to 8 bits
per group (the w4a8 mode), each output summed alike whatever the number of rows, in both the
vectorized builds and the plain C ones."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from services.worker.engine import quantization
from services.worker.engine.attention import Int4Product, load_int4_product
from services.worker.engine.quantization import INT4_GROUP, Int4Linear, _unpack_nibbles

SOURCES = [
    Path(quantization.__file__).with_name(name) for name in ("int4_kernel.c", "int4_q8_kernel.c")
]
# Row counts that take every block of the kernel: 8, 4, 3, 2 and 1 rows, and their mixtures.
ROW_COUNTS = (1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 19)
# How far from the dequantized float32 product an output may be, as a share of the largest: bf16
# outputs (8 significant bits); 8-bit inputs (each within 1/254 of its group's largest) on top,
# measured within 0.6%.
TOLERANCE = {False: 2**-7, True: 2**-6}


@pytest.fixture(scope="module", params=[False, True], ids=["bf16-inputs", "8-bit-inputs"])
def eight_bit(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture(scope="module")
def native(eight_bit: bool) -> Int4Product:
    built = load_int4_product(eight_bit)
    assert built is not None, "the kernels did not build (is a C compiler on PATH?)"
    return built


@pytest.fixture(scope="module")
def portable_library(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """The plain C builds (no AVX-512), as a CPU without those instructions gets them."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler is not None, "no C compiler on PATH"
    library = tmp_path_factory.mktemp("int4") / "portable.so"
    subprocess.run(
        [compiler, "-O2", "-shared", "-fPIC", "-o", str(library), *map(str, SOURCES), "-lm"],
        check=True,
        capture_output=True,
    )
    return ctypes.CDLL(str(library))


@pytest.fixture(scope="module")
def portable(portable_library: ctypes.CDLL, eight_bit: bool) -> Int4Product:
    kernel = Int4Product(portable_library, eight_bit)
    assert not kernel.vectorized
    return kernel


def layer(in_features: int, out_features: int, seed: int = 0) -> Int4Linear:
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features, bias=False)
    nn.init.normal_(dense.weight, std=0.05)
    return Int4Linear.from_linear(dense)


def laid_out(kernel: Int4Product, int4: Int4Linear) -> torch.Tensor:
    codes, scales_zeros, _ = int4.parts()
    return kernel.layout(_unpack_nibbles(codes), scales_zeros[..., 0].t(), scales_zeros[..., 1].t())


@pytest.mark.parametrize("build", ["native", "portable"])
@pytest.mark.parametrize("shape", [(576, 960), (1536, 576), (64, 48)])
def test_rows_are_the_dequantized_product_and_alike_in_any_batch(
    build: str, shape: tuple[int, int], eight_bit: bool, request: pytest.FixtureRequest
) -> None:
    kernel: Int4Product = request.getfixturevalue(build)
    in_features, out_features = shape
    int4 = layer(in_features, out_features)
    weights = laid_out(kernel, int4)
    x = torch.randn(max(ROW_COUNTS), in_features, generator=torch.Generator().manual_seed(1))
    x = x.bfloat16()
    expected = x.float() @ int4.dequantized().t()
    alone = torch.cat([kernel(x[i : i + 1], weights, out_features) for i in range(len(x))])
    assert alone.dtype == torch.bfloat16 and alone.shape == expected.shape
    error = float((alone.float() - expected).abs().max())
    assert error <= TOLERANCE[eight_bit] * float(expected.abs().max())
    for rows in ROW_COUNTS:
        assert torch.equal(kernel(x[:rows], weights, out_features), alone[:rows]), rows


def test_the_builds_agree(native: Int4Product, portable: Int4Product, eight_bit: bool) -> None:
    """With 8-bit inputs, bit for bit (the same integer sums, then the same float32 formula in
    the same order); with bf16 inputs, to the output rounding (float32 sums in another order)."""
    int4 = layer(576, 192, seed=3)
    x = torch.randn(6, 576, generator=torch.Generator().manual_seed(2)).bfloat16()
    a = native(x, laid_out(native, int4), 192)
    b = portable(x, laid_out(portable, int4), 192)
    if eight_bit:
        assert torch.equal(a, b)
    else:
        assert float((a.float() - b.float()).abs().max()) <= 2**-7 * float(a.abs().max())


def test_shapes_the_layout_cannot_hold_are_refused(native: Int4Product) -> None:
    codes = torch.zeros(24, 64, dtype=torch.uint8)  # 24 outputs: not whole tiles of 16
    scales = torch.ones(24, 2, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="whole groups and tiles"):
        native.layout(codes, scales, scales)


def test_without_a_compiler_int4_layers_take_torchs_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(5)
    dense = nn.Linear(4 * INT4_GROUP, 32, bias=True)
    compiled = Int4Linear.from_linear(dense)
    monkeypatch.setattr(quantization, "load_int4_product", lambda eight_bit_inputs=False: None)
    fallback = Int4Linear.from_linear(dense)
    x = torch.randn(3, 4 * INT4_GROUP, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        a, b = compiled(x), fallback(x)
    assert fallback.weight_packed is not None and fallback._kernel is None
    assert float((a - b).abs().max()) <= 2**-7 * float(a.abs().max())


def test_w4a8_needs_the_compiled_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    dense = nn.Linear(2 * INT4_GROUP, 16, bias=False)
    assert Int4Linear.from_linear(dense, eight_bit_inputs=True).eight_bit_inputs
    monkeypatch.setattr(quantization, "load_int4_product", lambda eight_bit_inputs=False: None)
    with pytest.raises(ValueError, match="w4a8 needs the compiled int4 kernel"):
        Int4Linear.from_linear(dense, eight_bit_inputs=True)
