"""The k policy drafts where it pays, by the measured costs, and turns speculation off where it cannot."""
from __future__ import annotations

import pytest

from specdec.draft_length import INITIAL_DRAFT_TOKENS, PROBE_EVERY, CostMemory, DraftLengthPolicy

# Measured shape on the project's 2-core CPU (Gemma 3 270M): flat to 6 positions, then rising.
VERIFY_S = {1: 0.125, 2: 0.102, 3: 0.117, 4: 0.122, 5: 0.113, 6: 0.126, 7: 0.154, 8: 0.142, 9: 0.168,
            10: 0.175, 11: 0.218, 12: 0.235, 13: 0.287}


def _trained(acceptance_pattern: list[tuple[int, int]], draft_s_per_token: float) -> DraftLengthPolicy:
    policy = DraftLengthPolicy()
    for positions, seconds in VERIFY_S.items():
        policy.record_step(positions - 1, 0, verify_s=seconds)  # teach the verify curve (no drafts)
    for drafted, accepted in acceptance_pattern:
        policy.record_step(drafted, accepted, verify_s=VERIFY_S[drafted + 1], draft_s=drafted * draft_s_per_token)
    return policy


def _best_by_brute_force(policy: DraftLengthPolicy, limit: int) -> int:
    return max(range(limit + 1), key=lambda k: policy.expected_tokens(k) / policy.expected_cost(k))


def test_starts_at_the_initial_length_and_respects_the_budget():
    policy = DraftLengthPolicy()
    assert policy.next(budget=100) == INITIAL_DRAFT_TOKENS
    assert policy.next(budget=2) == 2
    assert policy.next(budget=0) == 0


def test_fixed_length_never_changes():
    policy = DraftLengthPolicy(fixed=3)
    policy.record_step(3, 0, verify_s=1.0, draft_s=1.0)
    assert policy.next(budget=10) == 3 and policy.next(budget=1) == 1


def test_high_acceptance_and_free_drafts_stay_where_verifying_is_cheap():
    policy = _trained([(4, 4)] * 20, draft_s_per_token=0.0)
    k = policy.next(budget=100)
    assert k == _best_by_brute_force(policy, 12)
    assert 5 <= k <= 9  # past 9 the verify curve makes more drafts a loss even at ~97 % acceptance


def test_costly_draft_with_low_acceptance_turns_speculation_off_but_keeps_probing():
    policy = _trained([(4, 0)] * 20, draft_s_per_token=0.12)
    picks = [policy.next(budget=100) for _ in range(64)]
    # a probe now and then (rarer than every PROBE_EVERY steps: each costs a costly draft)
    assert set(picks) == {0, 1} and 1 <= picks.count(1) < 64 // PROBE_EVERY


def test_acceptance_counts_positions_up_to_the_first_rejection():
    policy = DraftLengthPolicy()
    for _ in range(200):
        policy.record_step(4, 2)  # two accepted, the third rejected, the fourth never checked
    assert policy.acceptance == pytest.approx(2 / 3, abs=0.01)


def test_cheap_draft_raises_k_against_an_expensive_one():
    cheap = _trained([(6, 5)] * 20, draft_s_per_token=0.005).next(budget=100)
    costly = _trained([(6, 5)] * 20, draft_s_per_token=0.06).next(budget=100)
    assert cheap > costly >= 1


def test_timing_free_policy_ignores_timings_so_seeded_samples_repeat():
    a, b = DraftLengthPolicy(timing_free_draft_cost=0.2), DraftLengthPolicy(timing_free_draft_cost=0.2)
    picks_a, picks_b = [], []
    for (policy, picks, slow) in ((a, picks_a, 1.0), (b, picks_b, 50.0)):
        for accepted in (3, 4, 1, 4, 4, 0, 2):
            k = policy.next(budget=100)
            picks.append(k)
            policy.record_step(k, min(accepted, k), verify_s=slow * (k + 1), draft_s=slow * k)
    assert picks_a == picks_b and max(picks_a) > 0


def test_bursty_acceptance_drafts_long_inside_a_copied_span_and_short_outside():
    # Lookup-like history: runs of fully accepted drafts (copying) and runs of rejections.
    pattern = ([(4, 4)] * 6 + [(4, 0)] * 6) * 4
    policy = _trained(pattern, draft_s_per_token=0.0)
    after_reject = policy.next(budget=100)
    policy.record_step(4, 4, verify_s=VERIFY_S[5])
    after_full_accept = policy.next(budget=100)
    assert after_full_accept >= 5 > after_reject


# Measured through llama.cpp on the same CPU (Gemma 3 270M Q4_K_M, logits at every position):
# each verified position costs about another step.
LLAMA_CPP_VERIFY_S = {1: 0.0137, 2: 0.0265, 3: 0.0424, 4: 0.0351, 5: 0.0530}


def test_a_new_generation_starts_from_the_costs_earlier_generations_measured():
    memory = CostMemory()
    first = DraftLengthPolicy(costs=memory)
    assert first.next(budget=100) == INITIAL_DRAFT_TOKENS  # nothing known yet
    for positions, seconds in LLAMA_CPP_VERIFY_S.items():
        first.record_step(positions - 1, 0, verify_s=seconds)
    second, fresh = DraftLengthPolicy(costs=memory), DraftLengthPolicy()
    assert second.measured_positions == [1, 2, 3, 4, 5] and fresh.measured_positions == []
    # At the prior acceptance (0.7) no k pays on this curve: the new generation starts plain
    # instead of paying for a 5-position verify to learn what the first one already knew.
    assert second.next(budget=100) == 0 == _best_by_brute_force(second, 4)
    assert fresh.next(budget=100) == INITIAL_DRAFT_TOKENS
    # and what it measures refines the shared memory for the next one
    second.record_step(1, 1, verify_s=0.0300, draft_s=0.004)
    assert memory.verify_s[2] == pytest.approx(0.7 * 0.0265 + 0.3 * 0.0300)
    assert memory.draft_s_per_token == pytest.approx(0.004)


def test_a_seeded_policy_neither_reads_nor_writes_the_shared_costs():
    memory = CostMemory()
    memory.verify_s.update(LLAMA_CPP_VERIFY_S)
    seeded = DraftLengthPolicy(timing_free_draft_cost=0.2, costs=memory)
    assert seeded.measured_positions == [1]  # its own unit cost only
    seeded.record_step(2, 1, verify_s=9.0, draft_s=9.0)
    assert memory.verify_s == LLAMA_CPP_VERIFY_S and memory.draft_s_per_token is None


def test_an_engine_hands_each_request_the_costs_its_earlier_requests_measured(target_llama, self_draft_llama):
    from specdec import Engine
    from specdec.sampling_params import SamplingParams

    engine = Engine(target_llama, drafter="model", draft_model=self_draft_llama)
    params = SamplingParams(max_new_tokens=16)
    first = engine.start([1, 5, 9, 33], params)
    assert first.policy.measured_positions == []
    first.run()
    second = engine.start([1, 7, 7, 7], params)
    assert second.policy.measured_positions == first.policy.measured_positions != []
    # another drafter is another cost curve: it starts from nothing
    assert engine.with_drafter("ngram").start([1, 7, 7, 7], params).policy.measured_positions == []


def test_probes_are_rarer_where_a_probe_costs_a_whole_extra_step():
    def probes_in(verify_s: dict[int, float], steps: int, draft_fraction: float = 0.3) -> int:
        policy = DraftLengthPolicy()
        for positions, seconds in verify_s.items():
            policy.record_step(positions - 1, 0, verify_s=seconds)
        for _ in range(60):  # nothing accepted lately: speculation is off
            policy.record_step(1, 0, draft_s=draft_fraction * verify_s[1])
        picks = [policy.next(budget=100) for _ in range(steps)]
        assert set(picks) <= {0, 1}
        return picks.count(1)

    # Where a second position is nearly free (the CPU torch path, the GPU), the probe's cost is
    # its draft's (here 0.3 of a step, enough to keep speculation off): a probe every 11 steps
    # keeps that under PROBE_BUDGET, a little rarer than every PROBE_EVERY.
    assert 4 <= probes_in({1: 0.100, 2: 0.101}, 64) < 64 // PROBE_EVERY
    llama_cpp = probes_in(LLAMA_CPP_VERIFY_S, 64)
    assert 1 <= llama_cpp <= 3
    # A draft that costs more than a step per token (catching up on the tokens since its last
    # draft), beside a nearly free second position: rare probes too.
    assert 1 <= probes_in({1: 0.100, 2: 0.101}, 64, draft_fraction=1.5) <= 2


def test_a_costly_resume_makes_probes_rarer_than_its_per_token_cost_would():
    """A draft model resuming after steps without drafts first catches up on their tokens (the
    distilled draft beside llama.cpp: ~18 ms against 12.5 ms steps). That is what a probe
    costs, and it spaces the probes; its per-token cost while drafting stays what it was."""
    def probes(resume_s: float | None) -> int:
        policy = DraftLengthPolicy()
        policy.record_step(0, 0, verify_s=0.100)
        policy.record_step(1, 0, verify_s=0.101)
        for _ in range(60):
            policy.record_step(1, 0, draft_s=0.03, resume_s=resume_s)
        assert policy.draft_cost_per_token == pytest.approx(0.03)
        return [policy.next(budget=100) for _ in range(64)].count(1)

    assert probes(None) >= 4
    assert 1 <= probes(0.15) <= 2
