"""The goodness-of-fit helper behind the distribution tests can fail, for the reasons it should."""
from __future__ import annotations

import torch

from stats_util import chi2_critical, chi2_statistic

LAW = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0])


def test_samples_from_the_law_pass():
    counts = torch.bincount(torch.multinomial(LAW, 5000, replacement=True, generator=torch.Generator().manual_seed(0)),
                            minlength=5).float()
    stat, df = chi2_statistic(counts, LAW)
    assert stat < chi2_critical(df, 1e-3)


def test_a_single_sample_outside_the_support_fails():
    counts = (LAW * 5000).round()
    counts[4] = 1  # impossible under the law, however rare
    stat, df = chi2_statistic(counts, LAW)
    assert stat > chi2_critical(df, 1e-6)


def test_samples_from_another_law_fail():
    counts = torch.tensor([2000.0, 1800.0, 1200.0, 0.0, 0.0])
    stat, df = chi2_statistic(counts, LAW)
    assert stat > chi2_critical(df, 1e-3)
