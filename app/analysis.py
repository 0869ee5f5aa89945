"""Slice probabilities and CAM maps -> one study result: probability, call, findings, heatmaps.

Pure functions (numpy only). The study probability comes from
``model_zoo.aggregation.study_probability`` with the card's aggregation, the same
function evaluation uses, so the app reproduces the reported operating point.
"""

from __future__ import annotations

import numpy as np

from app.domain import AppError, Finding, ModelRef, Series, SliceResult, StudyResult
from app.heatmap import cam_to_image, hot_region
from model_zoo.aggregation import study_probability
from model_zoo.card import ModelCard
from model_zoo.contract import interpolate_to_slices

KEY_SLICES = 3  # heatmaps are kept for the most suspicious slices plus every finding's peak


class AnalysisError(AppError):
    """The model's output cannot be turned into a result (e.g. it produced NaN)."""


def suspicious_runs(probabilities: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Runs of consecutive slices with probability >= threshold, as (first, last) inclusive."""
    hot = np.asarray(probabilities) >= threshold
    edges = np.diff(np.concatenate([[0], hot.astype(np.int8), [0]]))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1) - 1
    return [(int(a), int(b)) for a, b in zip(starts, ends, strict=True)]


def heatmap_slices(probabilities: np.ndarray, runs: list[tuple[int, int]], n_key: int = KEY_SLICES) -> list[int]:
    """Slices that get a heatmap: the peak of every run and the ``n_key`` most suspicious slices.

    Slices the model did not run on carry -inf.
    """
    p = np.asarray(probabilities)
    peaks = {a + int(np.argmax(p[a:b + 1])) for a, b in runs}
    top = np.argsort(-p, kind="stable")[:n_key]
    return sorted(peaks | {int(i) for i in top})


def build_study_result(series: Series, analysed: np.ndarray, probabilities: np.ndarray, cams: np.ndarray,
                       card: ModelCard, model: ModelRef, warnings: list[str] | None = None) -> StudyResult:
    """Aggregate the model outputs on the analysed slices of ``series`` into a StudyResult.

    ``analysed``: the increasing slice indices the model ran on (``contract.analysed_slices``);
    ``probabilities`` (m,) and ``cams`` (m, h, w[, 1]) are its outputs there. The study
    probability aggregates the model outputs only; every other slice gets a probability
    interpolated along z. Findings (positive studies only) are runs of slices at or above the
    card's threshold, each located by the heatmap of its most suspicious analysed slice. Timing is left to
    the caller.
    """
    n = series.n_slices
    analysed = np.asarray(analysed, dtype=np.intp)
    p_model = np.asarray(probabilities, dtype=np.float64)
    if (p_model.shape != analysed.shape or len(cams) != len(analysed) or not len(analysed)
            or analysed[0] < 0 or analysed[-1] >= n or np.any(np.diff(analysed) <= 0)):
        raise AnalysisError(f"the model returned {len(p_model)} results for {len(analysed)} analysed slices "
                            f"of a series of {n} slices")
    if not np.all(np.isfinite(p_model)):
        raise AnalysisError("the model produced invalid (NaN) probabilities; the model file may be damaged")
    if not np.all(np.isfinite(cams)):  # an overflowed cam still gives a finite probability (sigmoid -> 1)
        raise AnalysisError("the model produced invalid (non-finite) heatmaps; the model file may be damaged")
    threshold = float(card.threshold)
    probability = study_probability(p_model, card.aggregation.method, card.aggregation.k)
    p = interpolate_to_slices(series.z_mm, analysed, p_model)
    # Heatmaps and finding peaks only where the model ran.
    ranked = np.full(n, -np.inf)
    ranked[analysed] = p_model
    positive = probability >= threshold
    # A negative call has no findings, even when one slice crosses the threshold (top-k mean below it):
    # the report would otherwise say "absent" and mark a lesion region at once.
    runs = [(a, b) for a, b in suspicious_runs(p, threshold) if np.isfinite(ranked[a:b + 1].max())] if positive else []
    image_shape = series.hu.shape[1:]
    heatmaps = {i: cam_to_image(cams[np.searchsorted(analysed, i)], image_shape, series.pixel_spacing_mm,
                                card.contract)
                for i in heatmap_slices(ranked, runs, min(KEY_SLICES, len(analysed)))}
    findings = []
    for first, last in runs:
        peak = first + int(np.argmax(ranked[first:last + 1]))
        region = hot_region(heatmaps[peak])
        findings.append(Finding(
            slice_start=first, slice_end=last,
            z_start_mm=float(series.z_mm[first]), z_end_mm=float(series.z_mm[last]),
            peak_slice=peak, peak_sop_instance_uid=series.sop_instance_uids[peak],
            peak_probability=float(p[peak]), center_px=region.center_px, bbox_px=region.bbox_px,
        ))
    slices = [SliceResult(uid, float(z), float(prob), analysed=bool(a))
              for uid, z, prob, a in zip(series.sop_instance_uids, series.z_mm, p, np.isfinite(ranked), strict=True)]
    return StudyResult(
        study_instance_uid=series.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        probability=probability,
        positive=positive,
        threshold=threshold,
        model=model,
        slices=slices,
        findings=findings,
        warnings=list(series.warnings) + list(warnings or []),
        heatmaps=heatmaps,
    )
