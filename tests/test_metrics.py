import json

import numpy as np
import pytest

from model_zoo.aggregation import study_probability
from model_zoo.metrics import (
    auc_with_ci,
    calibration,
    largest_lesion_bucket,
    paired_auc_difference,
    sensitivity_specificity,
    study_report,
    threshold_for_sensitivity,
    wilson_interval,
)


def test_top_k_mean_and_max():
    p = [0.1, 0.9, 0.2, 0.7]
    assert study_probability(p, "max") == pytest.approx(0.9)
    assert study_probability(p, "top_k_mean", 2) == pytest.approx(0.8)
    assert study_probability(p, "top_k_mean", 10) == pytest.approx(np.mean(p))
    with pytest.raises(ValueError):
        study_probability([], "max")


def test_threshold_keeps_target_sensitivity():
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(40), np.zeros(60)].astype(int)
    p = np.r_[rng.uniform(0.3, 1, 40), rng.uniform(0, 0.7, 60)]
    t = threshold_for_sensitivity(y, p, 0.95)
    sens, spec = sensitivity_specificity(y, p, t)
    assert sens.value >= 0.95
    # The highest such threshold: raising it a little loses sensitivity.
    assert sensitivity_specificity(y, p, t + 1e-9)[0].value < 0.95
    assert 0 < spec.value < 1


def test_threshold_inside_a_run_of_positives_is_not_lowered_to_the_end_of_the_run():
    # 20 positives, the lowest five a run with no negative between them (roc_curve drops its inner points).
    y = np.r_[np.ones(20), np.zeros(10)].astype(int)
    p = np.r_[np.linspace(0.99, 0.65, 15), [0.60, 0.55, 0.50, 0.45, 0.40], np.linspace(0.35, 0.0, 10)]
    assert threshold_for_sensitivity(y, p, 0.95) == 0.45  # 19 of 20 at or above it
    assert threshold_for_sensitivity(y, p, 1.0) == 0.40


def test_a_proportion_of_no_studies_is_null_in_json():
    doc = wilson_interval(0, 0).to_json()
    assert doc == {"value": None, "ci95": [None, None]}
    json.dumps(doc, allow_nan=False)


def test_auc_ci_brackets_the_estimate():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 80)
    p = y * 0.3 + rng.uniform(0, 0.7, 80)
    auc = auc_with_ci(y, p, n_boot=300)
    assert auc.low <= auc.value <= auc.high and 0.5 < auc.value < 1


def test_paired_auc_difference_shows_a_gain_the_intervals_side_by_side_do_not():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 120)
    a = y * 0.8 + rng.normal(0, 1, 120)  # both models see the same hard studies: their errors are correlated
    b = a + y * 0.3 + rng.normal(0, 0.1, 120)  # B: a little better on the same studies
    auc_a, auc_b = auc_with_ci(y, a, n_boot=500), auc_with_ci(y, b, n_boot=500)
    assert auc_b.low < auc_a.high  # side by side the intervals overlap
    gain = paired_auc_difference(y, a, b, n_boot=500)
    assert gain.value == pytest.approx(auc_b.value - auc_a.value)
    assert 0 < gain.low <= gain.value <= gain.high  # paired, the gain shows
    loss = paired_auc_difference(y, b, a, n_boot=500)
    assert loss.value == pytest.approx(-gain.value) and loss.high < 0
    same = paired_auc_difference(y, a, a, n_boot=100)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same studies"):
        paired_auc_difference(y, a, b[:-1])
    with pytest.raises(ValueError, match="both positive and negative"):
        paired_auc_difference(np.ones(5, int), a[:5], b[:5])


def test_calibration_of_perfectly_calibrated_bins_is_small():
    rng = np.random.default_rng(3)
    p = rng.uniform(0, 1, 20000)
    y = (rng.uniform(0, 1, 20000) < p).astype(int)
    assert calibration(y, p)["ece"] < 0.02
    assert calibration(y, np.clip(p + 0.3, 0, 1))["ece"] > 0.15


def test_study_report_buckets():
    assert largest_lesion_bucket([3.0, 12.0]) == "10-20"
    assert largest_lesion_bucket([4.9]) == "<5"
    truths = [{"positive": True, "lesions": [{"diameter_mm": 4.0}], "hard_negatives": []},
              {"positive": True, "lesions": [{"diameter_mm": 25.0}], "hard_negatives": [{"kind": "osteoporosis"}]},
              {"positive": False, "lesions": [], "hard_negatives": [{"kind": "bone_island"}]},
              {"positive": False, "lesions": [], "hard_negatives": []}]
    r = study_report(truths, [0.2, 0.9, 0.6, 0.1], threshold=0.5)
    assert r["sensitivity_by_largest_lesion_mm"]["<5"]["value"] == 0.0
    assert r["sensitivity_by_largest_lesion_mm"][">20"]["value"] == 1.0
    assert r["specificity_by_hard_negative"]["bone_island"]["value"] == 0.0
    assert r["specificity_by_hard_negative"]["none"]["value"] == 1.0
