"""The tolerant selection checks of tests/selection.py accept every correct choice, whichever
of two tied candidates a kernel keeps, and still fail on a deliberately wrong one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from contrastseg.contrast import select_from_bank
from selection import check_argmax, check_bank_selection, check_semi_hard, check_top_k

EPS = 1e-9


def test_top_k_accepts_either_of_two_tied_candidates():
    scores = torch.tensor([0.9, 0.5, 0.7, 0.7, 0.1], dtype=torch.float64)
    everyone = torch.ones(5, dtype=torch.bool)
    check_top_k(torch.tensor([0, 2]), scores, everyone, 2, EPS)
    check_top_k(torch.tensor([3, 0]), scores, everyone, 2, EPS)  # the other tie, any order
    # a near-tie within eps either way
    near = scores.clone()
    near[3] += 0.5 * EPS
    check_top_k(torch.tensor([0, 2]), near, everyone, 2, EPS)


@pytest.mark.parametrize(
    "picked, message",
    [
        ([0, 1], "a pick scores"),  # 0.5 kept over 0.7
        ([0, 0], "picked twice"),
        ([0, -1], "1 picked, 2 expected"),
        ([0, 4], "a pick scores"),
        ([-1, 0], "1 picked, 2 expected"),
    ],
)
def test_top_k_fails_on_a_wrong_choice(picked, message):
    scores = torch.tensor([0.9, 0.5, 0.7, 0.7, 0.1], dtype=torch.float64)
    with pytest.raises(AssertionError, match=message):
        check_top_k(torch.tensor(picked), scores, torch.ones(5, dtype=torch.bool), 2, EPS)


def test_top_k_fails_when_the_best_is_left_out():
    scores = torch.tensor([1.0, 0.7, 0.7], dtype=torch.float64)
    with pytest.raises(AssertionError, match="unpicked candidate scores"):
        check_top_k(torch.tensor([1, 2]), scores, torch.ones(3, dtype=torch.bool), 2, EPS)


def test_top_k_respects_candidates_and_padding():
    scores = torch.tensor([0.9, 0.5, 0.7, 0.3], dtype=torch.float64)
    cand = torch.tensor([False, True, False, True])
    check_top_k(torch.tensor([1, 3, -1]), scores, cand, 3, EPS)
    with pytest.raises(AssertionError, match="not a candidate"):
        check_top_k(torch.tensor([0, 1, -1]), scores, cand, 3, EPS)
    with pytest.raises(AssertionError, match="padding is not at the end"):
        check_top_k(torch.tensor([1, -1, 3]), scores, cand, 3, EPS)


def test_top_k_compares_sets_at_a_clear_boundary_only():
    scores = torch.tensor([0.9, 0.7, 0.7, 0.1], dtype=torch.float64)
    everyone = torch.ones(4, dtype=torch.bool)
    # tied boundary: another top-2 drawn elsewhere may hold the other tie
    check_top_k(torch.tensor([0, 1]), scores, everyone, 2, EPS, expected=torch.tensor([0, 2]))
    # clear boundary: the set is unique, and a differing "expected" is a failure
    check_top_k(torch.tensor([0, 1, 2]), scores, everyone, 3, EPS, expected=torch.tensor([2, 1, 0]))
    with pytest.raises(AssertionError, match="differs at a clear boundary"):
        check_top_k(
            torch.tensor([0, 1, 2]), scores, everyone, 3, EPS, expected=torch.tensor([0, 1, 3])
        )


def test_semi_hard_accepts_pool_members_and_rejects_others():
    scores = torch.tensor([0.9, 0.8, 0.8, 0.2, 0.1, 0.0], dtype=torch.float64)
    everyone = torch.ones(6, dtype=torch.bool)
    # fraction 0.5 of 6 -> a pool of the best 3; either tie at the pool's edge is fine
    check_semi_hard(torch.tensor([2, 0]), scores, everyone, 2, 0.5, EPS)
    check_semi_hard(torch.tensor([1, 2]), scores, everyone, 2, 0.5, EPS)
    with pytest.raises(AssertionError, match="outside the best 3"):
        check_semi_hard(torch.tensor([0, 3]), scores, everyone, 2, 0.5, EPS)
    with pytest.raises(AssertionError, match="2 picked, 3 expected"):
        check_semi_hard(torch.tensor([0, 1, -1]), scores, everyone, 4, 0.5, EPS)


def _bank_case(seed=0, n=9, m=30, d=6, classes=3):
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    bank = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
    return (
        feats,
        torch.randint(0, classes, (n,), generator=g),
        bank,
        torch.randint(0, classes, (m,), generator=g),
    )


@pytest.mark.parametrize("mode", ["hardest", "semi_hard"])
def test_bank_selection_check_accepts_the_library_and_a_tie_swap(mode):
    feats, labels, bank, bank_labels = _bank_case()
    # a duplicated bank entry: two candidates tie exactly, either may be kept
    bank = torch.cat([bank, bank[:1]])
    bank_labels = torch.cat([bank_labels, bank_labels[:1]])
    g = torch.Generator().manual_seed(3)
    index = select_from_bank(feats, labels, bank, bank_labels, mode, 3, 5, 0.4, generator=g)
    check_bank_selection(index, feats, labels, bank, bank_labels, mode, 3, 5, 0.4, EPS)
    last = bank.shape[0] - 1
    swapped = torch.where(index == 0, last, torch.where(index == last, 0, index))
    check_bank_selection(swapped, feats, labels, bank, bank_labels, mode, 3, 5, 0.4, EPS)


@pytest.mark.parametrize("mode", ["hardest", "semi_hard"])
def test_bank_selection_check_fails_on_a_wrong_pick(mode):
    feats, labels, bank, bank_labels = _bank_case(1)
    index = select_from_bank(
        feats, labels, bank, bank_labels, mode, 3, 5, 0.4, generator=torch.Generator()
    )
    sim = feats @ bank.T
    wrong = index.clone()
    # anchor 0's first negative replaced by its least similar negative
    negatives = torch.nonzero(bank_labels != labels[0]).reshape(-1)
    worst = int(negatives[sim[0, negatives].argmin()])
    assert worst not in index[0].tolist()
    wrong[0, 3] = worst
    with pytest.raises(AssertionError, match="anchor 0 negatives"):
        check_bank_selection(wrong, feats, labels, bank, bank_labels, mode, 3, 5, 0.4, EPS)
    # ... and a positive from the wrong class
    wrong = index.clone()
    wrong[0, 0] = int(negatives[0])
    with pytest.raises(AssertionError, match="anchor 0 positives"):
        check_bank_selection(wrong, feats, labels, bank, bank_labels, mode, 3, 5, 0.4, EPS)


def test_argmax_check():
    scores = np.array([[0.2, 0.5, 0.5], [0.7, 0.1, 0.1], [0.1, 0.4, 0.4 + 1e-12]])
    check_argmax([2, 0, 2], scores.T, 1e-9, axis=0)  # classes first, as (C, H, W) maps
    check_argmax([1, 0, 1], scores, 1e-9, axis=1)  # 0.4 against 0.4 + 1e-12: a near-tie
    with pytest.raises(AssertionError, match="at 1 positions"):
        check_argmax([1, 1, 2], scores, 1e-9, axis=1)
