"""Goodness-of-fit helpers for distribution tests (no scipy needed)."""
from __future__ import annotations

import math

import torch


def chi2_critical(df: int, alpha: float) -> float:
    """Upper alpha quantile of chi-square(df), Wilson-Hilferty approximation (good for df >= 3)."""
    z = _normal_quantile(1 - alpha)
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _normal_quantile(p: float) -> float:
    # Acklam's rational approximation is overkill here; bisection on erf is exact enough.
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def chi2_statistic(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson chi-square of observed counts against probabilities; rare cells are pooled.
    A count where the probability is zero is impossible under the law: the statistic is then
    infinite (pooling would hide it among the rare cells, or drop it with the empty ones)."""
    if bool((counts[probs <= 0] > 0).any()):
        return math.inf, max(int((probs > 0).sum()) - 1, 1)
    n = counts.sum()
    expected = probs * n
    big = expected >= min_expected
    obs = torch.cat([counts[big].double(), counts[~big].double().sum().view(1)])
    exp = torch.cat([expected[big].double(), expected[~big].double().sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return float(((obs - exp) ** 2 / exp).sum()), int(keep.sum()) - 1
