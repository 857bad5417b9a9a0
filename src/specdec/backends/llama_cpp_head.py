"""The output head of a llama.cpp model, run here instead of in llama.cpp, for every position at once.

llama.cpp multiplies the output head once per position that wants logits. A verify wants them at
every drafted position, and Gemma 3 270M's Q8_0 head (262144 x 640, 178 MB of the 253 MB file)
then dominates: on a 2-core EPYC, 7.2 ms a position against 4 ms for the rest of a step, so
verifying five positions cost 43 ms, four plain steps. Our product (native/q8_0_head.c) reads
the head once for all positions: 6.4 ms for one, 10.5 ms for five. Where the CPU has AVX-512
VNNI the head is repacked at load (weights and scales apart, in huge pages) for a product near
memory speed: 4.4 ms for one position, 5.3 for four (178 MB more memory per process).

To stop llama.cpp computing its head, it runs a *body* model derived once from the GGUF: the
same metadata and layers, no tokenizer, and an identity output matrix, so its "logits" are the
final-norm hidden states. It is fed input embeddings, which we look up from the GGUF's token
embedding (times the architecture's input scale, which llama.cpp applies only to token input).
The head's blocks are read from the original file, memory-mapped. Q8_0 heads (Gemma's) and
Q6_K heads (what llama.cpp's Q4_K_M files give Qwen2.5 and Llama; native/q6_k_head.c) are taken.
On Qwen2.5-Coder-1.5B (a 151936 x 1536 Q6_K head, 191 MB) our product costs 5.7-6.6 ms for one
position and 11.3 for five (2 threads), and a verify of 5 positions went from 115-117 ms to
102-103 (1 position: level, 32-39 ms against 33-36); its logits equal llama.cpp's exactly.

Use is decided once per GGUF, by a check against llama.cpp's own logits on a probe sequence
(recorded in the derived directory): another head type, an architecture whose input scale is
not known here, or any mismatch (a final soft-cap, say) keeps llama.cpp's own head.
SPECDEC_LLAMA_CPP_HEAD=0 turns it off.
"""
from __future__ import annotations

import functools
import json
import logging
import mmap
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..kernels import native_matmul
from ..loading.cache_dir import content_digest

log = logging.getLogger("specdec")

Q8_0, Q6_K = 8, 14  # ggml_type
BLOCK_BYTES, BLOCK_VALUES = 34, 32  # Q8_0's
# head type -> (values per block, bytes per block, the native product's name)
HEAD_TYPES = {Q8_0: (32, 34, "q8_0_head"), Q6_K: (256, 210, "q6_k_head")}
FORMAT = 2  # of the derived directory; bump when what it holds changes (2: Q6_K heads)

# What the architecture multiplies token embeddings by before the first layer (llama.cpp's graph
# applies it to token input only, so embedding input must carry it). Others are not split.
_INPUT_SCALE = {"gemma": "sqrt", "gemma2": "sqrt", "gemma3": "sqrt", "llama": 1.0, "mistral": 1.0, "qwen2": 1.0,
                "qwen3": 1.0, "phi3": 1.0}
# The check's bar: logits within this fraction of their largest magnitude, and the same argmax.
CHECK_TOLERANCE = 1e-4
MAX_POSITIONS = 64  # rows per call of the native product (native/q8_0_head.c)


@dataclass
class SplitHead:
    """A GGUF's body model and the head product that completes it."""

    source: Path
    body: Path
    hidden: int
    vocab_size: int
    head_offset: int
    embed_offset: int
    embed_type: int
    head_type: int
    input_scale: float
    eos_token_ids: tuple[int, ...]
    _mapped: np.ndarray = field(init=False, repr=False)
    _head: np.ndarray = field(init=False, repr=False)
    _embed_blocks: np.ndarray | None = field(init=False, repr=False, default=None)  # Q8_0: [vocab, blocks, 34]
    _library: Any = field(init=False, repr=False)
    _repacked: tuple[np.ndarray, np.ndarray] | None = field(init=False, repr=False, default=None)  # kept alive

    def __post_init__(self) -> None:
        self._mapped = np.memmap(self.source, dtype=np.uint8, mode="r")
        values, block_bytes, product = HEAD_TYPES[self.head_type]
        row_bytes = self.hidden // values * block_bytes
        self._head = self._mapped[self.head_offset : self.head_offset + self.vocab_size * row_bytes]
        if self.embed_type == Q8_0:
            table = self._mapped[self.embed_offset : self.embed_offset + self.vocab_size * self.hidden // 32 * 34]
            self._embed_blocks = table.reshape(self.vocab_size, -1, BLOCK_BYTES)
        self._library = native_matmul.library()
        if self.head_type == Q8_0 and self._library.q8_0_head_repacked_available() and self.hidden % 64 == 0:
            self._repacked = weights, scales = _repacked_q8_0(self._library, self._head, self.vocab_size, self.hidden)
            product = functools.partial(self._library.q8_0_head_repacked, weights.ctypes.data, scales.ctypes.data)
        else:
            product = functools.partial(getattr(self._library, product), self._head.ctypes.data)
        # (hidden rows, count, logits out, threads) -> 0, or the product's refusal code
        self._multiply = functools.partial(product, self.vocab_size, self.hidden)

    @property
    def kernel(self) -> str:
        """Which product computes the logits (the split check is kept per kernel)."""
        return "q8_0_head_repacked" if self._repacked is not None else HEAD_TYPES[self.head_type][2]

    def embed(self, token_ids: list[int]) -> np.ndarray:
        """Input embeddings [n, hidden], float32, as llama.cpp's own lookup and input scale give them."""
        ids = np.asarray(token_ids, dtype=np.int64)
        if self.embed_type == Q8_0:
            blocks = self._embed_blocks[ids]
            scales = np.ascontiguousarray(blocks[:, :, :2]).view(np.float16).astype(np.float32)
            values = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).astype(np.float32)
            rows = (values * scales).reshape(len(ids), self.hidden)
        else:
            rows = _dequantized_rows(self._mapped, self.embed_offset, self.embed_type, self.vocab_size, self.hidden, ids)
        return rows * np.float32(self.input_scale) if self.input_scale != 1.0 else rows

    def head_rows(self, token_ids: list[int]) -> np.ndarray:
        """The head's rows [n, hidden] of these tokens, float32."""
        ids = np.asarray(token_ids, dtype=np.int64)
        return _dequantized_rows(self._mapped, self.head_offset, self.head_type, self.vocab_size, self.hidden, ids)

    def logits(self, hidden: np.ndarray, threads: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [n, vocab] for final-norm hidden states [n, hidden] (float32, contiguous)."""
        n = hidden.shape[0]
        if n == 0:
            return torch.empty(0, self.vocab_size)
        if out is None or out.shape[0] < n:
            out = torch.empty(n, self.vocab_size, dtype=torch.float32)
        hidden = np.ascontiguousarray(hidden, dtype=np.float32)
        for start in range(0, n, MAX_POSITIONS):  # a batch of sequences can bring more positions
            count = min(MAX_POSITIONS, n - start)
            result = self._multiply(hidden[start:].ctypes.data, count, out[start].data_ptr(), threads)
            if result != 0:
                raise RuntimeError(f"the head product refused {count} positions of {self.hidden} (code {result})")
        return out[:n]


def _repacked_q8_0(library: Any, head: np.ndarray, rows: int, hidden: int) -> tuple[np.ndarray, np.ndarray]:
    """The head's weights as unsigned bytes [rows, hidden] and its float16 scales [rows, hidden / 32]
    (native/q8_0_head.c), in anonymous memory that asks for huge pages: streaming the head
    through 4 kB pages of the file mapping cost ~20 % more than through 2 MB ones."""
    weights = _huge_page_array((rows, hidden), np.uint8)
    scales = _huge_page_array((rows, hidden // BLOCK_VALUES), np.uint16)
    code = library.q8_0_repack(head.ctypes.data, rows, hidden, weights.ctypes.data, scales.ctypes.data,
                               os.cpu_count() or 1)
    if code != 0:
        raise RuntimeError(f"repacking the Q8_0 head failed (code {code})")
    return weights, scales


def _huge_page_array(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        memory.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(memory, dtype=dtype).reshape(shape)  # the array keeps the mapping alive


# ---- derivation ------------------------------------------------------------------------------
def source_key(path: Path) -> str:
    return f"{FORMAT}-{content_digest(path)}"


def read_record(path: Path) -> dict[str, Any] | None:
    """The directory's record, or None where it is missing, damaged or of another format."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        return None
    if record.get("usable") and not (path.parent / "body.gguf").is_file():
        return None
    return record


def write_record(path: Path, record: dict[str, Any]) -> None:
    staging = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(record, indent=1))
    os.replace(staging, path)


def from_record(source: Path, directory: Path, record: dict[str, Any]) -> SplitHead:
    return SplitHead(source=source, body=directory / "body.gguf", hidden=record["hidden"],
                     vocab_size=record["vocab_size"], head_offset=record["head_offset"],
                     embed_offset=record["embed_offset"], embed_type=record["embed_type"],
                     head_type=record["head_type"],
                     input_scale=record["input_scale"], eos_token_ids=tuple(record["eos_token_ids"]))


def derive(source: Path, directory: Path) -> dict[str, Any]:
    """Write body.gguf and split.json into `directory` (whole, or not at all)."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = str(reader.fields["general.architecture"].contents())
    hidden = int(reader.fields[f"{arch}.embedding_length"].contents())
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    head_tensor = tensors.get("output.weight", tensors.get("token_embd.weight"))
    embed_tensor = tensors.get("token_embd.weight")
    scale = _INPUT_SCALE.get(arch)
    reason = None
    if head_tensor is None or embed_tensor is None:
        reason = "no token embedding or output head"
    elif int(head_tensor.tensor_type) not in HEAD_TYPES:
        reason = f"its head is {head_tensor.tensor_type.name}, not Q8_0 or Q6_K"
    elif scale is None:
        reason = f"architecture {arch}'s input scale is not known here"
    elif hidden % HEAD_TYPES[int(head_tensor.tensor_type)][0]:
        reason = f"hidden size {hidden} is not a multiple of {HEAD_TYPES[int(head_tensor.tensor_type)][0]}"
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f"{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    if reason is not None:
        log.info("%s keeps llama.cpp's own head: %s", source.name, reason)
        record: dict[str, Any] = {"format": FORMAT, "usable": False, "reason": reason}
    else:
        vocab_size = int(head_tensor.shape[-1])
        _write_body(reader, arch, hidden, staging / "body.gguf")
        record = {"format": FORMAT, "usable": True, "architecture": arch, "hidden": hidden, "vocab_size": vocab_size,
                  "head_offset": int(head_tensor.data_offset), "embed_offset": int(embed_tensor.data_offset),
                  "embed_type": int(embed_tensor.tensor_type), "head_type": int(head_tensor.tensor_type),
                  "input_scale": float(np.sqrt(np.float32(hidden))) if scale == "sqrt" else float(scale),
                  "eos_token_ids": []}  # llama.cpp's own, recorded by the check
    write_record(staging / "split.json", record)
    shutil.rmtree(directory, ignore_errors=True)
    try:
        os.replace(staging, directory)
    except OSError:  # another process derived it first: theirs is the same
        shutil.rmtree(staging, ignore_errors=True)
    return record


def _write_body(reader: Any, arch: str, hidden: int, destination: Path) -> None:
    """The GGUF without tokenizer and with an identity output: its logits are the hidden states."""
    import gguf

    writer = gguf.GGUFWriter(destination, arch)
    for key, value in reader.fields.items():
        if key.startswith(("GGUF.", "tokenizer.")) or key == "general.architecture":
            continue
        kind = value.types[0]
        sub_type = value.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value.contents(), kind, sub_type=sub_type)
    writer.add_tokenizer_model("none")
    writer.add_vocab_size(hidden)  # the body's "vocabulary" is the hidden state's width
    for tensor in reader.tensors:
        if tensor.name in ("output.weight",):
            continue
        if tensor.name == "token_embd.weight":  # never read: the body is fed embeddings
            writer.add_tensor(tensor.name, np.zeros((hidden, hidden), np.float32))
        elif tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(tensor.name, np.array(tensor.data))
        else:
            writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    writer.add_tensor("output.weight", np.eye(hidden, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _dequantized_rows(mapped: np.ndarray, offset: int, kind: int, rows: int, hidden: int,
                      ids: np.ndarray) -> np.ndarray:
    import gguf

    quant = gguf.GGMLQuantizationType(kind)
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[quant]
    row_bytes = hidden // block_values * block_bytes
    table = mapped[offset : offset + rows * row_bytes].reshape(rows, row_bytes)
    return gguf.dequantize(np.ascontiguousarray(table[ids]), quant).reshape(len(ids), hidden).astype(np.float32)


