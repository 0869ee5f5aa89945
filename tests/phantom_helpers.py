"""Shared helpers for phantom tests: find studies with a given finding, measure regions in mm."""

from __future__ import annotations

import dataclasses

import numpy as np

from model_zoo.phantoms.generator import PhantomStudy, StudySpec, render_study, sample_study_spec

SEED = 20240601


def find_spec(
    predicate, positive: bool | None = None, n_slices: int = 12, start: int = 0, limit: int = 200
) -> StudySpec:
    """The first spec (by index) of the test seed for which predicate(spec) holds."""
    for index in range(start, start + limit):
        spec = sample_study_spec(SEED, index, positive=positive, n_slices=n_slices)
        if predicate(spec):
            return spec
    raise AssertionError("no phantom spec matched the predicate")


def hard_negative(spec: StudySpec, kind: str):
    return next((h for h in spec.hard_negatives if h.kind == kind), None)


def thin_slices_at(spec: StudySpec, z_mm: float, n_slices: int = 5, noise_hu: float = 20.0) -> PhantomStudy:
    """Re-render a spec with 1 mm contiguous slices centred on z_mm and modest noise (for measuring)."""
    scanner = dataclasses.replace(
        spec.scanner, slice_thickness_mm=1.0, slice_spacing_mm=1.0, noise_sigma_hu=noise_hu
    )
    spec = dataclasses.replace(spec, scanner=scanner, n_slices=n_slices, z_start_mm=z_mm - (n_slices // 2))
    return render_study(spec)


def pixel_of(study: PhantomStudy, x_mm: float, y_mm: float) -> tuple[int, int]:
    x0, y0 = study.origin_xy_mm
    return int(round((y_mm - y0) / study.pixel_spacing_mm)), int(round((x_mm - x0) / study.pixel_spacing_mm))


def nearest_slice(study: PhantomStudy, z_mm: float) -> int:
    return int(np.argmin(np.abs(study.z_mm - z_mm)))


def disc_mask(study: PhantomStudy, x_mm: float, y_mm: float, r_min: float, r_max: float) -> np.ndarray:
    """In-plane pixels with r_min <= distance to (x, y) < r_max (mm)."""
    x0, y0 = study.origin_xy_mm
    n_rows, n_cols = study.hu.shape[1:]
    ys = y0 + study.pixel_spacing_mm * np.arange(n_rows)[:, None]
    xs = x0 + study.pixel_spacing_mm * np.arange(n_cols)[None, :]
    d = np.hypot(xs - x_mm, ys - y_mm)
    return (d >= r_min) & (d < r_max)
