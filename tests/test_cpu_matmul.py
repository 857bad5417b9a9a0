"""The few-row products that decoding uses on CPU give the same numbers as a plain matmul."""
import pytest
import torch

from specdec.models.cpu_matmul import SPLIT_MIN_WEIGHTS, FewRowLinear, few_row_product


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16])
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
