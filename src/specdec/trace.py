"""Named marks on the host's timeline at points of the decoding loop, for profiling scripts
(scripts/gpu_host_gaps.py, gpu_serving.py --host) to see where the host spends a step's time.
Off unless a recorder is installed: then a mark costs one global read."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

Recorder = Callable[[str, Any, float], None]  # (event, source, time.perf_counter())
_recorder: Recorder | None = None

# The events: "verdict" (a step's accept decision is on the host), "committed" (caches rewound),
# "emitted" (tokens out), "forward" / "batched_step" (a model's pass launched; source: the model).


def mark(event: str, source: Any = None) -> None:
    if _recorder is not None:
        _recorder(event, source, time.perf_counter())


@contextlib.contextmanager
def recording(recorder: Recorder) -> Iterator[None]:
    """Install `recorder` for the marks made inside the block."""
    global _recorder
    previous, _recorder = _recorder, recorder
    try:
        yield
    finally:
        _recorder = previous
