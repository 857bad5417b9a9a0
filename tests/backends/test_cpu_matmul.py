"""The few-row products that decoding uses on CPU give the same numbers as a plain matmul."""
import pytest
import torch

import shutil

from specdec.kernels import native_matmul
from specdec.backends.compact_decoder import Int8Weight
from specdec.kernels.cpu_matmul import SPLIT_MIN_WEIGHTS, FewRowLinear, _native_product, few_row_product, int8_product


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 13, 16])
def test_few_row_product_matches_matmul(dtype, rows):
    torch.manual_seed(rows)
    # Large enough that one row takes the split matrix-vector path in float32.
    weight = torch.randn(SPLIT_MIN_WEIGHTS // 640 + 7, 640).to(dtype)
    x = torch.randn(rows, 640).to(dtype)
    with torch.inference_mode():
        got = few_row_product(x, weight)
    want = (x.double() @ weight.double().T)
    tolerance = 1e-3 if dtype == torch.float32 else 0.5  # bf16 outputs keep 8 bits of mantissa
    assert got.shape == (rows, weight.shape[0]) and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=tolerance, rtol=1e-2)


def test_split_product_uses_every_core_and_each_row_once(monkeypatch):
    """An output row count that the threads do not divide evenly is still covered exactly."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    weight = torch.randn(SPLIT_MIN_WEIGHTS // 64 + 1, 64)
    x = torch.randn(1, 64)
    with torch.inference_mode():
        got = few_row_product(x, weight)
    torch.testing.assert_close(got, x @ weight.T, atol=1e-4, rtol=1e-4)


def test_few_row_linear_keeps_autograd_when_grad_is_on():
    layer = FewRowLinear(640, SPLIT_MIN_WEIGHTS // 640 + 1)
    x = torch.randn(1, 640, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="no C compiler for the native kernel")


@needs_compiler
def test_native_kernel_builds_where_a_compiler_exists():
    assert native_matmul.library() is not None


@needs_compiler
@pytest.mark.parametrize("rows,out_features,in_features,split", [
    (1, 9, 100, False),  # row and column tails: 9 = 2 blocks of 4 + 1, 100 = 12 vectors of 8 + 4
    (5, 4099, 64, True),  # rows in threes: the last group of two repeats one row, not stored
    (16, 1000, 640, True),
    (4, 9, 603, False),  # column tiles of 256: two full, one of 88, then a scalar tail of 3
    (17, 37, 603, True),  # more rows than one group of accumulators holds (16), then one
])
def test_native_kernel_matches_float64_on_every_tail(monkeypatch, rows, out_features, in_features, split):
    import specdec.kernels.cpu_matmul as cpu_matmul

    monkeypatch.setattr(cpu_matmul, "NATIVE_SPLIT_MIN_BYTES", 0 if split else 1 << 60)
    torch.manual_seed(rows)
    weight, x = torch.randn(out_features, in_features), torch.randn(rows, in_features)
    got = _native_product(native_matmul.library(), x, weight)
    torch.testing.assert_close(got.double(), x.double() @ weight.double().T, atol=1e-4, rtol=1e-4)


def test_native_kernel_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("SPECDEC_NATIVE", "0")
    assert native_matmul._build_and_load() is None


@needs_compiler
@pytest.mark.parametrize("rows,out_features,in_features", [
    (1, 9, 100),  # one-row path: row tail (9 = 2 blocks of 4 + 1), column tail (100 = 6 x 16 + 4)
    (1, 4099, 640),  # split over the threads, an odd block last
    (2, 13, 37),  # few-row path, column tail shorter than a vector
    (7, 1001, 64),
    (16, 130, 2048),
    (17, 37, 603),  # two groups of rows (16 + 1), column tiles and a tail
])
def test_int8_kernel_matches_its_dequantized_weights_on_every_tail(monkeypatch, rows, out_features, in_features):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # blocks the threads do not divide evenly
    torch.manual_seed(rows)
    weight = Int8Weight.quantize(torch.randn(out_features, in_features))
    x = torch.randn(rows, in_features)
    got = int8_product(x, weight.data, weight.scale)
    dequantized = weight.data.double() * weight.scale.double()[:, None]
    torch.testing.assert_close(got.double(), x.double() @ dequantized.T, atol=1e-4, rtol=1e-4)


def test_int8_quantization_rounds_each_weight_to_its_rows_nearest_step():
    torch.manual_seed(0)
    weight = torch.randn(300, 50) * torch.logspace(-3, 2, 300)[:, None]  # rows of very different scales
    weight[7] = 0  # an all-zero row keeps a finite scale
    q = Int8Weight.quantize(weight)
    error = (weight - q.data.float() * q.scale[:, None]).abs()
    assert torch.isfinite(q.scale).all() and q.data.abs().max() <= 127
    assert (error <= q.scale[:, None] / 2 * 1.0001 + 1e-12).all()


def test_int8_product_without_the_native_kernel_uses_pytorchs(monkeypatch):
    monkeypatch.setattr(native_matmul, "library", lambda: None)
    torch.manual_seed(1)
    weight, x = Int8Weight.quantize(torch.randn(64, 96)), torch.randn(3, 96)
    assert int8_product(x, weight.data, weight.scale) is None
    want = x.double() @ (weight.data.double() * weight.scale.double()[:, None]).T
    torch.testing.assert_close(weight.product(x).double(), want, atol=0.1, rtol=0.02)  # bf16 activations there
