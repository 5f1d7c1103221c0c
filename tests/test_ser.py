"""SER: selection honours its thresholds and its stopping rule."""

from __future__ import annotations

import math

import pytest

from rlp_core.ser import Selection, confidence, select_pairs, self_label, stop_reason

# confidences 0.95, 0.95, 0.8, 0.75, 0.6, 0.5, 0.9 (the last exactly on the high bar)
PROBS = [0.95, 0.05, 0.8, 0.25, 0.6, 0.5, 0.9]


def test_confidence_is_symmetric():
    assert confidence(0.05) == pytest.approx(0.95) and confidence(0.5) == 0.5


def test_easy_pairs_first():
    sel = select_pairs(PROBS, set(), high=0.9, low=0.7, min_new=2)
    assert sel == Selection("easy", [0, 1, 6], [0, 1, 6])  # the bar is inclusive


def test_moves_to_the_middle_band_when_easy_pairs_run_out():
    sel = select_pairs(PROBS, {0, 1}, high=0.9, low=0.7, min_new=2)  # one new easy pair (6) is too few
    assert sel == Selection("hard", [0, 1, 2, 3, 6], [2, 3, 6])
    assert all(confidence(PROBS[i]) >= 0.7 for i in sel.indices)
    assert all(confidence(PROBS[i]) < 0.7 for i in range(len(PROBS)) if i not in sel.indices)


def test_nothing_new_selects_nothing():
    assert select_pairs(PROBS, {0, 1, 2, 3, 6}, 0.9, 0.7, min_new=1).status == "none"
    assert select_pairs(PROBS, {0, 1, 2, 6}, 0.9, 0.7, min_new=2).status == "none"  # only 3 is new
    assert select_pairs(PROBS, {0, 1, 2, 3, 6}, 0.9, 0.7, min_new=0).status == "none"  # never an empty round


def test_stop_rule():
    easy, none = Selection("easy", [0], [0]), Selection("none", [], [])
    assert stop_reason(1, 3, none, None, 0.6) == "too few new confident pairs"
    assert stop_reason(1, 3, easy, None, 0.6) is None  # selected, not retrained yet
    assert stop_reason(1, 3, easy, 0.55, 0.6) == "held-out accuracy fell"
    assert stop_reason(1, 3, easy, 0.6, 0.6) is None  # no worse: go on
    assert stop_reason(2, 3, easy, 0.7, 0.6) is None
    assert stop_reason(3, 3, easy, 0.7, 0.6) == "max iterations"
    assert stop_reason(1, 3, easy, math.nan, math.nan) is None  # no held-out pairs: that rule cannot fire


def test_self_label_follows_the_rm():
    assert (self_label(("x", "a", "b"), 0.7).chosen, self_label(("x", "a", "b"), 0.7).rejected) == ("a", "b")
    assert (self_label(("x", "a", "b"), 0.2).chosen, self_label(("x", "a", "b"), 0.2).rejected) == ("b", "a")
