"""How many tokens to draft next: fixed, or the k that maximises expected tokens per second.

With per-token acceptance a, drafting k tokens yields E(k) = (1 - a^(k+1)) / (1 - a) tokens
(accepted prefix plus the target's own) for a cost of T_verify(k+1) + k * T_draft. Both
costs are measured as the generation runs, because they are not constants: on a 2-core CPU
verifying 6 positions of Gemma 3 270M costs about what 1 does, 11 cost nearly twice that,
and a self-draft step costs a fifth of a target step while an n-gram lookup costs nothing.
The policy therefore picks k where the curve is cheap and a is high, and drafts nothing
(plain decoding, with an occasional 1-token probe to keep measuring a) where it cannot pay.

Acceptance is bursty: a lookup that copies a passage keeps being right until the passage
ends, and is mostly wrong elsewhere. So a is estimated separately after a fully accepted
draft and after a rejection; one accepted probe switches the policy to the first estimate.

Seeded sampling must reproduce its sample, and k decides which random draws are made, so
there the policy uses fixed costs instead of timings (`timing_free_draft_cost`: a draft
token's cost relative to a verify pass, from estimated compute) and k depends only on the
accepted tokens, which the seed determines.
"""
from __future__ import annotations

import math
import statistics
from collections import deque

from .backends.base import PACKED, BatchLayout
from .sampling_params import MAX_DRAFT_TOKENS

INITIAL_DRAFT_TOKENS = 4  # until the first costs are measured
PRIOR_ACCEPTANCE, PRIOR_WEIGHT = 0.7, 4.0  # pseudo-observations behind the acceptance estimate
DECAY = 0.9  # per step: recent drafts count more (text changes character as it goes)
PROBE_EVERY = 8  # steps between 1-token probes while speculation is off (at the least)
# ... and as many more as keep probes within this share of plain decoding's time: on llama.cpp
# a 2-position verify costs ~2 one-position steps, and probing every 8th step cost ~10 %.
PROBE_BUDGET = 0.03
# In a batch, a sequence left at k = 0 probes after 8, then 16, 32, 64 more steps: each probe
# makes its draft catch up on every token since the last, which a busy step cannot hide.
MAX_PROBE_INTERVAL = 64
RECENT = 9  # timings per count behind the batch planner's costs (their median)
PROBE_HOPE = 0.95  # the acceptance a probe could find at best: a text the draft copies


class CostMemory:
    """What verifying and drafting cost for one target and drafter, kept across generations.

    Costs belong to the model and the machine, not to a request: a generation that learned
    them from scratch spent its first steps trying draft lengths whose cost it did not know
    (on llama.cpp, verifying 5 positions of Gemma 3 270M costs ~4 one-position steps), which
    a 64-token answer never earns back. Acceptance stays per generation: it is the text's."""

    def __init__(self) -> None:
        self.verify_s: dict[int, float] = {}  # positions verified -> smoothed seconds
        self.draft_s_per_token: float | None = None


class DraftLengthPolicy:
    def __init__(self, fixed: int | None = None, maximum: int = MAX_DRAFT_TOKENS,
                 timing_free_draft_cost: float | None = None, costs: CostMemory | None = None) -> None:
        """costs: a memory shared with earlier and later generations of the same target and
        drafter (ignored when k is bound to a seed, which must not depend on timings)."""
        self.fixed = fixed
        self.maximum = maximum
        self._timing_free = timing_free_draft_cost is not None
        # Decayed counts of draft positions checked, after a full accept [True] or not [False].
        self._accepted = {True: 0.0, False: 0.0}
        self._tested = {True: 0.0, False: 0.0}
        self._last_fully_accepted = False
        self._costs = CostMemory() if costs is None or self._timing_free else costs
        self._verify_s = self._costs.verify_s  # shared: every generation's timings refine it
        self._draft_s_per_token: float | None = (timing_free_draft_cost if self._timing_free
                                                 else self._costs.draft_s_per_token)
        self._steps_off = 0
        self._probe_at = PROBE_EVERY
        self._resume_s: float | None = None  # a draft after steps without one: it catches up first
        if self._timing_free:
            self._verify_s[1] = 1.0  # every verify costs one unit

    @property
    def acceptance(self) -> float:
        """Estimated per-token acceptance for the next draft, given how the last one fared."""
        state = self._last_fully_accepted
        return (self._accepted[state] + PRIOR_ACCEPTANCE * PRIOR_WEIGHT) / (self._tested[state] + PRIOR_WEIGHT)

    def next(self, budget: int) -> int:
        """Draft length for the next step, given room for `budget` more draft tokens."""
        limit = max(0, min(self.maximum, budget))
        if self.fixed is not None:
            return min(self.fixed, limit)
        if not self._verify_s:
            return min(INITIAL_DRAFT_TOKENS, limit)
        rates = [self.expected_tokens(k) / self.expected_cost(k) for k in range(limit + 1)]
        best = max(range(limit + 1), key=rates.__getitem__)
        if best == 0 and limit:
            self._steps_off += 1
            if self._steps_off >= self._probe_at:
                self._probe_at = self._steps_off + self._probe_interval()
                return 1
        elif best:
            self._steps_off, self._probe_at = 0, PROBE_EVERY
        return best

    def _probe_interval(self) -> int:
        """Steps between probes: PROBE_EVERY, or more where a probe (its extra verified position
        and its draft, which includes catching the draft up on the tokens since the last one)
        costs more than PROBE_BUDGET of a step per step between probes. The distilled draft
        beside a llama.cpp target spent ~18 ms a probe against 12.5 ms steps: 0.78x plain."""
        one = self._verify_cost(1)
        draft = self._resume_s if self._resume_s is not None else (self._draft_s_per_token or 0.0)
        extra = self._verify_cost(2) - one + draft
        if one <= 0 or extra <= 0:
            return PROBE_EVERY
        return max(PROBE_EVERY, math.ceil(extra / (PROBE_BUDGET * one)))

    @property
    def measured_positions(self) -> list[int]:
        """Verify sizes (positions) whose cost this policy knows, its own runs' or earlier ones'."""
        return sorted(self._verify_s)

    @property
    def adaptive(self) -> bool:
        """False when k is fixed by the request, or bound to the seed (timing-free)."""
        return self.fixed is None and not self._timing_free

    @property
    def draft_cost_per_token(self) -> float:
        """Smoothed seconds per drafted token (0 until measured, and for free drafters)."""
        return self._draft_s_per_token or 0.0

    def expected_tokens(self, k: int) -> float:
        a = min(self.acceptance, 0.999)
        return (1.0 - a ** (k + 1)) / (1.0 - a)

    def expected_cost(self, k: int) -> float:
        return self._verify_cost(k + 1) + k * (self._draft_s_per_token or 0.0)

    def _verify_cost(self, positions: int) -> float:
        if positions in self._verify_s:
            return self._verify_s[positions]
        # Unmeasured: assume the nearest measured smaller count's cost (optimistic, so the
        # policy tries it once and learns), else the smallest measured.
        below = [n for n in self._verify_s if n < positions]
        return self._verify_s[max(below)] if below else min(self._verify_s.values())

    def record_step(self, num_drafted: int, num_accepted: int, verify_s: float | None = None,
                draft_s: float | None = None, resume_s: float | None = None) -> None:
        """resume_s: the seconds of a draft that first caught the draft model up on the tokens
        since its last draft (kept apart: it is what a probe costs, not a drafted token)."""
        if self.fixed is not None:
            return
        if self._timing_free:
            verify_s = draft_s = resume_s = None
        if resume_s is not None:
            self._resume_s = _smoothed(self._resume_s, resume_s)
        if verify_s is not None:
            self._verify_s[num_drafted + 1] = _smoothed(self._verify_s.get(num_drafted + 1), verify_s)
        if num_drafted == 0:
            return
        # A draft is checked position by position up to its first rejection.
        tested = num_accepted + (1 if num_accepted < num_drafted else 0)
        state = self._last_fully_accepted
        self._accepted[state] = DECAY * self._accepted[state] + num_accepted
        self._tested[state] = DECAY * self._tested[state] + tested
        self._last_fully_accepted = num_accepted == num_drafted
        if draft_s is not None:
            per_token = draft_s / num_drafted
            self._draft_s_per_token = _smoothed(self._draft_s_per_token, per_token)
            # The memory's estimate moves slower: a hybrid drafter's cost per token depends on
            # how often the text lets the free lookup draft, which is the request's.
            self._costs.draft_s_per_token = _smoothed(self._costs.draft_s_per_token, per_token, weight=0.1)


class BatchDraftPlanner:
    """k for every sequence of a batch that verifies in one target pass.

    Under load the verify pass is no longer a fixed cost: each drafted position adds a row
    to a pass over every sequence, and on a busy pass a row costs real compute. So k is
    chosen for the batch as a whole, to maximise expected tokens per second of the step:

        rate = sum_i E_i(k_i) / (T_verify(rows) + sum_i k_i * T_draft_i)

    where rows are what the target's pass computes for feeds of k_i + 1 tokens (`layout`):
    their sum where it packs them (llama.cpp, the compact decoder), the batch times the widest
    where it pads them (the GPU's batched graphs).

    Draft positions are added one at a time, each to the sequence whose next position
    gains most per second of cost (sequence i's (k_i+1)-th draft adds a_i^(k_i+1) expected
    tokens), while the rate still rises. As the pass gets dearer or acceptance falls,
    positions drop out one by one down to plain decoding (every k_i = 0): no cliff.

    T_verify(rows) is measured per row count and interpolated; outside what was measured
    it is extended at the measured slope (flat until two counts are known, which makes
    the planner try a longer pass once and learn its cost).

    A draft model's passes are shared too: each round feeds every sequence still drafting
    in one pass, and on a GPU a round of eight costs what a round of one does. Charged per
    token, a round looks as dear to one sequence as to eight, and adding positions one at a
    time never starts the rounds that would pay for all of them (a lone probe's draft then
    looks dear, which keeps speculation off). So once round costs are measured (T_round of
    m sequences, `record_draft_rounds`), a plan's draft cost is the sum of its rounds'
    (round r feeds the m_r sequences with k >= r), and plans giving every flexible sequence
    the same K rounds compete with the position-by-position plan. Sequences whose k is fixed
    (by the request, or by a seed that must reproduce) keep their own. A sequence left at 0
    gets a 1-token probe now and then, less often the longer it stays off (_probe).
    """

    def __init__(self, maximum: int = MAX_DRAFT_TOKENS, layout: BatchLayout = PACKED) -> None:
        self.maximum = maximum
        self.layout = layout  # the target's: what rows a pass computes (BatchStepper sets it)
        # Costs are medians of the last RECENT timings per count, not running means: a batch's
        # step times have outliers (a collection, a joining request's catch-up, the host busy
        # when a pass ends), and one that lingers in one count's cost flips the plan to the
        # next K (on an H100 at load 8, verifying 32 rows read 9.1 ms beside 8.2 for 40).
        self._verify_s: dict[int, float] = {}  # rows in the pass -> seconds
        self._verify_recent: dict[int, deque[float]] = {}
        self._overhead_s: float | None = None  # a step's host work outside its passes (record_overhead)
        self._round_s: dict[int, float] = {}  # sequences in a draft-model round -> seconds
        self._round_recent: dict[int, deque[float]] = {}
        self._steps_off: dict[int, int] = {}  # id(policy) -> consecutive steps with k = 0
        self._probe_at: dict[int, tuple[int, int]] = {}  # id(policy) -> (steps off at next probe, interval)

    def plan(self, policies: list[DraftLengthPolicy], budgets: list[int]) -> list[int]:
        """One k per sequence; budgets: room left for draft tokens (see DraftLengthPolicy.next)."""
        ks = [0] * len(policies)
        flexible = []
        for i, (policy, budget) in enumerate(zip(policies, budgets)):
            if policy.adaptive:
                flexible.append(i)
            else:
                ks[i] = policy.next(budget)
        if not self._verify_s:  # nothing measured yet: start where a lone sequence starts
            for i in flexible:
                ks[i] = min(INITIAL_DRAFT_TOKENS, self.maximum, max(0, budgets[i]))
            return ks
        rows = self.rows(ks)
        tokens = sum(policy.expected_tokens(k) for policy, k in zip(policies, ks))  # E(0) = 1: a plain step
        cost = self.step_overhead + self.verify_cost(rows) + sum(
            policy.draft_cost_per_token * k for policy, k in zip(policies, ks))
        while True:
            # Padded passes: a position below the widest feed is free to verify, one above it
            # costs a row per sequence; packed ones: a row each.
            widest = max(ks) + 1
            added = {True: self.layout.added_rows(len(ks), widest, widest),
                     False: self.layout.added_rows(len(ks), widest - 1, widest)}
            now = self.verify_cost(rows)
            row_s = {n: self.verify_cost(rows + n) - now for n in set(added.values())}
            added_s = {at: row_s[n] for at, n in added.items()}
            best, best_gain, best_cost, best_rows = None, 0.0, 0.0, 0
            for i in flexible:
                if ks[i] >= min(self.maximum, budgets[i]):
                    continue
                at_widest = ks[i] + 1 == widest
                gain = min(policies[i].acceptance, 0.999) ** (ks[i] + 1)
                extra = added_s[at_widest] + policies[i].draft_cost_per_token
                if best is None or gain * best_cost > best_gain * extra:
                    best, best_gain, best_cost, best_rows = i, gain, extra, added[at_widest]
            if best is None or (tokens + best_gain) * cost <= tokens * (cost + best_cost):
                break
            ks[best] += 1
            rows, tokens, cost = rows + best_rows, tokens + best_gain, cost + best_cost
        if self._round_s and flexible:
            ks = self._best_uniform_plan(policies, ks, budgets, flexible)
        return self._probe(policies, budgets, flexible, ks)

    def _a_row_could_pay(self, policies: list[DraftLengthPolicy], ks: list[int], probed: int) -> bool:
        """Whether a probe's draft position (sequence `probed`'s), accepted with the best
        acceptance we plan for (PROBE_HOPE), would raise this plan's tokens per second. Until
        the pass it makes has been measured it might: extrapolated across loads, a row's cost
        also carries each sequence's own overhead, and a probe is what measures it."""
        rows = self.rows(ks)
        grown = self.rows([k + (i == probed) for i, k in enumerate(ks)])
        if grown not in self._verify_s:
            return True
        tokens = sum(policy.expected_tokens(k) for policy, k in zip(policies, ks))
        cost = self.plan_cost(policies, ks)
        extra = self.verify_cost(grown) - self.verify_cost(rows)
        return PROBE_HOPE * cost > tokens * extra

    def _best_uniform_plan(self, policies: list[DraftLengthPolicy], ks: list[int], budgets: list[int],
                           flexible: list[int]) -> list[int]:
        """`ks`, or the plan giving every flexible sequence the same K rounds if one is faster.
        The rate is near unimodal in K: stop once two K in a row did worse."""
        best, best_rate, worse = ks, self._rate(policies, ks), 0
        for rounds in range(1, self.maximum + 1):
            plan = list(ks)
            for i in flexible:
                plan[i] = min(rounds, max(0, budgets[i]))
            rate = self._rate(policies, plan)
            if rate > best_rate:
                best, best_rate, worse = plan, rate, 0
            else:
                worse += 1
                if worse == 2:
                    break
        return best

    def _rate(self, policies: list[DraftLengthPolicy], ks: list[int]) -> float:
        """Expected tokens per second of a step with these draft lengths."""
        tokens = sum(policy.expected_tokens(k) for policy, k in zip(policies, ks))
        return tokens / max(self.plan_cost(policies, ks), 1e-9)

    def plan_cost(self, policies: list[DraftLengthPolicy], ks: list[int]) -> float:
        """Seconds of a step: the host's overhead, the verify pass, and the draft rounds (or
        per-token draft costs until rounds are measured; model-free drafters cost nothing per round)."""
        drafting = [k for policy, k in zip(policies, ks) if k and policy.draft_cost_per_token > 0]
        if self._round_s:
            draft = sum(self.round_cost(sum(1 for k in drafting if k >= r)) for r in range(1, max(drafting, default=0) + 1))
        else:
            draft = sum(policy.draft_cost_per_token * k for policy, k in zip(policies, ks))
        return self.step_overhead + self.verify_cost(self.rows(ks)) + draft

    def rows(self, ks: list[int]) -> int:
        """Rows of the verify pass for these draft lengths, as the target lays them out."""
        return self.layout.rows([k + 1 for k in ks])

    def record_overhead(self, seconds: float) -> None:
        """A step's time outside its verify pass and draft rounds: the host's work between a
        step's verdicts and its next launch, while the GPU idles. Every step pays it whatever
        k is, so it is part of what a step's tokens are divided by: left out, the planner
        drafts too little wherever the host's share of a step is large (a busy GPU server)."""
        self._overhead_s = _smoothed(self._overhead_s, max(0.0, seconds), weight=0.1)

    @property
    def step_overhead(self) -> float:
        return self._overhead_s or 0.0

    def record_draft_rounds(self, sequences: float, rounds: int, seconds: float) -> None:
        """A step's draft-model passes: `rounds` rounds of `sequences` sequences on average
        took `seconds` in all."""
        if rounds and sequences:
            key = max(1, round(sequences))
            self._round_s[key] = _recent_median(self._round_recent, key, seconds / rounds)

    def round_cost(self, sequences: int) -> float:
        """Seconds of a draft round feeding this many sequences. Beyond the largest count
        measured it stays flat (optimistic: a GPU round's cost barely grows), so the planner
        tries a round that big once and learns its cost."""
        return _interpolated(self._round_s, min(sequences, max(self._round_s)))

    def _probe(self, policies, budgets, flexible, ks) -> list[int]:
        # A sequence left at k = 0 still needs an acceptance estimate that can recover.
        # Probes back off (PROBE_EVERY, doubling to MAX_PROBE_INTERVAL) while it stays off.
        # Where even a draft token that is always accepted would not pay for its row (a
        # compute-bound pass: on 2 CPU cores at 32 sequences a row costs what a token
        # earns), what a probe learns cannot change the plan: no probe, plain steps.
        hopeless = None  # decided at the first sequence due a probe
        seen = {id(policies[i]) for i in flexible}
        self._steps_off = {key: n for key, n in self._steps_off.items() if key in seen}
        self._probe_at = {key: at for key, at in self._probe_at.items() if key in seen}
        for i in flexible:
            key = id(policies[i])
            if ks[i] > 0:
                self._steps_off.pop(key, None)
                self._probe_at.pop(key, None)
                continue
            off = self._steps_off[key] = self._steps_off.get(key, 0) + 1
            at, interval = self._probe_at.get(key, (PROBE_EVERY, PROBE_EVERY))
            due = budgets[i] > 0 and off >= at
            if due and hopeless is None:
                hopeless = not self._a_row_could_pay(policies, ks, i)
            if due and not hopeless:
                ks[i] = 1
                interval = min(2 * interval, MAX_PROBE_INTERVAL)
                at = off + interval
            self._probe_at[key] = (at, interval)
        return ks

    def record_verify(self, rows: int, seconds: float) -> None:
        self._verify_s[rows] = _recent_median(self._verify_recent, rows, seconds)

    def verify_cost(self, rows: int) -> float:
        return _interpolated(self._verify_s, rows)


def _interpolated(table: dict[int, float], x: int) -> float:
    """A measured cost at count x: interpolated between measured counts; beyond them
    extended at the least-squares slope (flat until two counts are known)."""
    if x in table:
        return table[x]
    counts = sorted(table)
    below = [n for n in counts if n < x]
    above = [n for n in counts if n > x]
    if below and above:
        lo, hi = below[-1], above[0]
        w = (x - lo) / (hi - lo)
        return (1 - w) * table[lo] + w * table[hi]
    edge = below[-1] if below else above[0]
    return max(0.0, table[edge] + _slope(table) * (x - edge))


def _slope(table: dict[int, float]) -> float:
    """Least-squares cost per count over the measured counts (0 with fewer than two)."""
    if len(table) < 2:
        return 0.0
    xs, ys = list(table), list(table.values())
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var)


def _recent_median(recent: dict[int, deque[float]], key: int, seconds: float) -> float:
    timings = recent.setdefault(key, deque(maxlen=RECENT))
    timings.append(seconds)
    return statistics.median(timings)


def _smoothed(old: float | None, new: float, weight: float = 0.3) -> float:
    """An exponentially smoothed timing: `new` counts `weight`, the history the rest."""
    return new if old is None else (1.0 - weight) * old + weight * new
