"""One rank of the tensor-parallel test (test_tensor_parallel.py): the tiny targets split over
the gloo group, every generation of the test's list, rank 0 writing the token ids as JSON.
Usage: python tensor_parallel_worker.py RANK WORLD INIT_FILE OUT_JSON"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tiny  # noqa: E402
from exactness import PROMPTS  # noqa: E402

from specdec import Engine, SamplingParams  # noqa: E402
from specdec.backends.compact_decoder import CompactDecoder  # noqa: E402
from specdec.backends.graph_decoder import GraphDecoder  # noqa: E402
from specdec.backends.tensor_parallel import TensorParallelDecoder, TensorParallelGraphDecoder  # noqa: E402

# The CPU decoder, and the GPU path's graph decoder (its steps run eagerly off CUDA)
PATHS = {"compact": (TensorParallelDecoder, CompactDecoder), "graph": (TensorParallelGraphDecoder, GraphDecoder)}
SETTINGS = [dict(num_draft_tokens=0), dict(num_draft_tokens=3), dict(num_draft_tokens=6),
            dict(num_draft_tokens=None), dict(num_draft_tokens=3, temperature=0.8, seed=11)]


def targets() -> dict:
    """The tiny Llama (4 heads, 2 key-value heads) and a tiny Gemma 3 of the same split, its window crossed."""
    return {"llama": tiny.llama(seed=0), "gemma3": tiny.gemma3(seed=0, heads=4, kv_heads=2)}


def generations(decoder) -> dict:
    # The adaptive k (None) follows timings: the ranks run rank 0's (agreed_draft_lengths).
    engine = Engine(decoder, drafter="ngram")
    out = {}
    for i, settings in enumerate(SETTINGS):
        params = SamplingParams(max_new_tokens=24, **settings)
        out[f"alone-{i}"] = [engine.start(p, params).run().token_ids for p in PROMPTS]
    batch = [engine.start(p, SamplingParams(max_new_tokens=24, num_draft_tokens=k))
             for p, k in zip(PROMPTS, (None, 2, 4, 0, None, 3))]
    while not all(g.finished for g in batch):
        engine.batch_stepper.step([g for g in batch if not g.finished])
    out["batch"] = [g.output().token_ids for g in batch]
    return out


def main() -> None:
    rank, world, init_file, out_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for family, model in targets().items():
            results[family] = {}
            for path, (split_class, whole_class) in PATHS.items():
                if path == "graph" and family != "llama":  # the graph path's split is the same code
                    continue
                split = split_class(model, f"tp-{family}", torch.float64, {2}, tiny.VOCAB)
                results[family][f"{path}, split"] = generations(split)
                if rank == 0:
                    whole = whole_class(model, f"one-{family}", torch.float64, {2}, tiny.VOCAB)
                    results[family][f"{path}, one process"] = generations(whole)
        if rank == 0:
            Path(out_file).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
