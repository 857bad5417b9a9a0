"""The GPU path's KV cache: slots of fixed capacity at fixed addresses (so captured graphs can
write them), leased to sequences. A slot keeps its buffers and graphs when its lease ends, so
the next request reuses them instead of capturing again. For a server's batch,
`GraphDecoder.reserve_sequences(n)` puts n slots in one pool, a tensor per layer
[n + 1, kv_heads, capacity, head_dim]."""
from __future__ import annotations

import torch


class SlotPool:
    """The keys and values of `count` slots, plus a spare that padding sequences write into."""

    def __init__(self, count: int, layers: int, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = (count + 1, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.count = count
        self.spare = count


class Slot:
    """One sequence's keys and values at fixed addresses, and the graphs that write them.
    A pooled slot's tensors are views of its row of the pool."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], index: int | None = None) -> None:
        self.keys, self.values = keys, values  # [kv_heads, capacity, head_dim] per layer
        self.index = index  # its row of the pool; None for a slot of its own
        device = keys[0].device
        self.start = torch.zeros((), dtype=torch.long, device=device)  # first position of a step
        self.inputs: dict[int, torch.Tensor] = {}  # tokens per step size, [n]
        self.outputs: dict[int, torch.Tensor] = {}  # logits per step size, [n, vocab]
        self.hidden: dict[int, torch.Tensor] = {}  # final hidden states per step size, [n, hidden]
        self.features: torch.Tensor | None = None  # a feature head's step input (draft_models/feature_head.py)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # Plain greedy decoding (GreedyChain): a one-token step that ends by writing its
        # argmax into its own input, so the next step needs nothing from the host.
        self.chain_input = torch.zeros(1, dtype=torch.long, device=device)
        self.chain_graph: torch.cuda.CUDAGraph | None = None
        # A feature head's greedy rollout (draft_models/feature_head.py): its picks, the next
        # one's index, and the graph of one step.
        self.rollout: torch.Tensor | None = None
        self.rollout_at: torch.Tensor | None = None
        self.rollout_graph: torch.cuda.CUDAGraph | None = None


class StaticCache:
    """A sequence's lease of a slot; `length` is the truth, positions past it are stale."""

    def __init__(self, slot: Slot) -> None:
        self.slot: Slot | None = slot  # None once released
        self.length = 0
        self.extra_head = None  # no per-sequence head rows on this path
        self.feature_log = None  # a target's, for a feature drafter (backends/features.py)
        self.features_in: torch.Tensor | None = None  # a feature head's: its next feed's features
        self.predicted: torch.Tensor | None = None  # a feature head's: its last predicted feature


class SlotLeases:
    """Which slots are free. A slot keeps its buffers and graphs when its lease ends, so the
    next sequence reuses them instead of capturing again; pooled slots are leased first."""

    def __init__(self, layers: int, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self._shape = (layers, kv_heads, capacity, head_dim, dtype, device)
        self._free: list[Slot] = []
        self.pool: SlotPool | None = None

    def lease(self) -> StaticCache:
        if self._free:
            pooled = [i for i, slot in enumerate(self._free) if slot.index is not None]
            return StaticCache(self._free.pop(pooled[-1] if pooled else -1))
        layers, kv_heads, capacity, head_dim, dtype, device = self._shape
        keys = [torch.zeros(kv_heads, capacity, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        return StaticCache(Slot(keys, [torch.zeros_like(k) for k in keys]))

    def end(self, cache: StaticCache) -> None:
        """The lease ends now (explicitly, on the stepping thread: a finaliser could hand the
        slot over mid-pass). The cache is unusable after; a second end does nothing."""
        if cache.slot is not None:
            self._free.append(cache.slot)
            cache.slot = None

    def make_pool(self, count: int) -> SlotPool:
        """`count` slots in one pool (a server's batch runs over them as one graph)."""
        layers, kv_heads, capacity, head_dim, dtype, device = self._shape
        self.pool = pool = SlotPool(count, layers, kv_heads, capacity, head_dim, dtype, device)
        self._free.extend(Slot([k[i] for k in pool.keys], [v[i] for v in pool.values], i)
                          for i in reversed(range(count)))
        return pool
