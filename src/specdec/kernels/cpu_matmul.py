"""Linear layers that stay memory-bound when decoding or verifying a few positions on CPU.

A decode step reads every weight once; a verify step over k+1 positions should cost about
the same. Several PyTorch CPU paths read the weights slower than the memory allows (measured
on the project's 2-core AMD EPYC with Gemma 3 270M's 262k x 640 head, float32, 671 MB):

- `x @ W.T` for 2-16 rows takes a GEMM path that repacks W first, reading it about twice:
  a 2-position verify cost ~2.2x a 1-position decode (179 ms against 77). `W @ x.T` streams
  W once (36-48 ms for 2-4 rows).
- one row (a plain decode step) goes to a float32 matrix-vector product that runs on one
  core: 58 ms, 11 GB/s. Split across the cores by output rows it takes 33 ms. (bfloat16's
  product already uses both cores: splitting gains nothing there.)
- bfloat16 GEMMs of 2-16 rows on this CPU (AVX2, no native bf16) cost ~3.5x a one-row
  product for 2 rows; a matrix-vector product per row costs 2x.
- float32 products of 6-16 rows read the weights more than once (the head: 4 rows 37-48 ms,
  9 rows 82-97, 12 rows 137-152), so those go to a small C kernel (native/few_rows.c) that
  reads them once (9 rows 61 ms, 16 rows 80). A 13-position verify of the whole model: 307 ->
  201 ms. Matrices of 16 MB and more go to it from 2 rows: on Qwen2.5 1.5B's 151936 x 1536
  head `W @ x.T` took 48-67 ms for 2-5 rows, the kernel 32-37 (one row: 32).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from . import native_matmul

FEW_ROWS = 16  # above this the GEMM's packing pays for itself
# Below this many weights a split costs more in thread hand-off than it saves (~0.1 ms).
SPLIT_MIN_WEIGHTS = 2_000_000
NATIVE_MIN_ROWS = 6  # below this W @ x.T already reads the weights about once
NATIVE_SPLIT_MIN_BYTES = 16 << 20  # thread hand-off here costs ~0.15 ms: only large matrices gain

_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def few_row_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [rows, in] @ weight[out, in].T for the few-row products of decoding, on CPU."""
    rows = x.shape[0]
    # Large matrices go native from 2 rows (split over the cores, one read of the weights);
    # small ones below NATIVE_MIN_ROWS stay with PyTorch's multi-threaded product.
    large = weight.numel() * weight.element_size() >= NATIVE_SPLIT_MIN_BYTES
    if (weight.dtype == torch.float32 and (2 if large else NATIVE_MIN_ROWS) <= rows <= FEW_ROWS
            and weight.is_contiguous() and not torch.is_grad_enabled()):
        kernel = native_matmul.library()
        if kernel is not None:
            return _native_product(kernel, x, weight)
    # The split writes into slices of one output: no autograd through it.
    if (rows == 1 and weight.dtype == torch.float32 and weight.numel() >= SPLIT_MIN_WEIGHTS
            and not torch.is_grad_enabled()):
        return _split_vector_product(weight, x[0])[None]
    if weight.dtype == torch.bfloat16 and rows > 1:
        # One matrix-vector product per row: 2 rows cost 2x one row, the GEMM path 3.5x.
        return torch.stack([torch.mv(weight, row) for row in x])
    return (weight @ x.T).T


def int8_product(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """x [rows, in] @ (data * scale[:, None]).T in float32 for int8 `data` [out, in] and float32
    `scale` [out], by the native kernel (both cores, one read of the int8 weights); None where
    the kernel is unavailable. PyTorch's own int8 kernel (_weight_int8pack_mm) reads them at
    about half the speed from memory (Gemma's 4096 x 640 gate|up: 0.26 ms against ~0.13)."""
    kernel = native_matmul.library()
    if kernel is None or x.device.type != "cpu":
        return None
    rows, (out_features, in_features) = x.shape[0], data.shape
    activations = x.float().contiguous()
    out = torch.empty(rows, out_features, dtype=torch.float32)
    kernel.few_rows_i8_parallel(data.data_ptr(), scale.data_ptr(), activations.data_ptr(), out.data_ptr(),
                                out_features, in_features, rows, torch.get_num_threads())
    return out


def _native_product(kernel, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    rows, (out_features, in_features) = x.shape[0], weight.shape
    activations = x.float().contiguous()
    out = torch.empty(rows, out_features, dtype=torch.float32)
    function = kernel.few_rows_f32
    args = (weight.data_ptr(), activations.data_ptr(), out.data_ptr())
    parts = torch.get_num_threads() if weight.numel() * weight.element_size() >= NATIVE_SPLIT_MIN_BYTES else 1
    if parts < 2:
        function(*args, 0, out_features, in_features, rows, out_features)
    else:
        # Row blocks of 4 per thread; ctypes releases the GIL for the call.
        step = ((out_features + parts - 1) // parts + 3) // 4 * 4
        jobs = [_threads(parts).submit(function, *args, begin, min(begin + step, out_features), in_features, rows,
                                       out_features)
                for begin in range(0, out_features, step)]
        for job in jobs:
            job.result()
    return out


def _split_vector_product(weight: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    parts = torch.get_num_threads()
    if parts < 2:
        return torch.mv(weight, vector)
    out = torch.empty(weight.shape[0], dtype=weight.dtype)
    jobs = [_threads(parts).submit(_vector_product_into, block, vector, out_block)
            for block, out_block in zip(weight.chunk(parts), out.chunk(parts))]
    for job in jobs:
        job.result()
    return out


def _vector_product_into(block: torch.Tensor, vector: torch.Tensor, out: torch.Tensor) -> None:
    with torch.inference_mode():  # grad mode is per thread: the caller's does not carry over
        torch.mv(block, vector, out=out)


def _threads(size: int) -> ThreadPoolExecutor:
    # torch.mv releases the GIL: Python threads give each core its share of the rows.
    global _pool, _pool_size
    if _pool is None or _pool_size != size:
        _pool, _pool_size = ThreadPoolExecutor(size, thread_name_prefix="specdec-mv"), size
    return _pool


class FewRowLinear(nn.Linear):
    """nn.Linear whose small-batch product keeps the weight as the streamed operand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if rows > FEW_ROWS or rows == 0 or x.dtype != self.weight.dtype or x.device.type != "cpu":
            return super().forward(x)
        out = few_row_product(x.reshape(rows, x.shape[-1]), self.weight)  # [rows, out]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.weight.shape[0])


def set_few_row_matmul(model: nn.Module, enabled: bool) -> int:
    """Switch every plain nn.Linear of `model` to (or back from) FewRowLinear, in place.
    Weights are untouched and shared; returns how many layers were switched."""
    source, target = (nn.Linear, FewRowLinear) if enabled else (FewRowLinear, nn.Linear)
    switched = 0
    for module in model.modules():
        if type(module) is source:
            module.__class__ = target
            switched += 1
    return switched
