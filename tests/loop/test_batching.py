"""Many requests in one target pass: each comes out exactly as it would alone.

Tolerance: the tiny models run in float64, where a packed pass and one pass per sequence
differ by ~1e-15 before the logits are rounded to float32 (different matmul shapes), far below the top-2 margins of
these sharpened models, so greedy outputs must match token for token.
"""
from __future__ import annotations

import pytest
import torch

from specdec import Engine, SamplingParams
from specdec.batching import BatchStepper
from specdec.draft_length import BatchDraftPlanner, DraftLengthPolicy
from specdec.drafters.base import DraftProposal, Drafter
from specdec.backends.base import PACKED, BatchLayout
from specdec.backends.compact_decoder import CompactDecoder
from specdec.backends.hf import HFCausalLM
import tiny
from stats_util import chi2_critical, chi2_statistic
from exactness import PROMPTS, reference_greedy
from test_sampling_lossless import (ADAPTIVE_LENGTH, PROMPT as LAW_PROMPT, VOCAB as LAW_VOCAB, _index as law_index,
                                    _longest_draft_run, exact_law)


def compact(model) -> CompactDecoder:
    reference = HFCausalLM(model, "ref")
    return CompactDecoder(model, "tiny-compact", torch.float64, set(reference.eos_token_ids), reference.vocab_size)


@pytest.fixture(scope="module")
def models():
    return {
        "llama": tiny.llama(seed=0),
        "gemma3": tiny.gemma3(seed=0),  # sliding window 8: rewinds cross its edge
        "draft": tiny.llama(seed=0),  # the target's own weights: long accepted runs
        "random": tiny.llama(seed=1),  # unrelated: almost nothing accepted
    }


def run_batch(engine: Engine, requests: list[tuple[list[int], SamplingParams]], concurrency: int):
    """Continuous batching: at most `concurrency` running; the next request joins as one ends."""
    stepper = BatchStepper(engine.target)
    waiting = list(enumerate(requests))
    running: list[tuple[int, object]] = []
    outputs: dict[int, object] = {}
    while waiting or running:
        while waiting and len(running) < concurrency:
            index, (prompt, params) = waiting.pop(0)
            running.append((index, engine.start(prompt, params)))
        results = stepper.step([g for _, g in running])
        for (index, generation), result in zip(running, results):
            if isinstance(result, BaseException):
                outputs[index] = result
            elif result.finished:
                outputs[index] = generation.output()
        running = [(i, g) for i, g in running if i not in outputs]
    return [outputs[i] for i in range(len(requests))]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_one_packed_pass_gives_each_sequence_its_own_logits(models, family):
    model = compact(models[family])
    generator = torch.Generator().manual_seed(0)
    lengths, new = [3, 17, 9, 1], [5, 1, 13, 2]  # ragged caches, ragged steps
    alone, packed = [model.new_cache() for _ in lengths], [model.new_cache() for _ in lengths]
    for n, a, p in zip(lengths, alone, packed):
        ids = torch.randint(3, tiny.VOCAB, (n,), generator=generator)
        model.prefill(ids, a)
        model.prefill(ids, p)
    for round_ in range(3):  # then rewind some and go again: lengths keep diverging
        steps = [torch.randint(3, tiny.VOCAB, (n,), generator=generator) for n in new]
        expected = [model.forward(t, c, t.shape[0]) for t, c in zip(steps, alone)]
        got = model.forward_batch(steps, packed, [t.shape[0] for t in steps])
        for e, g in zip(expected, got):
            assert g.shape == e.shape and float((g - e).abs().max()) < 1e-5  # float32 logits of float64 passes
        for i, (a, p) in enumerate(zip(alone, packed)):
            assert model.cache_length(a) == model.cache_length(p)
            keep = model.cache_length(a) - (i + round_) % 3
            model.rewind(a, keep)
            model.rewind(p, keep)


@pytest.mark.parametrize("family,drafter", [("llama", "ngram"), ("llama", "self"), ("llama", "random"),
                                            ("gemma3", "ngram"), ("gemma3", "self")])
def test_batched_greedy_equals_each_request_alone_and_plain_target(models, family, drafter):
    target = compact(models[family])
    draft = {"self": models["llama"] if family == "llama" else models["gemma3"], "random": models["random"]}
    engine = (Engine(target, drafter="ngram") if drafter == "ngram"
              else Engine(target, drafter="model", draft_model=compact(draft[drafter])))
    requests = [(prompt, SamplingParams(max_new_tokens=n, num_draft_tokens=k))
                for prompt, n, k in zip(PROMPTS * 2, [40, 25, 33, 12, 40, 7] * 2, [None, None, 3, None, 8, 0] * 2)]
    outputs = run_batch(engine, requests, concurrency=5)
    plain = HFCausalLM(models[family], "plain")
    for (prompt, params), out in zip(requests, outputs):
        assert out.token_ids == engine.start(prompt, params).run().token_ids
        assert out.token_ids == reference_greedy(plain, prompt, params.max_new_tokens), f"prompt {prompt}"


def test_targets_without_a_packed_pass_batch_one_pass_per_sequence(models):
    target = HFCausalLM(models["llama"], "tiny-hf")  # transformers: forward_batch falls back
    engine = Engine(target, drafter="ngram")
    requests = [(prompt, SamplingParams(max_new_tokens=20)) for prompt in PROMPTS]
    for (prompt, _), out in zip(requests, run_batch(engine, requests, concurrency=4)):
        assert out.token_ids == reference_greedy(target, prompt, 20)


def test_seeded_samples_in_a_batch_equal_the_same_seed_alone(models):
    target = compact(models["llama"])
    engine = Engine(target, drafter="model", draft_model=compact(models["random"]))
    requests = [(prompt, SamplingParams(max_new_tokens=24, temperature=t, top_p=p, seed=s, num_draft_tokens=k))
                for prompt, t, p, s, k in zip(PROMPTS, [1.0, 0.7, 1.3, 0.0, 1.0, 0.9], [1.0, 0.9, 1.0, 1.0, 0.8, 1.0],
                                              range(6), [2, 4, None, None, 1, 3])]
    outputs = run_batch(engine, requests, concurrency=6)
    for (prompt, params), out in zip(requests, outputs):
        assert out.token_ids == engine.start(prompt, params).run().token_ids


@pytest.mark.heavy
def test_batched_sampling_follows_the_target_law_with_the_planners_k():
    # The planner picks k from acceptance so far: chosen before each step's draws, it cannot
    # bias the output. Seeds make the test deterministic; the adaptive policy is put back
    # in place of the seed-bound one so that the planner, not the seed, chooses k.
    target = compact(tiny.llama(seed=3, vocab=LAW_VOCAB, hidden=32))
    target.eos_token_ids = frozenset()
    engine = Engine(target, drafter="model", draft_model=compact(tiny.llama(seed=4, vocab=LAW_VOCAB, hidden=32)))
    params = [SamplingParams(max_new_tokens=ADAPTIVE_LENGTH, temperature=1.0, top_k=4, seed=10_000 + i)
              for i in range(2000)]
    stepper, counts, running, waiting = BatchStepper(target), torch.zeros(LAW_VOCAB**ADAPTIVE_LENGTH), [], list(params)
    deepest = 0
    while waiting or running:
        while waiting and len(running) < 16:
            generation = engine.start(LAW_PROMPT, waiting.pop())
            generation.policy = DraftLengthPolicy()
            running.append(generation)
        stepper.step(running)
        for g in [g for g in running if g.finished]:
            out = g.output()
            counts[law_index(out.token_ids)] += 1
            deepest = max(deepest, _longest_draft_run(out.provenance))
        running = [g for g in running if not g.finished]
    stat, df = chi2_statistic(counts, exact_law(HFCausalLM(target.model, "law"), params[0]))
    assert stat < chi2_critical(df, 1e-3), f"chi2 {stat:.1f} on {df} df"
    assert deepest >= 2  # the planner drafted several tokens in a step, and they were accepted


def test_draft_passes_of_a_batch_run_together(models):
    target, draft = compact(models["llama"]), compact(models["draft"])
    engine = Engine(target, drafter="model", draft_model=draft)
    passes = []
    original = draft.forward_batch
    draft.forward_batch = lambda ids, caches, n: passes.append(len(ids)) or original(ids, caches, n)
    generations = [engine.start(prompt, SamplingParams(max_new_tokens=9, num_draft_tokens=3)) for prompt in PROMPTS]
    BatchStepper(target).step(generations)
    assert passes == [len(PROMPTS)] * 3  # k = 3 rounds, each one pass over all six sequences


def _count_target_passes(target) -> tuple[list[int], list[list[int]]]:
    """Spy on the target's real passes: prompts read on their own, and batched passes' feed widths."""
    prompt_passes, batch_passes = [], []
    prefill, forward_batch = target.prefill, target.forward_batch
    target.prefill = lambda ids, cache: prompt_passes.append(ids.shape[0]) or prefill(ids, cache)
    target.forward_batch = lambda ids, caches, n: batch_passes.append([t.shape[0] for t in ids]) or forward_batch(
        ids, caches, n)
    return prompt_passes, batch_passes


def _run_joining(engine: Engine, requests: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    """The first two requests start together; each later one joins the running batch a step later."""
    stepper, waiting = BatchStepper(engine.target), list(requests)
    running = [engine.start(*waiting.pop(0)), engine.start(*waiting.pop(0))]
    everyone = list(running)
    while running:
        assert not any(isinstance(r, BaseException) for r in stepper.step(running))
        running = [g for g in running if not g.finished]
        if waiting:
            running.append(engine.start(*waiting.pop(0)))
            everyone.append(running[-1])
    return [g.output().token_ids for g in everyone]


def test_a_joining_request_reads_its_prompt_in_the_batchs_verify_pass(models):
    # Its prompt's rows join the running sequences' verify pass: the weights are read once for
    # both, instead of the batch waiting on a pass for the prompt first.
    target = compact(models["llama"])
    engine = Engine(target, drafter="model", draft_model=compact(models["draft"]))
    prompt_passes, batch_passes = _count_target_passes(target)
    requests = [(prompt, SamplingParams(max_new_tokens=10, num_draft_tokens=2)) for prompt in PROMPTS[:4]]
    outputs = _run_joining(engine, requests)
    assert prompt_passes == []
    assert batch_passes[0] == [len(PROMPTS[0]) + 2, len(PROMPTS[1]) + 2]  # both prompts, and their drafts
    assert batch_passes[1] == [3, 3, len(PROMPTS[2]) + 2]  # a running pair's [last, d1, d2] and a new prompt
    for (prompt, params), out in zip(requests, outputs):
        assert out == engine.start(prompt, params).run().token_ids


def test_long_prompts_and_self_drafts_have_their_prompt_read_before_the_step(models, monkeypatch):
    # A self-draft copies the prompt from the target's cache, so the target reads it first; a
    # prompt over the limit gets a pass of its own (a packed pass takes at most 1024 rows).
    import specdec.generation as generation
    target = compact(models["llama"])
    requests = [(prompt, SamplingParams(max_new_tokens=8, num_draft_tokens=2)) for prompt in PROMPTS[1:4]]
    self_draft = Engine(target, drafter="model", draft_model=compact(models["llama"]))
    prompt_passes, _ = _count_target_passes(target)
    outputs = _run_joining(self_draft, requests)
    assert prompt_passes == [len(p) - 1 for p, _ in requests]
    for (prompt, params), out in zip(requests, outputs):
        assert out == self_draft.start(prompt, params).run().token_ids
    monkeypatch.setattr(generation, "PROMPT_IN_VERIFY_MAX", len(PROMPTS[3]) - 1)
    prompt_passes.clear()
    _run_joining(Engine(target, drafter="model", draft_model=compact(models["draft"])), requests)
    assert prompt_passes == [len(PROMPTS[3]) - 1]


class _BadDrafter(Drafter):
    """Proposes a token id outside the vocabulary: the shared pass fails on it."""

    def propose(self, context, k, params, generator):
        return DraftProposal(torch.tensor([tiny.VOCAB + 5]), None, 1, 1)

    def observe(self, num_accepted):
        pass


class _CrashingDrafter(_BadDrafter):
    def propose(self, context, k, params, generator):
        raise RuntimeError("drafter crashed")


@pytest.mark.parametrize("bad", [_BadDrafter, _CrashingDrafter])
def test_a_failing_request_leaves_the_others_in_its_batch_intact(models, bad):
    target = compact(models["llama"])
    engine = Engine(target, drafter="ngram")
    generations = [engine.start(prompt, SamplingParams(max_new_tokens=15, num_draft_tokens=2)) for prompt in PROMPTS[:4]]
    generations[1].drafter = bad()
    stepper = BatchStepper(target)
    results = stepper.step(generations)
    assert isinstance(results[1], BaseException)
    running = [g for i, g in enumerate(generations) if i != 1]
    while running:
        stepper.step(running)
        running = [g for g in running if not g.finished]
    for i, g in enumerate(generations):
        if i != 1:
            assert g.output().token_ids == reference_greedy(HFCausalLM(models["llama"], "p"), PROMPTS[i], 15)


def _policies(acceptance: float, n: int) -> list[DraftLengthPolicy]:
    policies = []
    for _ in range(n):
        policy = DraftLengthPolicy()
        for _ in range(40):  # accept-history at the given rate: 10 drafts per observation
            policy.record_step(10, round(10 * acceptance) if acceptance < 1 else 10)
        policies.append(policy)
    return policies


def _planner(fixed_s: float, per_row_s: float) -> BatchDraftPlanner:
    planner = BatchDraftPlanner()
    for rows in (8, 16, 48, 96):
        planner.record_verify(rows, fixed_s + per_row_s * rows)
    return planner


def test_planner_drafts_long_when_rows_are_cheap_and_not_at_all_when_they_are_dear():
    cheap = _planner(fixed_s=0.1, per_row_s=0.0001).plan(_policies(0.9, 8), [50] * 8)
    dear = _planner(fixed_s=0.0, per_row_s=0.01).plan(_policies(0.3, 8), [50] * 8)
    assert min(cheap) >= 6
    assert dear == [0] * 8


def test_planner_turns_speculation_down_smoothly_as_rows_get_dearer():
    drafted = [sum(_planner(fixed_s=0.1, per_row_s=per_row).plan(_policies(0.7, 8), [50] * 8))
               for per_row in [0.0] + [0.0005 * 1.15 ** i for i in range(45)]]
    assert drafted[0] > 8 * 3 and drafted[-1] == 0
    assert all(a >= b for a, b in zip(drafted, drafted[1:])), drafted  # monotone
    assert len(set(drafted)) > 6  # through many intermediate levels, no cliff
    assert max(a - b for a, b in zip(drafted, drafted[1:])) <= 8 * 2  # these 8 sequences move alike


def test_planner_gives_more_draft_to_the_sequence_that_accepts_more():
    ks = _planner(fixed_s=0.1, per_row_s=0.002).plan(_policies(0.9, 1) + _policies(0.4, 1), [50, 50])
    assert ks[0] > ks[1]


def test_planner_keeps_fixed_and_seed_bound_k_and_respects_budgets():
    fixed = DraftLengthPolicy(fixed=3)
    seeded = DraftLengthPolicy(timing_free_draft_cost=0.0)
    ks = _planner(0.1, 0.0001).plan([fixed, seeded] + _policies(0.9, 2), [50, 50, 2, 0])
    assert ks[0] == 3 and ks[1] == seeded.next(50)
    assert ks[2] <= 2 and ks[3] == 0


def test_planner_probes_a_sequence_it_left_at_zero():
    planner = _planner(fixed_s=0.01, per_row_s=0.02)  # rows too dear for these drafts, not for a perfect one
    policies = _policies(0.1, 2)
    plans = [planner.plan(policies, [50, 50]) for _ in range(16)]
    assert sum(sum(p) for p in plans) >= 2  # a 1-token probe now and then
    assert sum(sum(p) for p in plans) <= 8


def test_planner_probes_less_often_the_longer_a_sequence_stays_off():
    planner = _planner(fixed_s=0.01, per_row_s=0.02)  # rows too dear for these drafts, not for a perfect one
    policies = _policies(0.1, 1) + _policies(0.95, 1)
    probes = [i for i in range(1, 201) if planner.plan(policies, [50, 50])[0]]
    assert probes[:4] == [8, 24, 56, 120]  # after 8, 16, 32, then 64 steps off
    assert len(probes) == 5


def _model_drafting(acceptance: float, n: int, draft_s_per_token: float) -> list[DraftLengthPolicy]:
    """Policies whose drafts came from a draft model at this cost per token (as a lone probe sees it)."""
    policies = _policies(acceptance, n)
    for policy in policies:
        policy.record_step(1, 1, draft_s=draft_s_per_token)
    return policies


def test_planner_starts_shared_draft_rounds_that_pay_for_the_whole_batch():
    # A GPU at batch 8: verifying 8 or 48 rows costs about the same (5.9 ms vs 6.7), and a
    # draft round costs 1.3 ms whether 1 or 8 sequences draft in it. Charged per token, a lone
    # probe's draft costs 1.3 ms a token, and position-by-position planning drafts nothing.
    planner = BatchDraftPlanner()
    for rows, seconds in ((8, 0.0059), (16, 0.0060), (32, 0.0065), (48, 0.0067)):
        planner.record_verify(rows, seconds)
    policies = _model_drafting(0.8, 8, draft_s_per_token=0.0013)
    assert planner.plan(policies, [50] * 8) == [0] * 8  # per-token costs only: the trap
    for sequences in (1, 8):
        planner.record_draft_rounds(sequences, rounds=3, seconds=3 * 0.0013)
    ks = planner.plan(policies, [50] * 8)
    assert len(set(ks)) == 1 and 2 <= ks[0] <= 6, ks  # every sequence drafts, in shared rounds
    # the same rounds at five times the cost no longer pay: back to plain steps
    dear = BatchDraftPlanner()
    for rows, seconds in ((8, 0.0059), (16, 0.0060), (32, 0.0065), (48, 0.0067)):
        dear.record_verify(rows, seconds)
    for sequences in (1, 8):
        dear.record_draft_rounds(sequences, rounds=3, seconds=3 * 0.0065)
    assert sum(dear.plan(policies, [50] * 8)) <= 1  # a probe at most


def test_planner_round_costs_count_only_the_sequences_still_drafting():
    planner = BatchDraftPlanner()
    planner.record_verify(8, 0.006)
    planner.record_draft_rounds(1, rounds=1, seconds=0.001)
    planner.record_draft_rounds(4, rounds=1, seconds=0.002)
    policies = _model_drafting(0.8, 4, draft_s_per_token=0.001)
    # rounds 1-2 feed 4 sequences, round 3 feeds 1
    assert planner.plan_cost(policies, [2, 2, 3, 2]) == pytest.approx(planner.verify_cost(13) + 2 * 0.002 + 0.001)


def test_planner_does_not_probe_where_no_draft_row_could_pay():
    # Rows that cost what a token earns (a compute-bound pass, no fixed part): even a draft
    # that is always accepted cannot beat plain steps, so probing only costs.
    planner = _planner(fixed_s=0.0, per_row_s=0.01)
    policies = _policies(0.1, 4)
    planner.record_verify(5, 0.05)  # a pass one row longer than these 4 sequences' plain step, measured
    assert all(planner.plan(policies, [50] * 4) == [0] * 4 for _ in range(100))
    unmeasured = _planner(fixed_s=0.0, per_row_s=0.01)  # until it is, probes measure it
    assert sum(sum(unmeasured.plan(policies, [50] * 4)) for _ in range(100)) >= 4
    cheap = _planner(fixed_s=0.05, per_row_s=0.001)  # a fixed cost to share: probes come back
    assert sum(sum(cheap.plan(policies, [50] * 4)) for _ in range(100)) >= 4


def test_planner_counts_the_hosts_overhead_in_a_steps_cost():
    """A step's host work (the GPU idle between verdicts and the next launch) is paid whatever
    k is: counted, it makes the same dear rows worth drafting; left out, they are not."""
    planner = _planner(fixed_s=0.0, per_row_s=0.01)
    assert planner.plan(_policies(0.3, 8), [50] * 8) == [0] * 8
    planner.record_overhead(0.5)
    assert planner.step_overhead == 0.5
    assert sum(planner.plan(_policies(0.3, 8), [50] * 8)) > 0


def test_stepper_learns_the_hosts_overhead_from_steps_without_a_prompt(models):
    target = HFCausalLM(models["llama"], "p")
    engine = Engine(target, drafter="ngram")
    generations = [engine.start(prompt, SamplingParams(max_new_tokens=6)) for prompt in PROMPTS[:3]]
    stepper = BatchStepper(target)
    stepper.step(generations)  # every prompt is read here: no overhead to learn from
    assert stepper.planner.step_overhead == 0.0
    stepper.step(generations)
    assert stepper.planner.step_overhead > 0.0


def test_planner_drafts_below_a_padded_pass_widest_feed_where_a_packed_one_would_not():
    # The GPU's batched graphs pad every feed to the widest: a draft position below it costs
    # the pass nothing, only its draft. Charged a row for it, as a packed pass is, the planner
    # leaves the weaker sequence nearly off and the step slower than it could be.
    padded = BatchLayout(padded_batch=lambda n: n)

    def planner(layout: BatchLayout) -> BatchDraftPlanner:
        planner = BatchDraftPlanner(layout=layout)
        for rows in (2, 4, 6, 8, 10, 12, 16, 20):
            planner.record_verify(rows, 0.005 + 0.0004 * rows)
        return planner

    policies = _model_drafting(0.95, 1, draft_s_per_token=0.0002) + _model_drafting(0.6, 1, draft_s_per_token=0.0002)
    knows, assumes_packed = planner(padded).plan(policies, [50, 50]), planner(PACKED).plan(policies, [50, 50])
    assert knows[0] == assumes_packed[0] and knows[1] > assumes_packed[1] + 2, (knows, assumes_packed)
    truth = planner(padded)
    assert truth._rate(policies, knows) > 1.03 * truth._rate(policies, assumes_packed)
    assert truth.rows([3, 1]) == 8 and planner(PACKED).rows([3, 1]) == 6


def test_one_slow_step_does_not_move_the_planners_k():
    # Costs are medians of recent timings: one step slowed by something else (a collection,
    # the host busy) must not flip the whole batch to another K, as a running mean did.
    planner = BatchDraftPlanner()
    for _ in range(5):
        for width, seconds in ((1, 0.0059), (2, 0.0060), (3, 0.0063), (4, 0.0065), (5, 0.0068), (6, 0.0071)):
            planner.record_verify(8 * width, seconds)
        for sequences in (1, 8):
            planner.record_draft_rounds(sequences, rounds=3, seconds=3 * 0.00126)
    policies = _model_drafting(0.8, 8, draft_s_per_token=0.00016)
    before = planner.plan(policies, [50] * 8)
    assert len(set(before)) == 1 and before[0] >= 2
    planner.record_verify(8 * (before[0] + 1), 0.012)  # one step of that K at twice its cost
    planner.record_draft_rounds(8, rounds=1, seconds=0.005)
    assert planner.plan(policies, [50] * 8) == before
