"""Clinical-study metrics for study-level predictions (no TensorFlow).

Sensitivity first: the operating threshold is the highest one that keeps
validation sensitivity at or above the target, then reported on held-out data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score

# Each bucket holds its lower bound: a largest lesion of exactly 10.0 mm counts as "10-20", 20.0 as ">20".
SIZE_BUCKETS_MM: tuple[tuple[str, float, float], ...] = (
    ("<5", 0.0, 5.0), ("5-10", 5.0, 10.0), ("10-20", 10.0, 20.0), (">20", 20.0, float("inf")),
)


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def to_json(self) -> dict:
        """Rounded; an undefined value (a proportion of no studies) is null, since JSON has no NaN."""
        def rounded(x: float) -> float | None:
            return None if np.isnan(x) else round(x, 4)

        return {"value": rounded(self.value), "ci95": [rounded(self.low), rounded(self.high)]}


def _bootstrap_interval(y: np.ndarray, statistic: Callable[[np.ndarray], float], n_boot: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of ``statistic(indices)`` over resampled studies.

    Samples that miss a class are skipped (an AUC needs both).
    """
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if len(np.unique(y[idx])) == 2:
            boots.append(statistic(idx))
    low, high = np.percentile(boots, [2.5, 97.5])
    return float(low), float(high)


def auc_with_ci(y_true: Sequence[int], y_prob: Sequence[float], n_boot: int = 2000, seed: int = 0) -> Interval:
    """Study-level ROC AUC with a percentile bootstrap 95% CI (resampling studies)."""
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(y_prob, dtype=float)
    if len(np.unique(y)) < 2:
        raise ValueError("AUC needs both positive and negative studies")
    auc = float(roc_auc_score(y, p))
    low, high = _bootstrap_interval(y, lambda idx: roc_auc_score(y[idx], p[idx]), n_boot, seed)
    return Interval(auc, low, high)


def paired_auc_difference(y_true: Sequence[int], prob_a: Sequence[float], prob_b: Sequence[float],
                          n_boot: int = 2000, seed: int = 0) -> Interval:
    """AUC(b) - AUC(a) on the same studies, with a paired percentile bootstrap 95% CI.

    Each bootstrap sample resamples studies once and scores both models on it, so the
    errors the two models share cancel: the interval of the difference is much
    narrower than the two AUC intervals side by side suggest.
    """
    y = np.asarray(y_true, dtype=int)
    a = np.asarray(prob_a, dtype=float)
    b = np.asarray(prob_b, dtype=float)
    if not len(y) == len(a) == len(b):
        raise ValueError("labels and both models' probabilities must cover the same studies")
    if len(np.unique(y)) < 2:
        raise ValueError("AUC needs both positive and negative studies")
    diff = float(roc_auc_score(y, b) - roc_auc_score(y, a))
    low, high = _bootstrap_interval(
        y, lambda idx: roc_auc_score(y[idx], b[idx]) - roc_auc_score(y[idx], a[idx]), n_boot, seed)
    return Interval(diff, low, high)


def wilson_interval(successes: int, n: int) -> Interval:
    """Proportion with a Wilson 95% interval (well behaved near 0 and 1)."""
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    z = 1.959964
    phat = successes / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * np.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    return Interval(phat, float(max(0.0, centre - half)), float(min(1.0, centre + half)))


def threshold_for_sensitivity(y_true: Sequence[int], y_prob: Sequence[float], min_sensitivity: float = 0.95) -> float:
    """The highest threshold whose sensitivity (p >= threshold) is at least ``min_sensitivity``:
    the score of the k-th most suspicious positive, k = ceil(min_sensitivity * positives).

    (Not read off ``roc_curve``: it drops the points of a run of positives with no negative
    between them, and would then return the lowest score of the run.)
    """
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(y_prob, dtype=float)
    positives = np.sort(p[y == 1])[::-1]
    if not len(positives):
        raise ValueError("a sensitivity threshold needs positive studies")
    k = max(1, int(np.ceil(min_sensitivity * len(positives) - 1e-9)))  # the tolerance absorbs 0.95 * 20 = 19.000...01
    return min(float(positives[k - 1]), 1.0)


def sensitivity_specificity(y_true: Sequence[int], y_prob: Sequence[float], threshold: float) -> tuple[Interval, Interval]:
    y = np.asarray(y_true, dtype=int)
    called = np.asarray(y_prob, dtype=float) >= threshold
    tp = int(np.sum(called & (y == 1)))
    tn = int(np.sum(~called & (y == 0)))
    return wilson_interval(tp, int(np.sum(y == 1))), wilson_interval(tn, int(np.sum(y == 0)))


def largest_lesion_bucket(lesion_diameters_mm: Sequence[float]) -> str | None:
    if not lesion_diameters_mm:
        return None
    d = max(lesion_diameters_mm)
    return next(name for name, lo, hi in SIZE_BUCKETS_MM if lo <= d < hi)


def sensitivity_by_size(truths: Sequence[dict], y_prob: Sequence[float], threshold: float) -> dict:
    """Sensitivity per largest-lesion-size bucket (positive studies only)."""
    out = {}
    for name, _, _ in SIZE_BUCKETS_MM:
        hits = [p >= threshold for t, p in zip(truths, y_prob, strict=True)
                if t["positive"] and largest_lesion_bucket([les["diameter_mm"] for les in t["lesions"]]) == name]
        out[name] = {"n": len(hits), **wilson_interval(int(sum(hits)), len(hits)).to_json()}
    return out


def specificity_by_hard_negative(truths: Sequence[dict], y_prob: Sequence[float], threshold: float) -> dict:
    """Specificity among negative studies that contain each hard-negative type (and none at all).

    The groups overlap: a study with two kinds counts in both, so their n add up to more than the negatives.
    """
    kinds = sorted({h["kind"] for t in truths for h in t["hard_negatives"]})
    out = {}
    for kind in [*kinds, "none"]:
        calls = [p < threshold for t, p in zip(truths, y_prob, strict=True) if not t["positive"] and (
            kind in {h["kind"] for h in t["hard_negatives"]} if kind != "none" else not t["hard_negatives"])]
        out[kind] = {"n": len(calls), **wilson_interval(int(sum(calls)), len(calls)).to_json()}
    return out


def calibration(y_true: Sequence[int], y_prob: Sequence[float], n_bins: int = 10) -> dict:
    """Expected calibration error and the reliability-diagram bins (equal-width)."""
    y = np.asarray(y_true, dtype=float)
    p = np.asarray(y_prob, dtype=float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        m = which == b
        if not m.any():
            continue
        conf, acc = float(p[m].mean()), float(y[m].mean())
        ece += m.mean() * abs(conf - acc)
        bins.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": int(m.sum()),
                     "mean_probability": round(conf, 4), "observed_rate": round(acc, 4)})
    return {"ece": round(float(ece), 4), "bins": bins}


def study_report(truths: Sequence[dict], y_prob: Sequence[float], threshold: float, seed: int = 0) -> dict:
    """Every study-level number of the clinical report for one data split."""
    y = [int(t["positive"]) for t in truths]
    sens, spec = sensitivity_specificity(y, y_prob, threshold)
    return {
        "n_studies": len(y),
        "n_positive": int(sum(y)),
        "auc": auc_with_ci(y, y_prob, seed=seed).to_json(),
        "threshold": round(float(threshold), 6),
        "sensitivity": sens.to_json(),
        "specificity": spec.to_json(),
        "sensitivity_by_largest_lesion_mm": sensitivity_by_size(truths, y_prob, threshold),
        "specificity_by_hard_negative": specificity_by_hard_negative(truths, y_prob, threshold),
        "calibration": calibration(y, y_prob),
    }
