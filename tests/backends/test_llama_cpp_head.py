"""The split head: llama.cpp runs the model without its output head, our Q8_0 product computes
the logits of every verified position in one pass (backends/llama_cpp_head.py, native/q8_0_head.c)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from specdec.backends import llama_cpp_head, llama_cpp_split

from specdec.kernels import native_matmul

library = native_matmul.library()
needs_kernel = pytest.mark.skipif(library is None or not library.q8_0_head_vectorized(),
                                  reason="the native Q8_0 head product is not built here")


def q8_0_matrix(rows: int, hidden: int, seed: int = 0) -> np.ndarray:
    """A random Q8_0 matrix in GGUF's layout: per 32 values, a float16 scale then 32 int8s."""
    rng = np.random.default_rng(seed)
    blocks = np.empty((rows, hidden // 32, 34), np.uint8)
    scales = rng.uniform(1e-3, 2e-2, (rows, hidden // 32)).astype(np.float16)
    blocks[:, :, :2] = scales[..., None].view(np.uint8).reshape(rows, hidden // 32, 2)
    blocks[:, :, 2:] = rng.integers(-128, 128, (rows, hidden // 32, 32)).astype(np.int8).view(np.uint8)
    return blocks


def reference_head(blocks: np.ndarray, x: np.ndarray) -> np.ndarray:
    """llama.cpp's arithmetic, written out: activations to Q8_0 (float16 scale, round half to
    even), exact integer block dots, scaled by the product of the two scales."""
    rows, nb, _ = blocks.shape
    w_scale = np.ascontiguousarray(blocks[:, :, :2]).view(np.float16)[..., 0].astype(np.float64)
    w = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).astype(np.int64)
    xb = x.reshape(len(x), nb, 32).astype(np.float32)
    amax = np.abs(xb).max(-1)
    x_scale = (amax / np.float32(127)).astype(np.float16).astype(np.float64)
    inverse = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.rint(xb * inverse[..., None]).astype(np.int64)
    dots = np.einsum("rbj,cbj->crb", w, xq)
    return (dots * w_scale[None] * x_scale[:, None, :]).sum(-1)


def run_head(blocks: np.ndarray, x: np.ndarray, threads: int = 2) -> tuple[int, np.ndarray]:
    rows, nb, _ = blocks.shape
    y = np.full((len(x), rows), np.nan, np.float32)
    code = library.q8_0_head(blocks.ctypes.data, rows, nb * 32, x.ctypes.data, len(x), y.ctypes.data, threads)
    return code, y


@needs_kernel
def test_q8_0_head_refuses_shapes_it_does_not_take():
    blocks = q8_0_matrix(4, 64)
    assert run_head(blocks, np.zeros((65, 64), np.float32))[0] == -1  # more positions than it holds
    x = np.zeros((1, 48), np.float32)
    y = np.zeros((1, 4), np.float32)
    assert library.q8_0_head(blocks.ctypes.data, 4, 48, x.ctypes.data, 1, y.ctypes.data, 1) == -1  # K % 32


needs_repacked = pytest.mark.skipif(library is None or not library.q8_0_head_repacked_available(),
                                    reason="the repacked Q8_0 head product (AVX-512 VNNI) is not built here")


def run_repacked(blocks: np.ndarray, x: np.ndarray, threads: int = 2) -> tuple[int, np.ndarray]:
    rows, nb, _ = blocks.shape
    weights, scales = np.empty((rows, nb * 32), np.uint8), np.empty((rows, nb), np.uint16)
    assert library.q8_0_repack(blocks.ctypes.data, rows, nb * 32, weights.ctypes.data, scales.ctypes.data, threads) == 0
    y = np.full((len(x), rows), np.nan, np.float32)
    code = library.q8_0_head_repacked(weights.ctypes.data, scales.ctypes.data, rows, nb * 32, x.ctypes.data, len(x),
                                      y.ctypes.data, threads)
    return code, y


@pytest.mark.parametrize("product", [pytest.param(run_head, id="gguf-layout", marks=needs_kernel),
                                     pytest.param(run_repacked, id="repacked", marks=needs_repacked)])
@pytest.mark.parametrize("positions", [1, 2, 3, 4, 5, 8, 9, 17])
@pytest.mark.parametrize("rows", [1, 7, 256])
@pytest.mark.parametrize("hidden", [128, 640])  # repacked: 4 blocks; 20, a full group of 16 and a part of one
def test_q8_0_head_equals_llama_cpp_arithmetic(product, positions, rows, hidden):
    blocks = q8_0_matrix(rows, hidden, seed=rows)
    x = (np.random.default_rng(positions).standard_normal((positions, hidden)) * 4).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block: scale 0, no division by it
    code, y = product(blocks, x)
    assert code == 0
    expected = reference_head(blocks, x)
    # every row and position written, each within float32 rounding of the sums
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@needs_repacked
def test_repacked_q8_0_head_gives_each_position_what_it_gives_it_alone():
    """A verify's row must equal a plain step's at that position, bit for bit, whatever the
    number of positions beside it and the threads (greedy speculation equals plain decoding)."""
    blocks = q8_0_matrix(300, 640, seed=3)
    x = (np.random.default_rng(3).standard_normal((9, 640)) * 4).astype(np.float32)
    together = run_repacked(blocks, x)[1]
    for i in range(len(x)):
        assert np.array_equal(run_repacked(blocks, x[i : i + 1], threads=1)[1][0], together[i])


@needs_repacked
def test_repacked_q8_0_head_refuses_shapes_it_does_not_take():
    blocks = q8_0_matrix(4, 96)  # 3 blocks: they go in pairs
    out = np.zeros((4, 96), np.uint8), np.zeros((4, 3), np.uint16)
    assert library.q8_0_repack(blocks.ctypes.data, 4, 96, out[0].ctypes.data, out[1].ctypes.data, 1) == -1
    x, y = np.zeros((1, 96), np.float32), np.zeros((1, 4), np.float32)
    assert library.q8_0_head_repacked(out[0].ctypes.data, out[1].ctypes.data, 4, 96, x.ctypes.data, 1,
                                      y.ctypes.data, 1) == -1
    assert run_repacked(q8_0_matrix(4, 64), np.zeros((65, 64), np.float32))[0] == -1  # more positions than it holds


def q6_k_matrix(rows: int, hidden: int, seed: int = 0) -> np.ndarray:
    """A random Q6_K matrix in GGUF's layout: per 256 values, 128 bytes of low nibbles, 64 of
    high bit pairs, 16 int8 scales and a float16 scale (210 bytes)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows, hidden // 256, 210), dtype=np.uint8)
    blocks[:, :, 192:208] = rng.integers(-128, 128, (rows, hidden // 256, 16)).astype(np.int8).view(np.uint8)
    scales = rng.uniform(1e-3, 2e-2, (rows, hidden // 256)).astype(np.float16)
    blocks[:, :, 208:] = scales[..., None].view(np.uint8).reshape(rows, hidden // 256, 2)
    return blocks


def reference_q6_k_head(blocks: np.ndarray, x: np.ndarray) -> np.ndarray:
    """llama.cpp's arithmetic for a Q6_K head, written out: activations to Q8_K (per 256,
    -127 / the value of largest magnitude, round half to even, at most 127), weights from
    gguf's own dequantization, an exact dot per super-block, scaled by both scales."""
    import gguf

    rows, nb, _ = blocks.shape
    weights = gguf.dequantize(blocks.reshape(rows, -1), gguf.GGMLQuantizationType.Q6_K).astype(np.float64)
    xb = x.reshape(len(x), nb, 256).astype(np.float32)
    largest = np.take_along_axis(xb, np.abs(xb).argmax(-1)[..., None], -1)[..., 0]
    iscale = np.where(largest != 0, np.float32(-127) / np.where(largest != 0, largest, 1), 0).astype(np.float32)
    xq = np.minimum(np.rint(xb * iscale[..., None]), 127)
    x_scale = np.where(iscale != 0, np.float32(1) / np.where(iscale != 0, iscale, 1), 0).astype(np.float32)
    return np.einsum("rk,ck->cr", weights, (xq * x_scale[..., None].astype(np.float64)).reshape(len(x), -1))


needs_q6_k = pytest.mark.skipif(library is None or not library.q6_k_head_vectorized(),
                                reason="the native Q6_K head product is not built here")


@needs_q6_k
@pytest.mark.parametrize("positions", [1, 2, 5, 9])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_q6_k_head_equals_llama_cpp_arithmetic(positions, rows):
    blocks = q6_k_matrix(rows, 512, seed=rows)
    x = (np.random.default_rng(positions).standard_normal((positions, 512)) * 4).astype(np.float32)
    x[0, :256] = 0.0  # an all-zero super-block: scale 0, no division by it
    y = np.full((positions, rows), np.nan, np.float32)
    assert library.q6_k_head(blocks.ctypes.data, rows, 512, x.ctypes.data, positions, y.ctypes.data, 2) == 0
    expected = reference_q6_k_head(blocks, x)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@needs_q6_k
def test_q6_k_head_refuses_shapes_it_does_not_take():
    blocks = q6_k_matrix(4, 256)
    x, y = np.zeros((65, 256), np.float32), np.zeros((65, 4), np.float32)
    assert library.q6_k_head(blocks.ctypes.data, 4, 256, x.ctypes.data, 65, y.ctypes.data, 1) == -1
    assert library.q6_k_head(blocks.ctypes.data, 4, 128, x.ctypes.data, 1, y.ctypes.data, 1) == -1  # K % 256


# ---- on the real embedded GGUF ------------------------------------------------------------
llama_cpp = pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    from specdec.loading.registry import REGISTRY

    return REGISTRY["gemma-3-270m"].locate()


@pytest.fixture(scope="module")
def split(gguf_path):
    head = llama_cpp_split.split_head_for(gguf_path)
    if head is None:
        pytest.skip("no split head here (native kernel or check)")
    return head


@pytest.mark.slow
@needs_kernel
def test_split_logits_equal_llama_cpp_own_head_at_every_verified_position(gguf_path, split):
    from specdec.backends.llama_cpp_backend import LlamaCppCausalLM

    ids = torch.tensor([2, 818, 5279, 529, 7001, 563, 506, 1494, 236761, 108, 2094, 5588, 236787])
    logits = []
    for head in (False, split):
        model = LlamaCppCausalLM(gguf_path, n_ctx=256, max_sequences=1, split_head=head)
        assert model.split_head is bool(head)
        cache = model.new_cache()
        model.prefill(ids[:6], cache)
        logits.append(model.forward(ids[6:], cache, 5).clone())  # a verify: logits at 5 positions
        model.release(cache)
        del model
    own, ours = logits
    assert own.shape == ours.shape == (5, split.vocab_size)
    # Same arithmetic as llama.cpp's AVX2 Q8_0 kernel; other CPUs' ggml kernels sum in another order.
    assert float((own - ours).abs().max()) <= llama_cpp_head.CHECK_TOLERANCE * float(own.abs().max())
    assert torch.equal(own.argmax(-1), ours.argmax(-1))


@pytest.mark.slow
@needs_kernel
def test_split_check_fails_on_a_wrong_input_scale(split):
    """The check is what lets an architecture use the split; it must see a wrong input."""
    from dataclasses import replace

    wrong = replace(split, input_scale=1.0)
    result = llama_cpp_split.check(wrong)
    assert not result["passed"]
    assert llama_cpp_split.check(split)["passed"]


@pytest.mark.slow
@needs_kernel
def test_split_record_is_checked_again_for_another_product_and_rederived_without_its_body(split, tmp_path,
                                                                                          monkeypatch):
    """A record checked with another product (an older kernel, another CPU's) is checked anew;
    a record whose body file is gone is derived again. One derivation serves both (each is ~13 s)."""
    import json

    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path))
    head = llama_cpp_split.split_head_for(split.source)
    assert head is not None and head.body.is_file() and str(head.body).startswith(str(tmp_path))
    record_file = head.body.with_name("split.json")
    record = json.loads(record_file.read_text())
    assert record["check"]["kernel"] == head.kernel and record["check"]["passed"]
    record["check"] = {"kernel": "another product", "passed": True}
    record_file.write_text(json.dumps(record))
    assert llama_cpp_split.split_head_for(split.source) is not None
    again = json.loads(record_file.read_text())["check"]
    assert again["kernel"] == head.kernel and "max_abs_difference" in again

    head.body.unlink()
    rederived = llama_cpp_split.split_head_for(split.source)
    assert rederived is not None and rederived.body.is_file()
    assert rederived.eos_token_ids == split.eos_token_ids


def test_split_head_can_be_turned_off(gguf_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_LLAMA_CPP_HEAD", "0")
    assert llama_cpp_split.split_head_for(gguf_path) is None


def test_split_is_refused_for_a_head_it_has_no_product_for(tmp_path):
    """A GGUF whose head is another type keeps llama.cpp's own head, and says why."""
    import gguf

    source = tmp_path / "f32-head.gguf"
    writer = gguf.GGUFWriter(source, "llama")
    writer.add_embedding_length(64)
    writer.add_tensor("token_embd.weight", np.zeros((100, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    record = llama_cpp_head.derive(source, tmp_path / "derived")
    assert record["usable"] is False and "F32" in record["reason"] and "Q6_K" in record["reason"]
    assert not (tmp_path / "derived" / "body.gguf").exists()
