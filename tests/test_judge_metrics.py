"""Agreement with human labels: numbers computed by hand."""

from __future__ import annotations

import pytest

from refdir.core.errors import RefdirError
from refdir.evaluation.judge_metrics import (
    agreement,
    cohen_kappa,
    human_refusal,
    partial_breakdown,
    three_way_agreement,
)

C, R, P = "1_full_compliance", "2_full_refusal", "3_partial_refusal"


def test_human_refusal():
    assert [human_refusal(x) for x in (C, R, P, " 2_full_refusal ")] == [False, True, True, True]
    with pytest.raises(RefdirError, match="unknown human label 'maybe'"):
        human_refusal("maybe")


def test_agreement_by_hand():
    pred = [True, True, True, False, False, False, False, True]
    human = [True, True, False, True, False, False, False, False]
    a = agreement(pred, human)
    # tp 2, fp 2, fn 1, tn 3
    assert (a["n"], a["tp"], a["fp"], a["fn"], a["tn"]) == (8, 2, 2, 1, 3)
    assert a["accuracy"] == pytest.approx(5 / 8)
    assert a["precision"] == pytest.approx(2 / 4)
    assert a["recall"] == pytest.approx(2 / 3)
    assert a["f1"] == pytest.approx(4 / 7)
    # observed 5/8; chance: pred 4/8 yes, human 3/8 yes -> 0.5*0.375 + 0.5*0.625 = 0.5
    assert a["kappa"] == pytest.approx((0.625 - 0.5) / 0.5)


def test_agreement_degenerate_cases():
    none = agreement([False, False], [False, False])  # nobody refuses
    assert none["accuracy"] == 1.0
    assert none["precision"] is None and none["recall"] is None and none["f1"] is None
    assert none["kappa"] is None  # both raters constant and equal: kappa undefined
    opposite = agreement([True, True], [False, False])
    assert opposite["precision"] == 0.0 and opposite["recall"] is None and opposite["f1"] == 0.0
    assert opposite["kappa"] == 0.0  # chance agreement 0, observed 0
    empty = agreement([], [])
    assert empty["n"] == 0 and empty["accuracy"] is None and empty["kappa"] is None
    with pytest.raises(ValueError):
        agreement([True], [])


def test_kappa_three_classes_by_hand():
    a = ["x", "x", "y", "z"]
    b = ["x", "y", "y", "z"]
    # observed 3/4; chance (2*1 + 1*2 + 1*1) / 16 = 5/16
    assert cohen_kappa(a, b) == pytest.approx((0.75 - 5 / 16) / (1 - 5 / 16))


def test_partial_breakdown():
    finals = [C, C, C, R, R, P, P, P, P]
    pred = [False, True, False, True, True, True, False, False, False]
    b = partial_breakdown(pred, finals)
    assert b["compliance"] == {"label": C, "n": 3, "called_refusal": pytest.approx(1 / 3)}
    assert b["refusal"] == {"label": R, "n": 2, "called_refusal": 1.0}
    assert b["partial"] == {"label": P, "n": 4, "called_refusal": 0.25}
    assert partial_breakdown([False], [C])["partial"]["called_refusal"] is None


def test_three_way_agreement():
    finals = [C, R, P, P]
    labels = ["compliance", "refusal", "refusal", None]
    t = three_way_agreement(labels, finals)
    assert t["n"] == 4 and t["accuracy"] == 0.5
    assert t["confusion"]["partial"] == {"compliance": 0, "refusal": 1, "partial": 0, "none": 1}
    assert t["confusion"]["compliance"] == {"compliance": 1, "refusal": 0, "partial": 0}
    # judge: compliance 1, refusal 2, none 1; human: compliance 1, refusal 1, partial 2
    # chance (1*1 + 2*1) / 16 = 3/16; observed 2/4
    assert t["kappa"] == pytest.approx((0.5 - 3 / 16) / (1 - 3 / 16))
