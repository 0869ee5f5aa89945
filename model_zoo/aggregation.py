"""Slice probabilities -> one study probability (numpy only; the app and evaluation share it)."""

from __future__ import annotations

import numpy as np


def study_probability(slice_probabilities: np.ndarray, method: str = "top_k_mean", k: int = 2) -> float:
    """Aggregate per-slice lesion probabilities into a study probability.

    ``top_k_mean`` averages the k highest slices: a real lesion spans several
    neighbouring slices, while a single noisy slice should not decide a study.
    ``max`` is the k = 1 special case.
    """
    p = np.asarray(slice_probabilities, dtype=np.float64).ravel()
    if p.size == 0:
        raise ValueError("a study needs at least one slice probability")
    if method == "max":
        return float(p.max())
    if method == "top_k_mean":
        k = max(1, min(int(k), p.size))
        return float(np.partition(p, p.size - k)[p.size - k:].mean())
    raise ValueError(f"unknown aggregation method {method!r}")
