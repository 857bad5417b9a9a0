"""Many requests, one target pass per step: the speculative loop under continuous batching.

`BatchStepper.step(generations)` advances every running generation by one step:
  plan     k for each sequence, chosen for the batch as a whole (draft_length.BatchDraftPlanner);
  propose  each generation drafts its k tokens (its own drafter, cache and sampling settings);
  verify   one target pass over every sequence's [last, d1..dk] (ragged: own k, own cache
           length; `forward_batch`), so the weights are read once for all of them;
  conclude each generation accepts, rewinds its own cache and emits (Generation.conclude).

Sequences join and leave between steps: the caller passes whichever generations are running.
A lone generation takes its own `step()`, so concurrency 1 costs what a single request costs.
One request's failure (in its draft, or in the shared pass) is returned for that request
only; the others go on.
"""
from __future__ import annotations

import logging
import time

import torch

from .draft_length import BatchDraftPlanner
from .generation import DraftedStep, Generation, StepOutput
from .models.base import CausalLM, forward_batch

log = logging.getLogger("specdec")

StepResult = StepOutput | BaseException


class BatchStepper:
    def __init__(self, target: CausalLM, planner: BatchDraftPlanner | None = None) -> None:
        self.target = target
        self.planner = planner or BatchDraftPlanner()

    def step(self, generations: list[Generation]) -> list[StepResult]:
        """One step of each generation, in order: its output, or the exception that ended it."""
        if len(generations) == 1:
            return [_guarded(generations[0].step)]
        ks = self.planner.plan([g.policy for g in generations], [g.draft_budget for g in generations])
        drafts: list[DraftedStep | BaseException] = [_guarded(g.draft, k) for g, k in zip(generations, ks)]
        live = [i for i, d in enumerate(drafts) if isinstance(d, DraftedStep)]
        started = time.perf_counter()
        logits = self._verify([generations[i] for i in live], [drafts[i] for i in live])
        results: list[StepResult] = list(drafts)  # failures stay as they are
        for i, target_logits in zip(live, logits):
            results[i] = target_logits if isinstance(target_logits, BaseException) else \
                _guarded(generations[i].conclude, drafts[i], target_logits)
        if live and not any(isinstance(results[i], BaseException) for i in live):
            rows = sum(drafts[i].verify_ids.shape[0] for i in live)
            self.planner.observe(rows, time.perf_counter() - started)
        return results

    def _verify(self, generations: list[Generation], drafts: list[DraftedStep]) -> list[torch.Tensor | BaseException]:
        """Each sequence's target logits [k_i + 1, vocab], from one pass when it succeeds."""
        if not generations:
            return []
        caches = [g.cache for g in generations]
        lengths = [self.target.cache_length(c) for c in caches]
        ids = [d.verify_ids for d in drafts]
        try:
            return forward_batch(self.target, ids, caches, [t.shape[0] for t in ids])
        except Exception:
            log.exception("a batched verify pass failed: verifying its sequences one by one")
        results: list[torch.Tensor | BaseException] = []
        for cache, length, verify_ids in zip(caches, lengths, ids):
            try:
                self.target.rewind(cache, min(length, self.target.cache_length(cache)))
                results.append(self.target.forward(verify_ids, cache, num_logits=verify_ids.shape[0]))
            except Exception as exc:
                results.append(exc)
        return results


def _guarded(function, *args):
    try:
        return function(*args)
    except Exception as exc:  # one request's failure must not end the others
        log.exception("a generation step failed")
        return exc
