"""Which GGUFs get the split head: derived once per file, then checked once against llama.cpp's
own logits (llama_cpp_head.py has the head; this module runs the check on the backend)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..kernels import native_matmul
from ..loading.cache_dir import cache_root
from .llama_cpp_backend import LlamaCppCausalLM
from .llama_cpp_head import (
    CHECK_TOLERANCE,
    HEAD_TYPES,
    SplitHead,
    derive,
    from_record,
    read_record,
    source_key,
    write_record,
)

log = logging.getLogger("specdec")


def split_head_for(path: Path) -> SplitHead | None:
    """The checked split for this GGUF, derived on first use; None where llama.cpp keeps its head."""
    if os.environ.get("SPECDEC_LLAMA_CPP_HEAD", "1") == "0":
        return None
    library = native_matmul.library()
    if library is None:
        return None
    directory = cache_root() / "llama-cpp-head" / source_key(path)
    record_file = directory / "split.json"
    record = read_record(record_file)
    if record is None:
        log.info("first use of %s: deriving its body model for the split head (about 15 s, once)", path.name)
        record = derive(path, directory)
    if not record.get("usable"):
        return None
    if not getattr(library, HEAD_TYPES[record["head_type"]][2] + "_vectorized")():
        return None  # the scalar product is slower than llama.cpp's own head
    head = from_record(path, directory, record)
    if record.get("check", {}).get("kernel") != head.kernel:  # checked once per product that computes it
        record["check"] = check(head)
        record["usable"] = record["check"]["passed"]
        record["eos_token_ids"] = record["check"].pop("eos_token_ids")
        head.eos_token_ids = tuple(record["eos_token_ids"])
        write_record(record_file, record)
        if not record["usable"]:
            log.warning("the split head of %s does not match llama.cpp's own logits (%s): using llama.cpp's head",
                        path.name, record["check"])
            return None
    return head


def check(head: SplitHead, probe_length: int = 24, positions: int = 4) -> dict[str, Any]:
    """Compare the split's logits with llama.cpp's own on a fixed probe sequence; also returns
    llama.cpp's end-of-sequence tokens (it infers some, e.g. <end_of_turn>, from the vocabulary)."""
    probe = torch.tensor(np.random.default_rng(0).integers(4, min(head.vocab_size, 32000), probe_length))
    logits, eos = [], []
    for split in (False, head):
        model = LlamaCppCausalLM(head.source, n_ctx=256, max_sequences=1, split_head=split)
        cache = model.new_cache()
        logits.append(model.forward(probe, cache, positions).clone())
        model.release(cache)
        eos.append(sorted(model.eos_token_ids))
        del model
    own, ours = logits
    scale = float(own.abs().max())
    difference = float((own - ours).abs().max())
    agree = bool(torch.equal(own.argmax(-1), ours.argmax(-1)))
    return {"kernel": head.kernel, "max_abs_difference": difference, "logit_scale": scale, "argmax_agrees": agree,
            "passed": agree and difference <= CHECK_TOLERANCE * scale, "eos_token_ids": eos[0]}
