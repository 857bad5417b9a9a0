"""A target split over two processes (backends/tensor_parallel.py, gloo on CPU), on the CPU decoder
and on the GPU path's graph decoder (eager here): every greedy and seeded output, alone and in a
batch, at fixed and adaptive k, equals the same target in one process."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
from specdec.backends.layers import UnsupportedArchitecture

WORKER = Path(__file__).with_name("tensor_parallel_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("tp")
    out = directory / "out.json"
    ranks = [subprocess.Popen([sys.executable, str(WORKER), str(rank), "2", str(directory / "init"), str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    logs = [rank.communicate(timeout=600)[0] for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), logs
    return json.loads(out.read_text())


@pytest.mark.parametrize("family,path", [("llama", "compact"), ("gemma3", "compact"), ("llama", "graph")])
def test_a_target_split_over_two_processes_gives_one_process_outputs(results, family, path):
    split, whole = results[family][f"{path}, split"], results[family][f"{path}, one process"]
    assert split.keys() == whole.keys()
    for key in whole:
        assert split[key] == whole[key], (family, key)
    # real runs: full length, a different output per prompt
    assert all(len(ids) == 24 for ids in whole["alone-0"]) and len({tuple(ids) for ids in whole["alone-0"]}) == 6


def test_a_model_whose_heads_do_not_split_is_refused():
    from specdec.backends.tensor_parallel import split_sizes

    config = tiny.llama(seed=0).config  # 4 heads, 2 key-value heads, 128 MLP units
    assert split_sizes(config, 2) == (4, 2, 128)
    for world in (3, 4):
        with pytest.raises(UnsupportedArchitecture, match="do not split"):
            split_sizes(config, world)
