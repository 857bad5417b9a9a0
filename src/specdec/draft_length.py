"""How many tokens to draft next: fixed, or adapted to how well recent drafts fared."""
from __future__ import annotations


class DraftLengthPolicy:
    """Adaptive k (the heuristic of HF's assisted generation): +2 after a fully accepted
    draft, -1 after a rejection, within [minimum, maximum]. A fixed k never changes."""

    def __init__(self, fixed: int | None = None, initial: int = 4, minimum: int = 1, maximum: int = 10) -> None:
        self.fixed = fixed
        self.minimum, self.maximum = minimum, maximum
        self._k = fixed if fixed is not None else initial

    def next(self, budget: int) -> int:
        """Draft length for the next step, given room for `budget` more draft tokens."""
        return max(0, min(self._k, budget))

    def observe(self, num_drafted: int, num_accepted: int) -> None:
        if self.fixed is not None or num_drafted == 0:
            return
        if num_accepted == num_drafted:
            self._k = min(self.maximum, self._k + 2)
        else:
            self._k = max(self.minimum, self._k - 1)
