from __future__ import annotations

import torch

from specdec import SamplingParams
from specdec.drafters.ngram import NGramDrafter

GREEDY = SamplingParams()


def propose(context, k, **kw):
    return NGramDrafter(**kw).propose(torch.tensor(context), k, GREEDY, None).tokens.tolist()


def test_proposes_continuation_of_the_latest_match():
    assert propose([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3], 2) == [7, 8]


def test_prefers_longer_ngrams():
    # "2 3" last followed by 4; the trigram "1 2 3" matches only the earlier occurrence
    assert propose([1, 2, 3, 5, 0, 2, 3, 4, 1, 2, 3], 1) == [5]


def test_continuation_can_be_shorter_than_k_and_empty_without_match():
    assert propose([5, 6, 5], 4) == [6, 5]
    assert propose([1, 2, 3, 4], 3) == []
    assert propose([1], 3) == []
