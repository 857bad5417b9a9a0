from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # The GPU kernels' tests run in Triton's interpreter here. Triton reads this when it is
    # first imported, which `transformers` does early.
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def target_llama():
    return tiny.wrap(tiny.llama(seed=0), "tiny-llama-target")


@pytest.fixture(scope="session")
def self_draft_llama():
    """The target's own weights as a separate draft model: every draft is accepted."""
    return tiny.wrap(tiny.llama(seed=0), "tiny-llama-self")


@pytest.fixture(scope="session")
def random_draft_llama():
    """Unrelated random weights: almost nothing is accepted, output must still be exact."""
    return tiny.wrap(tiny.llama(seed=1), "tiny-llama-random")


@pytest.fixture(scope="session")
def target_gemma():
    return tiny.wrap(tiny.gemma3(seed=0), "tiny-gemma3-target")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny model directory with a tokenizer and chat template, as a user would have."""
    directory = tmp_path_factory.mktemp("tiny-model")
    model = tiny.llama(seed=0, dtype=torch.float32)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(directory)
    tiny.tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_draft_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-draft")
    tiny.llama(seed=1, dtype=torch.float32, layers=1).save_pretrained(directory)
    tiny.tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def slow_model_dir(tmp_path_factory) -> Path:
    """A larger tiny model with no EOS: a request runs to max_tokens and holds its slot for seconds."""
    directory = tmp_path_factory.mktemp("slow-model")
    model = tiny.llama(seed=5, dtype=torch.float32, layers=8, hidden=384)
    model.config.eos_token_id = None
    model.generation_config.eos_token_id = None
    model.save_pretrained(directory)
    tiny.tokenizer(directory)
    return directory
