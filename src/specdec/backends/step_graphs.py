"""The GPU path's step shapes: how batched, prompt and join steps are sized and padded, and
how a step is captured as a CUDA graph (replayed on CUDA, run eagerly elsewhere).

A batch of pooled sequences, each feeding up to 16 tokens, runs as one graph per (batch size
rounded up to a power of two, widest feed): the graph takes each sequence's slot index and
start position as device tensors, so sequences join and leave between steps without a
recapture. Feeds are padded to the widest: a padding row writes keys past its sequence's
length, where nothing reads them before a real step overwrites them (a rewind is a length
change), and its logits are dropped. Padding sequences write into the pool's spare slot.
"""
from __future__ import annotations

import gc
from itertools import accumulate
from typing import Callable

import torch

from .base import BatchLayout, pinned
from .static_cache import StaticCache

GRAPH_MAX_TOKENS = 16  # steps feeding more tokens than this (prompts) run eagerly
MAX_GRAPH_BATCH = 32  # sequences per batched graph; larger batches run eagerly
MIN_PROMPT_WIDTH = 32  # prompt steps are captured for 32, 64, ... PREFILL_CHUNK positions
# A batch's pass that new prompts join runs its feeds as pieces of this many positions, in a
# graph per count of pieces: JOIN_PIECES_STEP, 2 * JOIN_PIECES_STEP, ... MAX_JOIN_PIECES.
JOIN_PIECE = 4  # a verify at k = 3 is one piece
JOIN_PIECES_STEP = 16
MAX_JOIN_PIECES = 256  # 1024 positions: a 512-token prompt beside 32 sequences' 16-token feeds


class BatchStep:
    """The inputs, output and graph of one step shape over the pool: `size` sequences
    (padding included) feeding `width` tokens each."""

    def __init__(self, size: int, width: int, device: torch.device) -> None:
        self.size, self.width = size, width
        self.tokens = torch.zeros(size * width, dtype=torch.long, device=device)
        self.slots = torch.zeros(size, dtype=torch.long, device=device)
        self.starts = torch.zeros(size, dtype=torch.long, device=device)
        # after a run: logits [size * width, vocab]; a prompt step's hidden states
        self.output: torch.Tensor | None = None
        self.run = None
        self.graph: torch.cuda.CUDAGraph | None = None


class GraphCapture:
    """Captures steps as CUDA graphs that share one memory pool (they run one at a time); off
    CUDA every step runs eagerly over the same static cache (that is how CPU tests check this
    path's arithmetic)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.enabled = device.type == "cuda"
        self._memory = torch.cuda.graph_pool_handle() if self.enabled else None

    def captured(self, step: Callable[[], None]) -> torch.cuda.CUDAGraph:
        # Warm-up runs (on a side stream, as capture requires) write stale keys at positions
        # from slot.start on: past the sequence's length, where nothing reads them.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # No automatic collection mid-capture: one that frees another decoder's graphs (a dropped
        # draft's) resets them while this stream captures, which invalidates the capture.
        # torch.cuda.graph no longer collects first (only under force_cudagraph_gc).
        collecting = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph, pool=self._memory):
                step()
        finally:
            if collecting:
                gc.enable()
        return graph

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Host tensors are queued for the device, not waited for (see base.pinned)."""
        return pinned(tensor).to(self.device, non_blocking=True) if self.enabled else tensor.to(self.device)

    def run_step(self, step: BatchStep, token_ids: list[torch.Tensor], first_rows: list[int], slots: list[int],
                 starts: list[int], num_logits: list[int], spare_slot: int) -> torch.Tensor:
        """Set a step's inputs and run it: feed b's tokens go to rows first_rows[b].., each of
        the step's sequences (padding ones: the spare slot, from position 0) reads `slots` and
        `starts`. Returns the rows whose logits are kept (each feed's last num_logits[b]), on
        the device. One host tensor, one copy (each copy is a launch the GPU may wait on):
        where each token goes, the slots, the starts, the kept rows, then the tokens that are
        on the host; tokens already on the device follow those."""
        padding, size = step.size - len(slots), step.size
        on_host = [b for b, t in enumerate(token_ids) if t.device.type == "cpu"]
        order = on_host + [b for b, t in enumerate(token_ids) if t.device.type != "cpu"]
        where = [first_rows[b] + i for b in order for i in range(token_ids[b].shape[0])]
        keep = [first_rows[b] + t.shape[0] - m + j for b, (t, m) in enumerate(zip(token_ids, num_logits))
                for j in range(m)]
        header = [*where, *slots, *[spare_slot] * padding, *starts, *[0] * padding, *keep]
        meta = self.to_device(torch.cat([torch.tensor(header, dtype=torch.long),
                                         *(token_ids[b].long() for b in on_host)]))
        fed = len(where)
        tokens = meta[len(header) :]
        if len(on_host) < len(token_ids):
            tokens = torch.cat([tokens, *(token_ids[b].long() for b in order[len(on_host) :])])
        step.tokens.index_copy_(0, meta[:fed], tokens)
        step.slots.copy_(meta[fed : fed + size])
        step.starts.copy_(meta[fed + size : fed + 2 * size])
        step.run()
        return meta[fed + 2 * size : len(header)]

    def step_shape(self, size: int, width: int, spare_slot: int,
                   output: Callable[[BatchStep], torch.Tensor]) -> BatchStep:
        """A step shape over the pool: its inputs, and `run`, which sets step.output to
        output(step): the captured graph's replay on CUDA, the body itself elsewhere."""
        step = BatchStep(size, width, self.device)
        step.slots.fill_(spare_slot)  # capture warm-ups write into the spare slot only

        def body() -> None:
            step.output = output(step)
        if self.enabled:
            step.graph = self.captured(body)
            step.run = step.graph.replay
        else:
            step.run = body
        return step


def graph_batch_size(sequences: int) -> int:
    """The captured batch size that runs this many sequences (at most MAX_GRAPH_BATCH): the
    next power of two."""
    return 1 << (sequences - 1).bit_length()


def pieces(rows: int) -> int:
    return -(-rows // JOIN_PIECE)


def prompts_that_join(token_ids: list[torch.Tensor], caches: list[StaticCache], batch: list[int]) -> list[int]:
    """The prompts (pooled feeds wider than a graph step) that join a batch's pass, in order,
    while the pass stays within MAX_JOIN_PIECES pieces; none without a batch to join."""
    if not batch:
        return []
    joining, total = [], sum(pieces(token_ids[i].shape[0]) for i in batch[:MAX_GRAPH_BATCH])
    for i, (t, cache) in enumerate(zip(token_ids, caches)):
        more = pieces(t.shape[0])
        if t.shape[0] > GRAPH_MAX_TOKENS and cache.slot.index is not None and total + more <= MAX_JOIN_PIECES:
            joining.append(i)
            total += more
    return joining


def join_layout(sizes: list[int], caches: list[StaticCache]) -> tuple[int, list[int], list[int], list[int]]:
    """Where a join pass puts feeds of `sizes` tokens: the graph's count of pieces (whole steps
    of JOIN_PIECES_STEP), each feed's first row, and each piece's slot and start position.
    Token t of a feed is row first_piece * JOIN_PIECE + t; each piece reads its feed's slot."""
    counts = [pieces(n) for n in sizes]
    firsts = list(accumulate([0] + counts))  # each feed's first piece
    slots = [cache.slot.index for cache, count in zip(caches, counts) for _ in range(count)]
    starts = [cache.length + JOIN_PIECE * p for cache, count in zip(caches, counts) for p in range(count)]
    return -(-firsts[-1] // JOIN_PIECES_STEP) * JOIN_PIECES_STEP, [f * JOIN_PIECE for f in firsts[:-1]], slots, starts


def graph_batch_rows(sequences: int) -> int:
    """The batch size the graphs run `sequences` at: chunks of MAX_GRAPH_BATCH, each padded
    to a power of two (as forward_batch and _batched_step split and pad them)."""
    full, rest = divmod(sequences, MAX_GRAPH_BATCH)
    return full * MAX_GRAPH_BATCH + (graph_batch_size(rest) if rest else 0)


PADDED = BatchLayout(padded_batch=graph_batch_rows)
