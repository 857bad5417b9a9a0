"""The GPU path's Triton kernels compute what the PyTorch ops of the static-cache decoder
compute, and each output row depends on its own inputs alone (a verify of n positions gives
the logits of n one-position steps).

On CUDA they run compiled, in bfloat16; without a GPU in Triton's interpreter, in float32
(the interpreter's bfloat16 products are wrong, so CPU runs check the logic, the GPU script
the bfloat16 numerics). Skipped where Triton is not installed."""
from __future__ import annotations

import math

import pytest
import torch

from specdec.kernels import gpu_kernels

pytestmark = pytest.mark.skipif(not gpu_kernels.available(), reason="needs Triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
TOLERANCE = 1e-2 if CUDA else 1e-5  # relative error: bf16 operands against a float32 reference


def _randn(*shape, seed: int, dtype=DTYPE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(dtype).to(DEVICE)


def _same_row(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit on the GPU. The interpreter's products go through numpy's BLAS, whose
    rounding depends on a row's place in the block: there, equal to float32 rounding."""
    return torch.equal(a, b) if CUDA else torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("rows,n,k", [(1, 48, 64), (5, 40, 96), (16, 64, 256), (3, 33, 300), (2, 80, 512)])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_matmul_matches_a_float64_product(rows, n, k, bias):
    x, w = _randn(rows, k, seed=rows), _randn(n, k, seed=n)
    b = _randn(n, seed=k) if bias else None
    out = gpu_kernels.skinny_matmul(x, w, b)
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    assert out.shape == (rows, n) and out.dtype == DTYPE
    assert _relative_error(out, ref) < TOLERANCE


def test_silu_mul_gates_the_up_half_by_the_silu_of_the_gate_half():
    gate_up = _randn(3, 2 * 1500, seed=1)  # more than one block of columns, and a partial one
    gate, up = gate_up.double().chunk(2, dim=-1)
    assert _relative_error(gpu_kernels.silu_mul(gate_up), torch.nn.functional.silu(gate) * up) < TOLERANCE / 2


def test_skinny_matmul_rows_do_not_depend_on_how_many_rows_come():
    x, w = _randn(9, 256, seed=3), _randn(96, 256, seed=4)
    together = gpu_kernels.skinny_matmul(x, w)
    for i in range(9):
        assert _same_row(gpu_kernels.skinny_matmul(x[i : i + 1], w)[0], together[i])


@pytest.mark.parametrize("rows,n,k", [(1, 48, 64), (5, 40, 96), (16, 64, 256), (3, 33, 300)])
def test_skinny_matmul_int8_matches_the_dequantized_product_and_keeps_rows_apart(rows, n, k):
    from specdec.backends.layers import Int8Weight

    x, weight = _randn(rows, k, seed=rows), Int8Weight.quantize(_randn(n, k, seed=n, dtype=torch.float32))
    out = gpu_kernels.skinny_matmul_int8(x, weight.data, weight.scale)
    ref = x.double() @ (weight.data.double() * weight.scale.double()[:, None]).T
    assert out.shape == (rows, n) and out.dtype == DTYPE
    assert _relative_error(out, ref) < TOLERANCE
    for i in range(rows):
        assert _same_row(gpu_kernels.skinny_matmul_int8(x[i : i + 1], weight.data, weight.scale)[0], out[i])


def test_add_rms_norm_adds_in_place_and_normalises():
    hidden = _randn(3, 100, seed=5, dtype=torch.float32)
    delta, weight = _randn(3, 100, seed=6), _randn(100, seed=7, dtype=torch.float32)
    expected_hidden = hidden + delta.float()
    out = gpu_kernels.add_rms_norm(hidden, delta, weight, 1e-6, DTYPE)
    assert torch.allclose(hidden, expected_hidden)
    ref = torch.nn.functional.rms_norm(expected_hidden.double(), (100,), weight.double(), 1e-6)
    assert out.dtype == DTYPE and _relative_error(out, ref) < TOLERANCE / 2
    untouched = hidden.clone()
    gpu_kernels.add_rms_norm(hidden, None, weight, 1e-6, DTYPE)
    assert torch.equal(hidden, untouched)


def _rotary(positions: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = positions.float()[:, None] * inv_freq[None]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(DEVICE), angles.sin().to(DEVICE)


def _rotated_queries_and_keys(qkv, cos, sin, heads, kv_heads):
    """The step's queries and keys rotated in float32, as the decoder rotates, rounded to DTYPE."""
    n, d = qkv.shape[0], cos.shape[-1]
    q, k, _ = qkv.float().view(n, heads + 2 * kv_heads, d).split([heads, kv_heads, kv_heads], dim=1)

    def rotate(x):
        half = d // 2
        return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[:, None]

    return rotate(q).to(DTYPE), rotate(k).to(DTYPE)


@pytest.mark.parametrize("n,start,window", [(1, 0, None), (1, 150, None), (5, 200, None), (16, 130, None),
                                            (4, 250, 40), (3, 290, None)])
def test_write_kv_then_attend_matches_causal_attention_over_the_cache(n, start, window):
    heads, kv_heads, d, capacity = 8, 2, 16, 300
    qkv = _randn(n, (heads + 2 * kv_heads) * d, seed=n + start)
    keys, values = _randn(kv_heads, capacity, d, seed=1), _randn(kv_heads, capacity, d, seed=2)
    cos, sin = _rotary(torch.arange(start, start + n), d)
    begin = torch.tensor(start, device=DEVICE)
    gpu_kernels.write_kv(qkv, cos, sin, keys, values, begin, heads, kv_heads)
    out = gpu_kernels.attend(qkv, cos, sin, keys, values, begin, heads, 1 / math.sqrt(d), window)

    q, k = _rotated_queries_and_keys(qkv, cos, sin, heads, kv_heads)
    v = qkv.view(n, heads + 2 * kv_heads, d)[:, heads + kv_heads :]
    # rotated keys at their positions (a GPU may fuse the rotation's multiply-add: 1 bf16 ulp)
    assert torch.allclose(keys[:, start : start + n], k.transpose(0, 1), rtol=8e-3 if CUDA else 0, atol=1e-6)
    assert torch.equal(values[:, start : start + n], v.transpose(0, 1))
    group = heads // kv_heads
    cache_k = keys[:, : start + n].double().repeat_interleave(group, 0)
    cache_v = values[:, : start + n].double().repeat_interleave(group, 0)
    scores = torch.einsum("nhd,hkd->hnk", q.double(), cache_k) / math.sqrt(d)
    key_pos, query_pos = torch.arange(start + n, device=DEVICE), torch.arange(start, start + n, device=DEVICE)
    seen = key_pos[None] <= query_pos[:, None]
    if window is not None:
        seen &= key_pos[None] > query_pos[:, None] - window
    ref = torch.einsum("hnk,hkd->nhd", scores.masked_fill(~seen, -math.inf).softmax(-1), cache_v)
    assert _relative_error(out, ref.reshape(n, heads * d)) < TOLERANCE


def test_attention_rows_equal_one_position_steps():
    """A verify's rows attend as the steps that decode those positions one at a time would."""
    heads, kv_heads, d, capacity, start, n = 8, 2, 16, 400, 260, 6
    qkv = _randn(n, (heads + 2 * kv_heads) * d, seed=9)
    keys, values = _randn(kv_heads, capacity, d, seed=3), _randn(kv_heads, capacity, d, seed=4)
    cos, sin = _rotary(torch.arange(start, start + n), d)
    gpu_kernels.write_kv(qkv, cos, sin, keys, values, torch.tensor(start, device=DEVICE), heads, kv_heads)
    together = gpu_kernels.attend(qkv, cos, sin, keys, values, torch.tensor(start, device=DEVICE), heads,
                                  0.25, None)
    for i in range(n):
        alone = gpu_kernels.attend(qkv[i : i + 1], cos[i : i + 1], sin[i : i + 1], keys, values,
                                   torch.tensor(start + i, device=DEVICE), heads, 0.25, None)
        assert _same_row(alone[0], together[i]), i
