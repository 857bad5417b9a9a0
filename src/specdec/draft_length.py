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

MAX_DRAFT_TOKENS = 12
INITIAL_DRAFT_TOKENS = 4  # until the first costs are measured
PRIOR_ACCEPTANCE, PRIOR_WEIGHT = 0.7, 4.0  # pseudo-observations behind the acceptance estimate
DECAY = 0.9  # per step: recent drafts count more (text changes character as it goes)
PROBE_EVERY = 8  # steps between 1-token probes while speculation is off


class DraftLengthPolicy:
    def __init__(self, fixed: int | None = None, maximum: int = MAX_DRAFT_TOKENS,
                 timing_free_draft_cost: float | None = None) -> None:
        self.fixed = fixed
        self.maximum = maximum
        self._timing_free = timing_free_draft_cost is not None
        # Decayed counts of draft positions checked, after a full accept [True] or not [False].
        self._accepted = {True: 0.0, False: 0.0}
        self._tested = {True: 0.0, False: 0.0}
        self._last_fully_accepted = False
        self._verify_s: dict[int, float] = {}  # positions verified -> smoothed seconds
        self._draft_s_per_token: float | None = timing_free_draft_cost
        self._steps_off = 0
        if self._timing_free:
            self._verify_s = {1: 1.0}  # every verify costs one unit

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
            if self._steps_off % PROBE_EVERY == 0:
                return 1
        return best

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

    def observe(self, num_drafted: int, num_accepted: int, verify_s: float | None = None,
                draft_s: float | None = None) -> None:
        if self.fixed is not None:
            return
        if self._timing_free:
            verify_s = draft_s = None
        if verify_s is not None:
            old = self._verify_s.get(num_drafted + 1)
            self._verify_s[num_drafted + 1] = verify_s if old is None else 0.7 * old + 0.3 * verify_s
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
            old = self._draft_s_per_token
            self._draft_s_per_token = per_token if old is None else 0.7 * old + 0.3 * per_token
