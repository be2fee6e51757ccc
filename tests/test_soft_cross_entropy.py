"""vlp.models.losses.soft_cross_entropy: the distillation term of ITC / MLM (ALBEF eq. 6), by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlp.models.losses import mlm_loss, soft_cross_entropy


def test_hand_computed_rows():
    # row 0: logits (0, ln 3) -> p = (1/4, 3/4); q = (1/2, 1/2): -(ln(1/4) + ln(3/4)) / 2
    # row 1: logits (0, 0)    -> p = (1/2, 1/2); q = (1, 0):     -ln(1/2)
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    q = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    row0 = -(math.log(0.25) + math.log(0.75)) / 2
    row1 = math.log(2.0)
    assert soft_cross_entropy(logits, q).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    # only the valid rows count
    assert soft_cross_entropy(logits, q, valid=torch.tensor([True, False])).item() == pytest.approx(row0, rel=1e-6)
    # no valid row: exactly 0, still attached to the graph
    logits.requires_grad_(True)
    none = soft_cross_entropy(logits, q, valid=torch.tensor([False, False]))
    assert none.item() == 0.0 and none.requires_grad


def test_class_axis_and_one_hot_equals_cross_entropy():
    """simla_vlmixer.md §4 test 7: with one-hot targets it is F.cross_entropy over the LAST axis of a (2, 3, 5)
    tensor (the ALBEF / SIMLA typo took the softmax over dim=1)."""
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([[0, 4, 2], [1, 1, 3]])
    one_hot = F.one_hot(y, 5).float()
    expected = F.cross_entropy(logits.reshape(-1, 5), y.reshape(-1))
    torch.testing.assert_close(soft_cross_entropy(logits, one_hot), expected)
    assert not torch.allclose(soft_cross_entropy(logits, one_hot, dim=1), expected)
    # dim moves the class axis: classes on dim 1 of a (B, C, T) tensor
    torch.testing.assert_close(soft_cross_entropy(logits.transpose(1, 2), one_hot.transpose(1, 2), dim=1), expected)


def test_mlm_loss_soft_term_is_soft_cross_entropy_over_labelled_positions():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 6, generator=g)
    soft = torch.softmax(torch.randn(2, 4, 6, generator=g), dim=-1)
    labels = torch.tensor([[1, -100, 3, -100], [-100, 5, -100, -100]])
    valid = labels != -100
    hard = F.cross_entropy(logits[valid], labels[valid])
    soft_ce = -(soft[valid] * torch.log_softmax(logits[valid], dim=-1)).sum(-1).mean()
    got = mlm_loss(logits, labels, soft_targets=soft, alpha=0.4)
    torch.testing.assert_close(got, 0.6 * hard + 0.4 * soft_ce)
    torch.testing.assert_close(soft_cross_entropy(logits, soft, valid=valid), soft_ce)
