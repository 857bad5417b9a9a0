"""Many requests, one target pass per step: the speculative loop under continuous batching.

`BatchStepper.step(generations)` advances every running generation by one step:
  plan     k for each sequence, chosen for the batch as a whole (draft_length.BatchDraftPlanner);
  propose  each generation drafts its k tokens (its own drafter, cache and sampling settings);
           draft-model passes run in lockstep, every sequence's in one packed pass per round;
  verify   one target pass over every sequence's [last, d1..dk] (ragged: own k, own cache
           length; `forward_batch`), so the weights are read once for all of them;
  conclude each generation accepts, rewinds its own cache and emits (Generation.conclude);
           the greedy ones' verdicts are read from the device together (one sync a step).

Sequences join and leave between steps: the caller passes whichever generations are running.
A joining sequence's prompt is read at the head of its verify feed, in the shared pass, where
the target's batched pass makes that cheaper than a pass of its own (the compact decoder's
packed pass, the GPU's join graphs; not llama.cpp's): the running sequences' step then reads
the weights once for both.
A lone generation takes its own `step()`, so concurrency 1 costs what a single request costs.
One request's failure (in its draft, or in the shared pass) is returned for that request
only; the others go on.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Generator

import torch

from . import trace
from .acceptance import Verdict, verify_greedy_batch
from .backends.base import CausalLM
from .draft_length import BatchDraftPlanner
from .drafters.base import DraftFeed
from .generation import DraftedStep, Generation, StepOutput

log = logging.getLogger("specdec")

StepResult = StepOutput | BaseException


class BatchStepper:
    def __init__(self, target: CausalLM, planner: BatchDraftPlanner | None = None,
                 prompts_in_verify: bool = True) -> None:
        """prompts_in_verify: a joining request's prompt is read in the step's shared verify
        pass (Generation.draft_steps), not by a pass of its own that the batch waits for, where
        the target's batched pass does that for less (CausalLM.prompts_join_batches);
        off, for comparison only."""
        self.target = target
        self.planner = planner or BatchDraftPlanner()
        self.prompts_in_verify = prompts_in_verify

    def step(self, generations: list[Generation]) -> list[StepResult]:
        """One step of each generation, in order: its output, or the exception that ended it."""
        if len(generations) == 1:
            return [_guarded(generations[0].step)]
        began = time.perf_counter()
        self.planner.layout = self.target.batch_layout  # set per step: a pool reserved later pads
        joining = not all(g.prefilled for g in generations)  # a prompt is read in this step
        ks = self.planner.plan([g.policy for g in generations], [g.draft_budget for g in generations])
        if any(g.policy.adaptive for g in generations):  # from timings: a split target runs rank 0's
            ks = self.target.agreed_draft_lengths(ks)
        # Drafts are not waited for (timed=False): on a GPU the verify pass is queued behind
        # them while they run, and the clock times them on the device.
        clock = _DraftClock(self.target.device)
        in_verify = self.prompts_in_verify and self.target.prompts_join_batches
        drafts = self._draft([g.draft_steps(k, timed=False, prompt_in_verify=in_verify)
                              for g, k in zip(generations, ks)], clock)
        live = [i for i, d in enumerate(drafts) if isinstance(d, DraftedStep)]
        # The verify pass is timed like the drafts: on a GPU by events, so its cost is the
        # device's and not when the host got round to reading it (which varies by a
        # millisecond a step); what the host adds goes to the step's overhead.
        verify_clock = _PassClock(self.target.device)
        verify_clock.start()
        logits = self._verify([generations[i] for i in live], [drafts[i] for i in live])
        verify_clock.stop()
        drafts = self._charge(drafts, clock)  # waits for the drafts only
        verdicts = _greedy_verdicts(generations, drafts, live, logits)
        trace.mark("verdict")
        results: list[StepResult] = list(drafts)  # failures stay as they are
        for i, target_logits in zip(live, logits):
            results[i] = target_logits if isinstance(target_logits, BaseException) else \
                _guarded(generations[i].conclude, drafts[i], target_logits, None, verdicts.get(i))
        # A step with a new request's prompt in it (in its verify pass, or before) teaches
        # neither what verifying drafts costs nor the host's share of a step.
        if live and not joining and not any(isinstance(results[i], BaseException) for i in live):
            rows = self.planner.layout.rows([drafts[i].verify_ids.shape[0] for i in live])
            verify_s = verify_clock.elapsed()
            self.planner.record_verify(rows, verify_s)
            self.planner.record_overhead(time.perf_counter() - began - clock.elapsed() - verify_s)
        return results

    def _draft(self, steps: list[Generator], clock: "_DraftClock") -> list[DraftedStep | BaseException]:
        """Drive every generation's draft in lockstep: each round, the passes they wait for
        run as one forward_batch per draft model."""
        results: list[DraftedStep | BaseException | None] = [None] * len(steps)
        waiting: dict[int, DraftFeed] = {}
        clock.fed = [0] * len(steps)
        for i, s in enumerate(steps):  # up to each one's first pass: new arrivals prefill the target here
            self._resume(i, s, None, waiting, results)
        clock.start()
        while waiting:
            by_model: dict[int, list[int]] = {}
            for i, feed in waiting.items():
                by_model.setdefault(id(feed.model), []).append(i)
            for group in by_model.values():
                feeds = [waiting.pop(i) for i in group]
                for i, feed in zip(group, feeds):
                    clock.fed[i] += feed.token_ids.shape[0]
                    clock.widest = max(clock.widest, feed.token_ids.shape[0])
                logits = self._feed(feeds)
                clock.rounds, clock.fed_sequences = clock.rounds + 1, clock.fed_sequences + len(feeds)
                for i, answer in zip(group, logits):
                    self._resume(i, steps[i], answer, waiting, results)
        clock.stop()
        return results

    def _charge(self, drafts: list, clock: "_DraftClock") -> list[DraftedStep | BaseException]:
        """Each sequence is charged the rounds' time in proportion to the positions it fed,
        so its policy learns a batched draft's cost; the planner learns what a round costs."""
        elapsed, total = clock.elapsed(), sum(clock.fed)
        # What rounds cost, from steps without a catch-up: a draft resuming after steps off
        # first reads every token since (a prompt, for a new request), which is no round's cost.
        if clock.rounds and clock.widest <= self.planner.maximum + 1:
            self.planner.record_draft_rounds(clock.fed_sequences / clock.rounds, clock.rounds, elapsed)
        return [replace(d, draft_s=elapsed * clock.fed[i] / total) if isinstance(d, DraftedStep) and total else d
                for i, d in enumerate(drafts)]

    @staticmethod
    def _resume(i: int, steps: Generator, answer, waiting: dict, results: list) -> None:
        try:
            if isinstance(answer, BaseException):  # its draft pass failed: end its proposal with that
                waiting[i] = steps.throw(answer)
            else:
                waiting[i] = next(steps) if answer is None else steps.send(answer)
        except StopIteration as done:
            results[i] = done.value
        except Exception as exc:  # that request's draft failed; the others go on
            log.exception("a generation step failed")
            results[i] = exc

    @staticmethod
    def _feed(feeds: list[DraftFeed]) -> list[torch.Tensor | BaseException]:
        """One draft model's pass over several sequences: their logits [1, columns] each."""
        model = feeds[0].model
        ids, caches = [f.token_ids for f in feeds], [f.cache for f in feeds]
        return _one_pass_or_each(model, ids, caches, [1] * len(feeds), "draft")

    def _verify(self, generations: list[Generation], drafts: list[DraftedStep]) -> list[torch.Tensor | BaseException]:
        """Each sequence's target logits [k_i + 1, vocab], from one pass when it succeeds."""
        if not generations:
            return []
        return _one_pass_or_each(self.target, [d.verify_ids for d in drafts], [g.cache for g in generations],
                                 [d.num_logits for d in drafts], "verify")


class _PassClock:
    """How long passes took. On a GPU they run asynchronously: events around them time the
    device, and waiting for the second lets what was launched after it run on; the host's
    own time counts too (a model-free lookup runs there)."""

    def __init__(self, device: torch.device) -> None:
        self._events = device.type == "cuda"
        self._device_s: float | None = None

    def start(self) -> None:
        self._started = time.perf_counter()
        if self._events:
            self._first = torch.cuda.Event(enable_timing=True)
            self._first.record()

    def stop(self) -> None:
        self._host_s = time.perf_counter() - self._started
        if self._events:
            self._last = torch.cuda.Event(enable_timing=True)
            self._last.record()

    def elapsed(self) -> float:
        if not self._events:
            return self._host_s
        if self._device_s is None:
            self._last.synchronize()
            self._device_s = self._first.elapsed_time(self._last) / 1e3
        return max(self._host_s, self._device_s)


class _DraftClock(_PassClock):
    """How long a step's draft rounds took, and what they fed."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.fed: list[int] = []  # positions each sequence fed
        self.rounds = self.fed_sequences = self.widest = 0


def _one_pass_or_each(model: CausalLM, ids: list[torch.Tensor], caches: list, num_logits: list[int],
                      what: str) -> list[torch.Tensor | BaseException]:
    """forward_batch; if that fails, each sequence alone from where it stood, so that only
    the sequence at fault gets the error."""
    lengths = [model.cache_length(c) for c in caches]
    try:
        return model.forward_batch(ids, caches, num_logits)
    except Exception as exc:
        if len(ids) == 1:
            return [exc]
        log.exception("a batched %s pass failed: running its sequences one by one", what)
    results: list[torch.Tensor | BaseException] = []
    for token_ids, cache, length, n in zip(ids, caches, lengths, num_logits):
        try:
            model.rewind(cache, min(length, model.cache_length(cache)))
            # A copy: a graph step's logits live in its slot's buffer, which the next
            # sequence's replay may reuse (graph_decoder.py shares one memory pool).
            results.append(model.forward(token_ids, cache, num_logits=n).clone())
        except Exception as exc:
            results.append(exc)
    return results


def _greedy_verdicts(generations: list[Generation], drafts: list, live: list[int],
                     logits: list) -> dict[int, Verdict]:
    """The greedy sequences' verdicts, read from the device at once; the others (sampled, with
    penalties, biases or a grammar, or whose pass failed) reach theirs in conclude."""
    greedy = [(i, rows) for i, rows in zip(live, logits)
              if generations[i].params.greedy and not generations[i].processes_logits
              and not isinstance(rows, BaseException)]
    if len(greedy) < 2:
        return {}
    try:
        verdicts = verify_greedy_batch([rows for _, rows in greedy],
                                       [drafts[i].proposal.tokens for i, _ in greedy])
    except Exception:  # each sequence then reaches its own, and fails alone if it must
        log.exception("a batch's greedy verdicts failed: each sequence's on its own")
        return {}
    return {i: verdict for (i, _), verdict in zip(greedy, verdicts)}


def _guarded(function, *args):
    try:
        return function(*args)
    except Exception as exc:  # one request's failure must not end the others
        log.exception("a generation step failed")
        return exc
