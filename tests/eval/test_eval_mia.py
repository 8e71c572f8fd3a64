"""Membership inference: ROC statistics against sklearn and hand-built curves, bootstrap CIs with known answers,
and the attack statistics (loss, zlib, Min-K%, reference) on hand-computed examples, whole and sensitive-only."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privtune.corpora import Record, Span
from privtune.eval.mia import MIAInputs, attack_scores, membership_inference, min_k_mean
from privtune.eval.scoring import TokenScores
from privtune.eval.stats import roc_auc, roc_curve, roc_metrics, tpr_at_fpr

# Small integers make ties between members and non-members common.
scores = st.lists(st.integers(-5, 5).map(float) | st.floats(-3, 3, allow_nan=False), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(scores, scores)
def test_auc_matches_sklearn(members, nonmembers):
    from sklearn.metrics import roc_auc_score

    labels = [1] * len(members) + [0] * len(nonmembers)
    assert roc_auc(members, nonmembers) == pytest.approx(roc_auc_score(labels, members + nonmembers), abs=1e-12)


@settings(max_examples=150, deadline=None)
@given(scores, scores, st.sampled_from([0.0, 0.01, 0.1, 0.25, 0.5, 1.0]))
def test_tpr_at_fpr_matches_the_sklearn_roc(members, nonmembers, target):
    from sklearn.metrics import roc_curve as sk_roc

    labels = [1] * len(members) + [0] * len(nonmembers)
    fpr, tpr, _ = sk_roc(labels, members + nonmembers, drop_intermediate=False)
    want = tpr[fpr <= target + 1e-12].max()
    assert tpr_at_fpr(members, nonmembers, target) == pytest.approx(want, abs=1e-12)


def test_tpr_at_fpr_on_a_hand_built_roc():
    members, nonmembers = [0.9, 0.8, 0.4], [0.7, 0.3, 0.2, 0.1]
    # vertices (fpr, tpr): (0,0) (0,1/3) (0,2/3) (1/4,2/3) (1/4,1) (1/2,1) (3/4,1) (1,1)
    curve = roc_curve(members, nonmembers)
    np.testing.assert_allclose(curve["fpr"], [0, 0, 0, 0.25, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(curve["tpr"], [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1, 1])
    assert curve["thresholds"][0] == math.inf
    assert tpr_at_fpr(members, nonmembers, 0.0) == pytest.approx(2 / 3)
    assert tpr_at_fpr(members, nonmembers, 0.2) == pytest.approx(2 / 3)  # never interpolated upwards
    assert tpr_at_fpr(members, nonmembers, 0.25) == pytest.approx(1.0)
    assert roc_auc(members, nonmembers) == pytest.approx(11 / 12)


def test_identical_distributions_give_auc_one_half_inside_the_ci():
    rng = np.random.default_rng(0)
    out = roc_metrics(rng.normal(size=600), rng.normal(size=600), n_bootstrap=1000, seed=1)
    assert out["auc"] == pytest.approx(0.5, abs=0.05)
    lo, hi = out["auc_ci"]
    assert lo < 0.5 < hi and hi - lo < 0.15
    assert out["tpr@0.01"] < 0.1
    assert out["fpr_resolution"] == pytest.approx(1 / 600)


def test_separated_populations_give_auc_one_and_full_tpr():
    out = roc_metrics(np.linspace(10, 11, 200), np.linspace(0, 1, 300), n_bootstrap=200, seed=0)
    assert out["auc"] == 1.0 and out["auc_ci"] == [1.0, 1.0]
    assert out["tpr@0.01"] == 1.0 and out["tpr@0.001"] == 1.0 and out["tpr@0.01_ci"] == [1.0, 1.0]


def test_bootstrap_is_seeded_and_stratified():
    rng = np.random.default_rng(3)
    pos, neg = rng.normal(0.5, 1, 80), rng.normal(0, 1, 50)
    a = roc_metrics(pos, neg, n_bootstrap=300, seed=5)
    assert a == roc_metrics(pos, neg, n_bootstrap=300, seed=5)
    assert a["auc_ci"] != roc_metrics(pos, neg, n_bootstrap=300, seed=6)["auc_ci"]
    assert (a["members"], a["nonmembers"], a["bootstrap"]) == (80, 50, 300)
    # The CI brackets the point estimate, and without resamples there is none.
    assert a["auc_ci"][0] <= a["auc"] <= a["auc_ci"][1]
    assert roc_metrics(pos, neg, n_bootstrap=0)["auc_ci"] is None


def test_roc_metrics_refuse_non_finite_scores():
    with pytest.raises(ValueError, match="finite"):
        roc_metrics([0.1, math.nan], [0.2])


# ---------------------------------------------------------------------------------------------------------------
# Attack statistics


def test_min_k_by_hand():
    logprobs = np.array([-1, -5, -2, -8, -3, -0.5, -4, -6, -7, -9], dtype=float)
    assert min_k_mean(logprobs, 0.2) == pytest.approx(-8.5)  # the 2 lowest of 10: -9, -8
    assert min_k_mean(logprobs, 0.25) == pytest.approx(-8.5)  # floor(2.5) = 2
    assert min_k_mean(np.array([-1.0, -2.0, -3.0]), 0.2) == pytest.approx(-3.0)  # at least one token
    assert math.isnan(min_k_mean(np.array([]), 0.2))


def test_statistics_by_hand_whole_and_sensitive():
    nll = [np.array([1.0, 2.0, 3.0, 6.0]), np.array([0.5, 0.5])]
    sens = [np.array([False, True, False, True]), np.array([False, False])]
    ref = [np.array([2.0, 2.0, 2.0, 2.0]), np.array([1.0, 1.0])]
    texts, sensitive_texts = ["Ann 555", "hello"], ["Ann\n555", ""]
    inputs = MIAInputs(nll=nll, sensitive=sens, texts=texts, sensitive_texts=sensitive_texts, reference_nll=ref)

    whole = attack_scores(inputs, scope="example", min_k=0.25)
    np.testing.assert_allclose(whole["loss"], [-3.0, -0.5])
    np.testing.assert_allclose(whole["zlib"], [-12.0 / len(zlib.compress(b"Ann 555")), -1.0 / len(zlib.compress(b"hello"))])
    np.testing.assert_allclose(whole["min_k"], [-6.0, -0.5])  # floor(0.25 * 4) = 1 token; 2 tokens -> 1
    np.testing.assert_allclose(whole["reference"], [2.0 - 3.0, 1.0 - 0.5])

    only = attack_scores(inputs, scope="sensitive", min_k=0.25)
    assert only["loss"][0] == pytest.approx(-4.0)  # tokens 2.0 and 6.0
    assert only["zlib"][0] == pytest.approx(-8.0 / len(zlib.compress(b"Ann\n555")))
    assert only["min_k"][0] == pytest.approx(-6.0)
    assert only["reference"][0] == pytest.approx(2.0 - 4.0)
    assert all(math.isnan(only[name][1]) for name in only)  # no sensitive token: no score


def test_statistics_need_their_inputs():
    inputs = MIAInputs(nll=[np.array([1.0])], sensitive=[np.array([True])])
    assert set(attack_scores(inputs)) == {"loss", "min_k"}
    with pytest.raises(ValueError, match="same tokenizer"):
        MIAInputs(nll=[np.array([1.0, 2.0])], sensitive=[np.array([True, False])], reference_nll=[np.array([1.0])])


def test_from_scores_drops_canaries_and_collects_texts():
    records = [Record("a", "Ann is here", (Span(0, 3, "name"),)),
               Record("c", "My ID is 123.", (Span(9, 12, "canary"),), canary_id=0),
               Record("b", "Bob and Cy", (Span(0, 3, "name"), Span(8, 10, "name")))]
    scores = TokenScores(nll=[np.ones(3), np.ones(4), np.ones(5)], hit=[np.zeros(3, bool)] * 3,
                         sensitive=[np.zeros(3, bool), np.zeros(4, bool), np.zeros(5, bool)])
    inputs = MIAInputs.from_scores(scores, records)
    assert len(inputs) == 2 and inputs.texts == ["Ann is here", "Bob and Cy"]
    assert inputs.sensitive_texts == ["Ann", "Bob\nCy"]
    with pytest.raises(ValueError, match="records"):
        MIAInputs.from_scores(scores, records[:2])


def test_sensitive_scope_sees_memorization_the_whole_example_hides():
    """Members' sensitive tokens are memorized (low NLL) but are 10% of tokens: the sensitive scope separates
    members from non-members far better than the whole-example loss."""
    rng = np.random.default_rng(0)

    def population(n: int, sensitive_nll: float) -> MIAInputs:
        nll, sens = [], []
        for _ in range(n):
            mask = np.zeros(50, bool)
            mask[rng.choice(50, 5, replace=False)] = True
            values = rng.normal(3.0, 1.0, 50)
            values[mask] = rng.normal(sensitive_nll, 1.0, 5)
            nll.append(values)
            sens.append(mask)
        return MIAInputs(nll=nll, sensitive=sens)

    out = membership_inference(population(300, 2.0), population(300, 3.0), n_bootstrap=200, seed=0)
    assert set(out["example"]) == {"loss", "min_k"}
    assert out["sensitive"]["loss"]["auc"] > 0.9
    assert out["example"]["loss"]["auc"] < out["sensitive"]["loss"]["auc"] - 0.1
    assert out["settings"]["members"] == 300
