"""The configurations a benchmark compares: specdec (plain and speculative), and the peers a
user would pick instead: transformers' own generate(), and llama-cpp-python's own generation."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch

from ..engine import Engine
from ..kernels.cpu_matmul import set_few_row_matmul
from ..sampling_params import SamplingParams
from ..stats import GenerationStats


@dataclass
class RunResult:
    token_ids: list[int]
    wall_time_s: float
    stats: GenerationStats | None  # None for peers, whose internals we cannot see
    compute_flops: float | None
    peak_memory_mb: float


class BenchRun(Protocol):
    name: str
    kind: str  # "baseline" | "specdec" | "peer"

    def __call__(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed: int) -> RunResult: ...


class SpecdecRun:
    def __init__(self, name: str, engine: Engine, num_draft_tokens: int | None, kind: str = "specdec") -> None:
        self.name, self.kind, self.engine, self.num_draft_tokens = name, kind, engine, num_draft_tokens
        self._target_flops = engine.target.flops_per_token()
        self._draft_flops = engine.draft_model.flops_per_token() if engine.draft_model is not None else 0.0

    def __call__(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed: int,
                 response_format: dict | None = None) -> RunResult:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                num_draft_tokens=self.num_draft_tokens, response_format=response_format)
        device = self.engine.target.device
        elapsed, out = _timed(device, self.engine.start(prompt_ids, params).run)
        s = out.stats
        flops = self._target_flops * (s.prompt_tokens - 1 + s.target_positions) + self._draft_flops * s.draft_positions
        return RunResult(out.token_ids, elapsed, s, flops, _peak_mb(device))


class HFGenerateRun:
    """transformers' generate(): plain, with an assistant model, or with prompt lookup."""

    def __init__(self, name: str, engine: Engine, assistant: bool = False, prompt_lookup_tokens: int | None = None):
        self.name, self.kind = name, "peer"
        self.model = engine.target.model
        self.assistant = engine.draft_model.model if assistant and engine.draft_model is not None else None
        self.prompt_lookup_tokens = prompt_lookup_tokens
        self.eos = sorted(engine.target.eos_token_ids)

    @torch.inference_mode()
    def __call__(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed: int) -> RunResult:
        device = self.model.device
        ids = torch.tensor([prompt_ids], device=device)
        kwargs = dict(max_new_tokens=max_new_tokens, attention_mask=torch.ones_like(ids),
                      eos_token_id=self.eos or None, pad_token_id=self.eos[0] if self.eos else 0)
        kwargs.update(do_sample=True, temperature=temperature) if temperature > 0 else kwargs.update(do_sample=False)
        if self.assistant is not None:
            kwargs["assistant_model"] = self.assistant
        if self.prompt_lookup_tokens:
            kwargs["prompt_lookup_num_tokens"] = self.prompt_lookup_tokens
        torch.manual_seed(seed)
        # the peer runs stock transformers, without specdec's CPU matmul routing
        switched = [m for m in (self.model, self.assistant) if m is not None and set_few_row_matmul(m, False)]
        try:
            elapsed, out = _timed(device, lambda: self.model.generate(ids, **kwargs))
        finally:
            for m in switched:
                set_few_row_matmul(m, True)
        return RunResult(out[0, len(prompt_ids):].tolist(), elapsed, None, None, _peak_mb(device))


class LlamaCppPythonRun:
    """llama-cpp-python's high-level `Llama.generate()` on the same GGUF: plain, or with its
    own prompt-lookup speculation (`LlamaPromptLookupDecoding`). Greedy only."""

    def __init__(self, name: str, gguf_path: str, eos_token_ids: frozenset[int], lookup_tokens: int | None = None,
                 n_ctx: int = 8192) -> None:
        import os

        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        self.name, self.kind = name, "peer"
        draft = LlamaPromptLookupDecoding(num_pred_tokens=lookup_tokens) if lookup_tokens else None
        threads = os.cpu_count() or 1
        # swa_full: its lookup path removes rejected cache cells, which a windowed cache cannot
        self.llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         draft_model=draft, swa_full=True, verbose=False)
        self.eos = eos_token_ids

    def __call__(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed: int) -> RunResult:
        if temperature > 0:
            raise ValueError("the llama-cpp-python peer runs greedy only")

        def generate() -> list[int]:
            tokens: list[int] = []
            # Without this, generate() reuses the previous call's prompt cache (the warm-up's,
            # the last repeat's) and skips the prefill that every other run pays.
            self.llm.reset()
            for token in self.llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):
                tokens.append(int(token))
                if token in self.eos or len(tokens) >= max_new_tokens:
                    break
            return tokens

        elapsed, tokens = _timed(torch.device("cpu"), generate)
        return RunResult(tokens, elapsed, None, None, _peak_mb(torch.device("cpu")))


def _timed(device: torch.device, fn):
    """(seconds, result) of fn(), with device work finished on both sides and peak memory reset."""
    _reset_peak(device)
    _sync(device)
    started = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - started, result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process-wide peak RSS, KiB -> MiB
