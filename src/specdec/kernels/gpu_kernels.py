"""Triton kernels for the GPU decode and verify steps (1 to 16 positions of one sequence).

A batch-1 step should cost one read of the weights. Graphs of PyTorch ops kept an 8B Llama
step at 9.5 ms on an H100 against a 4.8 ms floor: the products took ~6.6 ms, and ~800 small
kernels (norms, casts, rotary, transposes, cache writes, a masked attention over the whole
cache capacity) most of the rest. Here a layer is 9 launches:
- `skinny_matmul`: every block takes a strip of 16 weight rows and the whole reduction, so
  every matrix spreads over hundreds of blocks (in a graph: 5.55 ms for all products, 86 % of
  the datasheet rate);
- the residual add fused into the RMS norm; rotary and the cache write in one kernel;
- attention over the live keys only, split across blocks (flash-decoding) and merged by a
  second launch; SiLU gating on its own (fused into the down product's loads, every block
  recomputed the whole vector: 40 us a layer).
Measured: 6.06 ms a step (scripts/gpu_profile.py, docs/benchmarks/gpu-h100-2026-11-24-kernels/).

Every kernel computes each output row from that row's inputs alone, in an order fixed by the
weight shape, never by the number of rows: a verify of k+1 positions gives the logits that
k+1 one-token steps would give, bit for bit.

Without a GPU these kernels run in Triton's interpreter (the tests do that on the CPU).
"""
from __future__ import annotations

import functools
import os

import torch

INTERPRETED = not torch.cuda.is_available()
if INTERPRETED:
    # Triton reads this when it is imported (its own library functions are decorated then).
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:
    import triton
    import triton.language as tl
except ImportError:  # the fused path needs Triton; GraphDecoder falls back without it
    triton = None

MAX_ROWS = 16  # positions per step that these kernels take: the products' BLOCK_M
KEY_CHUNK = 128  # keys per attention block (a flash-decoding split)
KEY_BLOCK = 32  # keys per inner iteration of a split


DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def available() -> bool:
    return triton is not None


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << (n - 1).bit_length())


@functools.cache
def _chained() -> bool:
    """Programmatic dependent launch (Hopper and later; SPECDEC_GPU_PDL=0 turns it off).
    A step is ~290 launches of a few microseconds each; in a CUDA graph each one still
    waits for the previous grid to drain and its own blocks to be placed. With PDL the next
    kernel's blocks are placed while the previous one's last wave runs, and wait on the
    device (gdc_wait) for its results instead."""
    if INTERPRETED or triton is None or os.environ.get("SPECDEC_GPU_PDL") == "0":
        return False
    extra = getattr(getattr(tl, "extra", None), "cuda", None)
    return hasattr(extra, "gdc_wait") and torch.cuda.get_device_capability()[0] >= 9


def _launch_options(warps: int, stages: int | None = None) -> dict:
    options = {"num_warps": warps, "GDC": _chained()}
    if stages is not None:
        options["num_stages"] = stages
    if options["GDC"]:
        options["launch_pdl"] = True
    return options


if triton is not None:

    @triton.jit
    def _after_previous_kernel(GDC: tl.constexpr):
        """Every kernel's first act: wait until the previous kernel's writes are visible,
        then let the next kernel's blocks be placed (they wait here in turn). Waiting
        first keeps the chain transitive: a kernel's results are visible to all later ones."""
        if GDC:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()


# ---- products of a few rows against a large weight -------------------------------------------
if triton is not None:

    @triton.jit
    def _skinny_matmul_kernel(x_ptr, w_ptr, bias_ptr, scale_ptr, y_ptr, M, N, K, stride_x, stride_y,
                              HAS_BIAS: tl.constexpr, SCALED: tl.constexpr, IEEE: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GDC: tl.constexpr):
        # SCALED: w is int8, each of its rows times scale[row] (converted in registers: int8
        # values are exact in every float type, so the sum is the dequantized weight's).
        _after_previous_kernel(GDC)
        rows = tl.arange(0, BLOCK_M)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + ks
            x_mask = (rows[:, None] < M) & (kk[None, :] < K)
            x = tl.load(x_ptr + rows[:, None] * stride_x + kk[None, :], mask=x_mask, other=0.0)
            w = tl.load(w_ptr + cols[:, None] * K + kk[None, :], mask=(cols[:, None] < N) & (kk[None, :] < K),
                        other=0)
            w = tl.trans(w.to(x.dtype))
            if IEEE:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w)
        if SCALED:
            acc *= tl.load(scale_ptr + cols, mask=cols < N, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rows[:, None] < M) & (cols[None, :] < N))


def skinny_config(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, warps, stages) for a weight [n, k]: a function of the shape alone,
    so that the sum over k runs in one order however many rows come. Timed on an H100
    (scripts/gpu_kernels_tune.py): strips of 16 rows, 2 warps, won or tied on every matrix of
    the 8B and 1B Llama shapes except a long, short one (1B down: 2048 x 8192), where 128
    strips leave SMs idle and longer loads per strip do better."""
    if INTERPRETED:  # the interpreter's cost is per program
        return 128, 256, 4, 1
    if k >= 4 * n:
        return 16, 512, 4, 3
    return 16, 256, 2, 4


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [m, k] @ weight[n, k].T (+ bias) -> [m, n] in weight's dtype, m <= MAX_ROWS."""
    m = x.shape[0]
    n, k = weight.shape
    if m > MAX_ROWS or not weight.is_contiguous() or x.stride(-1) != 1:
        raise ValueError(f"skinny_matmul takes at most {MAX_ROWS} rows, contiguous")
    y = torch.empty(m, n, dtype=weight.dtype, device=x.device)
    block_n, block_k, warps, stages = config or skinny_config(n, k)
    _skinny_matmul_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, weight, y, m, n, k, x.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, SCALED=False, IEEE=weight.dtype == torch.float32, BLOCK_M=MAX_ROWS,
        BLOCK_N=block_n, BLOCK_K=block_k, **_launch_options(warps, stages))
    return y


# ---- the same products against int8 weights (a draft's: half the bytes a step reads) ----------
def skinny_matmul_int8(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [m, k] @ (data [n, k] int8 * scale [n, 1]).T -> [m, n] in x's dtype, m <= MAX_ROWS; each
    output row from its own row of x, as skinny_matmul's."""
    m = x.shape[0]
    n, k = data.shape
    if m > MAX_ROWS or not data.is_contiguous() or x.stride(-1) != 1:
        raise ValueError(f"skinny_matmul_int8 takes at most {MAX_ROWS} rows, contiguous")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_n, block_k, warps, stages = skinny_config(n, k)
    _skinny_matmul_kernel[(triton.cdiv(n, block_n),)](
        x, data, data, scale, y, m, n, k, x.stride(0), y.stride(0), HAS_BIAS=False, SCALED=True,
        IEEE=x.dtype == torch.float32, BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k,
        **_launch_options(warps, stages))
    return y


# ---- SiLU gating ------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _silu_mul_kernel(gate_up_ptr, out_ptr, F, BLOCK: tl.constexpr, GDC: tl.constexpr):
        _after_previous_kernel(GDC)
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < F
        gate = tl.load(gate_up_ptr + row * 2 * F + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + row * 2 * F + F + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * F + cols, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[m, 2f] (gate | up) -> silu(gate) * up, [m, f]."""
    rows, f = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, f, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(f, block))](gate_up, out, f, BLOCK=block, **_launch_options(4))
    return out


# ---- residual add and RMS norm ---------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(hidden_ptr, delta_ptr, weight_ptr, out_ptr, D, eps, HAS_DELTA: tl.constexpr,
                             BLOCK: tl.constexpr, GDC: tl.constexpr):
        _after_previous_kernel(GDC)
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        h = tl.load(hidden_ptr + row * D + cols, mask=mask, other=0.0)
        if HAS_DELTA:
            h += tl.load(delta_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(hidden_ptr + row * D + cols, h, mask=mask)
        scale = tl.rsqrt(tl.sum(h * h, axis=0) / D + eps)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
        tl.store(out_ptr + row * D + cols, (h * scale * w).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 dtype: torch.dtype) -> torch.Tensor:
    """hidden += delta (in place, float32), then rms_norm(hidden) * weight in `dtype`."""
    rows, d = hidden.shape
    out = torch.empty(rows, d, dtype=dtype, device=hidden.device)
    _add_rms_norm_kernel[(rows,)](hidden, delta if delta is not None else hidden, weight, out, d, eps,
                                  HAS_DELTA=delta is not None, BLOCK=_pow2(d), **_launch_options(8))
    return out


# ---- rotary, the cache write, and attention over the live keys --------------------------------
if triton is not None:

    @triton.jit
    def _rotated(base, rows_ok, cos_ptr, sin_ptr, angle_rows, D: tl.constexpr):
        """Rows at `base` [R, 1] rotated by the angles of step rows `angle_rows` [R]:
        x * cos + rotate_half(x) * sin, in float32."""
        d = tl.arange(0, D)
        half = D // 2
        x = tl.load(base + d[None, :], mask=rows_ok[:, None], other=0.0).to(tl.float32)
        swapped = tl.load(base + ((d + half) % D)[None, :], mask=rows_ok[:, None], other=0.0).to(tl.float32)
        sign = tl.where(d < half, -1.0, 1.0)[None, :]
        cos = tl.load(cos_ptr + angle_rows[:, None] * D + d[None, :], mask=rows_ok[:, None], other=0.0)
        sin = tl.load(sin_ptr + angle_rows[:, None] * D + d[None, :], mask=rows_ok[:, None], other=0.0)
        return x * cos + sign * swapped * sin

    @triton.jit
    def _write_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, keys_ptr, values_ptr, start_ptr, slot_ptr, stride_qkv, capacity,
                         slot_stride, N: tl.constexpr, POOLED: tl.constexpr, HEADS: tl.constexpr,
                         KV_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, GDC: tl.constexpr):
        """Step row r's keys (rotated) and values of every key/value head into the cache.
        POOLED: row r is position r % N of sequence r // N, whose cache is slot slot_ptr[r // N]
        of the pool; else every row belongs to the one sequence whose cache keys_ptr is."""
        _after_previous_kernel(GDC)
        row = tl.program_id(0)
        if POOLED:
            b = row // N
            i = row % N
            base = tl.load(slot_ptr + b) * slot_stride
        else:
            b = 0
            i = row
            base = 0
        position = tl.load(start_ptr + b) + i
        h = tl.arange(0, BLOCK_H)
        ok = h < KV_HEADS
        d = tl.arange(0, D)
        key = _rotated(qkv_ptr + row * stride_qkv + (HEADS + h)[:, None] * D, ok, cos_ptr, sin_ptr,
                       tl.zeros((BLOCK_H,), tl.int32) + row, D)
        at = base + (h * capacity + position)[:, None] * D + d[None, :]
        tl.store(keys_ptr + at, key.to(keys_ptr.dtype.element_ty), mask=ok[:, None])
        value = tl.load(qkv_ptr + row * stride_qkv + (HEADS + KV_HEADS + h)[:, None] * D + d[None, :],
                        mask=ok[:, None], other=0.0)
        tl.store(values_ptr + at, value, mask=ok[:, None])

    @triton.jit
    def _attend_split_kernel(qkv_ptr, cos_ptr, sin_ptr, keys_ptr, values_ptr, start_ptr, slot_ptr, part_out,
                             part_max, part_sum, stride_qkv, capacity, slot_stride, scale, window,
                             N: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                             BLOCK_R: tl.constexpr, CHUNK: tl.constexpr, KEYS: tl.constexpr, POOLED: tl.constexpr,
                             HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr, GDC: tl.constexpr):
        """One key/value head's query rows of sequence b (row g * N + i: query head g of the
        group at step position i) against keys [split * CHUNK, ...) that some row sees:
        unnormalised output, running max and sum of the split."""
        _after_previous_kernel(GDC)
        h = tl.program_id(0)
        split = tl.program_id(1)
        b = tl.program_id(2)
        start = tl.load(start_ptr + b)
        if POOLED:
            keys_ptr += tl.load(slot_ptr + b) * slot_stride
            values_ptr += tl.load(slot_ptr + b) * slot_stride
        r = tl.arange(0, BLOCK_R)
        rows_ok = r < GROUP * N
        step_row = r % N
        head = h * GROUP + r // N
        position = start + step_row
        q = _rotated(qkv_ptr + (b * N + step_row)[:, None] * stride_qkv + head[:, None] * D, rows_ok, cos_ptr,
                     sin_ptr, b * N + step_row, D).to(keys_ptr.dtype.element_ty)
        d = tl.arange(0, D)
        best = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        total = tl.zeros((BLOCK_R,), tl.float32)
        acc = tl.zeros((BLOCK_R, D), tl.float32)
        lo = split * CHUNK
        hi = tl.minimum(lo + CHUNK, start + N)
        if HAS_WINDOW:  # keys before every row's window: skip the whole split
            lo = tl.where(lo + CHUNK <= start - window + 1, hi, lo)
        for k0 in range(lo, hi, KEYS):
            kp = k0 + tl.arange(0, KEYS)
            live = kp < hi
            at = (h * capacity + kp)[:, None] * D + d[None, :]
            k = tl.load(keys_ptr + at, mask=live[:, None], other=0.0)
            v = tl.load(values_ptr + at, mask=live[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale
            seen = (kp[None, :] <= position[:, None]) & live[None, :] & rows_ok[:, None]
            if HAS_WINDOW:
                seen = seen & (kp[None, :] > position[:, None] - window)
            s = tl.where(seen, s, float("-inf"))
            new_best = tl.maximum(best, tl.max(s, axis=1))
            shift = tl.where(new_best == float("-inf"), 0.0, new_best)
            p = tl.exp(s - shift[:, None])
            decay = tl.exp(best - shift)
            total = total * decay + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * decay[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * decay[:, None] + tl.dot(p.to(v.dtype), v)
            best = new_best
        at = ((b * tl.num_programs(0) + h) * SPLITS + split) * BLOCK_R + r
        tl.store(part_max + at, best)
        tl.store(part_sum + at, total)
        tl.store(part_out + at[:, None] * D + d[None, :], acc)

    @triton.jit
    def _attend_combine_kernel(part_out, part_max, part_sum, out_ptr, start_ptr, stride_out,
                               N: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                               BLOCK_R: tl.constexpr, CHUNK: tl.constexpr, GDC: tl.constexpr):
        """Merge the splits of one key/value head of sequence b into its rows of out
        [B * N, heads * D] (head h * GROUP + g)."""
        _after_previous_kernel(GDC)
        h = tl.program_id(0)
        b = tl.program_id(1)
        first = (b * tl.num_programs(0) + h) * SPLITS  # this head's first split of this sequence
        used = tl.cdiv(tl.load(start_ptr + b) + N, CHUNK)
        r = tl.arange(0, BLOCK_R)
        d = tl.arange(0, D)
        best = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        for split in range(0, used):
            best = tl.maximum(best, tl.load(part_max + (first + split) * BLOCK_R + r))
        shift = tl.where(best == float("-inf"), 0.0, best)
        total = tl.zeros((BLOCK_R,), tl.float32)
        acc = tl.zeros((BLOCK_R, D), tl.float32)
        for split in range(0, used):
            at = (first + split) * BLOCK_R + r
            weight = tl.exp(tl.load(part_max + at) - shift)
            total += weight * tl.load(part_sum + at)
            acc += weight[:, None] * tl.load(part_out + at[:, None] * D + d[None, :])
        out = acc / tl.where(total == 0.0, 1.0, total)[:, None]  # 0 only in padding rows
        rows_ok = r < GROUP * N
        column = (h * GROUP + r // N) * D
        tl.store(out_ptr + (b * N + r % N)[:, None] * stride_out + column[:, None] + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=rows_ok[:, None])


def write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
             start: torch.Tensor, heads: int, kv_heads: int) -> None:
    """Rotate this step's keys and write them and the values at positions start.. of the cache.
    qkv [n, (heads + 2 kv_heads) * d]; cos, sin [n, d] float32; keys, values [kv_heads, capacity, d]."""
    _write_kv(qkv, cos, sin, keys, values, start, None, 1, heads, kv_heads)


def write_kv_batch(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                   values: torch.Tensor, starts: torch.Tensor, slots: torch.Tensor, n: int, heads: int,
                   kv_heads: int) -> None:
    """write_kv for a batch of sequences, n rows each (row b * n + i: position starts[b] + i of
    sequence b). keys, values: a pool [slots, kv_heads, capacity, d]; sequence b's cache is
    keys[slots[b]]. A graph captured over it serves any sequences: only the indices change."""
    _write_kv(qkv, cos, sin, keys, values, starts, slots, n, heads, kv_heads)


def _write_kv(qkv, cos, sin, keys, values, starts, slots, n, heads, kv_heads) -> None:
    d, capacity = keys.shape[-1], keys.shape[-2]
    pooled = slots is not None
    _write_kv_kernel[(qkv.shape[0],)](
        qkv, cos, sin, keys, values, starts, slots if pooled else starts, qkv.stride(0), capacity,
        keys.stride(0) if pooled else 0, N=n, POOLED=pooled, HEADS=heads, KV_HEADS=kv_heads,
        BLOCK_H=_pow2(kv_heads, 1), D=d, **_launch_options(4))


def attend(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
           start: torch.Tensor, heads: int, scale: float, window: int | None) -> torch.Tensor:
    """Causal attention of this step's rotated queries over the cache (after write_kv) ->
    [n, heads * d] in the cache's dtype. Reads only keys up to the step's last position."""
    return _attend(qkv, cos, sin, keys, values, start, None, qkv.shape[0], heads, scale, window)


def attend_batch(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, starts: torch.Tensor, slots: torch.Tensor, n: int, heads: int, scale: float,
                 window: int | None) -> torch.Tensor:
    """attend for a batch of sequences over a pool (after write_kv_batch): each sequence's n
    rows attend over its own slot's cache up to their own positions -> [B * n, heads * d]."""
    return _attend(qkv, cos, sin, keys, values, starts, slots, n, heads, scale, window)


def _attend(qkv, cos, sin, keys, values, starts, slots, n, heads, scale, window) -> torch.Tensor:
    kv_heads, capacity, d = keys.shape[-3:]
    pooled = slots is not None
    sequences = qkv.shape[0] // n
    group = heads // kv_heads
    splits = triton.cdiv(capacity, KEY_CHUNK)
    block_r = _pow2(group * n)
    part_out = torch.empty(sequences, kv_heads, splits, block_r, d, dtype=torch.float32, device=qkv.device)
    part_max = torch.empty(sequences, kv_heads, splits, block_r, dtype=torch.float32, device=qkv.device)
    part_sum = torch.empty_like(part_max)
    warps = 4 if block_r <= 32 else 8
    _attend_split_kernel[(kv_heads, splits, sequences)](
        qkv, cos, sin, keys, values, starts, slots if pooled else starts, part_out, part_max, part_sum,
        qkv.stride(0), capacity, keys.stride(0) if pooled else 0, scale, window or 0, N=n, GROUP=group, D=d,
        SPLITS=splits, BLOCK_R=block_r, CHUNK=KEY_CHUNK, KEYS=KEY_BLOCK, POOLED=pooled,
        HAS_WINDOW=window is not None, IEEE=keys.dtype == torch.float32, **_launch_options(warps))
    out = torch.empty(qkv.shape[0], heads * d, dtype=keys.dtype, device=qkv.device)
    _attend_combine_kernel[(kv_heads, sequences)](part_out, part_max, part_sum, out, starts, out.stride(0), N=n,
                                                  GROUP=group, D=d, SPLITS=splits, BLOCK_R=block_r,
                                                  CHUNK=KEY_CHUNK, **_launch_options(warps))
    return out
