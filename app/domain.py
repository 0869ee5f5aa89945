"""Dataclasses that cross module lines in the clinic app.

Series      what ingest hands to the runtime (one analysable CT series, in HU)
StudyResult what analysis hands to the CLI, the UI and the DICOM result writers
JSON is produced only at the edges (``StudyResult.to_json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Temp folders of an analysis (uploads, extracted archives): the app's and the CLI's. They hold patient
# images; ``app.launch`` removes ones a killed process left behind.
UI_WORK_DIR_PREFIX, CLI_WORK_DIR_PREFIX = "myeloma-ui-", "myeloma-ct-"

TRIAGE_POSITIVE = "Suspicious for lytic lesions: forward for review"
TRIAGE_NEGATIVE = "No lytic lesion detected"


def triage_label(positive: bool) -> str:
    """The AI call in words (the same text wherever a result is shown)."""
    return TRIAGE_POSITIVE if positive else TRIAGE_NEGATIVE


class AppError(Exception):
    """An error with a message a clinician can act on. Caught once, at the edge (CLI, UI)."""


@dataclass
class Series:
    """One axial CT series, sorted along the slice normal, in Hounsfield units.

    ``hu`` is int16 (n, rows, cols); slice i has ``z_mm[i]`` (position along the
    slice normal, strictly increasing) and ``sop_instance_uids[i]``.
    Patient identity is carried for de-identification mapping only; never log it.
    """

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: list[str]
    z_mm: np.ndarray
    hu: np.ndarray
    pixel_spacing_mm: tuple[float, float]  # (row spacing, column spacing), DICOM order
    slice_thickness_mm: float | None = None
    files: list[Path] = field(default_factory=list)
    series_description: str = ""
    convolution_kernel: str = ""
    patient_id: str = ""
    patient_name: str = ""
    image_orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    image_position_first: tuple[float, float, float] = (0.0, 0.0, 0.0)
    warnings: list[str] = field(default_factory=list)
    selection_reason: str = ""

    @property
    def n_slices(self) -> int:
        return len(self.sop_instance_uids)


@dataclass
class SliceResult:
    """One slice's probability: the model's output, or interpolated along z between analysed slices
    (thin-slice series are analysed about ``contract.z_step_mm`` apart)."""

    sop_instance_uid: str
    z_mm: float
    probability: float
    analysed: bool = True

    def to_json(self) -> dict:
        out = {"sop_instance_uid": self.sop_instance_uid, "z_mm": round(float(self.z_mm), 3),
               "probability": round(float(self.probability), 6)}
        if not self.analysed:
            out["interpolated"] = True
        return out


@dataclass
class Finding:
    """A run of suspicious slices with the region the heatmap points at.

    ``bbox_px`` is (row0, col0, row1, col1) in the original image pixel grid of the
    peak slice; ``center_px`` is (row, col) of the heatmap maximum there.
    """

    slice_start: int
    slice_end: int  # inclusive
    z_start_mm: float
    z_end_mm: float
    peak_slice: int
    peak_sop_instance_uid: str
    peak_probability: float
    center_px: tuple[int, int]
    bbox_px: tuple[int, int, int, int]

    def to_json(self) -> dict:
        return {
            "slice_start": self.slice_start, "slice_end": self.slice_end,
            "z_start_mm": round(float(self.z_start_mm), 3), "z_end_mm": round(float(self.z_end_mm), 3),
            "peak_slice": self.peak_slice, "peak_sop_instance_uid": self.peak_sop_instance_uid,
            "peak_probability": round(float(self.peak_probability), 6),
            "center_px": list(self.center_px), "bbox_px": list(self.bbox_px),
        }


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    sha256: str
    variant: str = ""

    def to_json(self) -> dict:
        return {"name": self.name, "version": self.version, "sha256": self.sha256, "variant": self.variant}


@dataclass
class StudyResult:
    study_instance_uid: str
    series_instance_uid: str
    probability: float
    positive: bool
    threshold: float
    model: ModelRef
    slices: list[SliceResult]
    findings: list[Finding]
    warnings: list[str] = field(default_factory=list)
    timing_s: dict[str, float] = field(default_factory=dict)
    # slice index -> heatmap in [0, 1] on the original pixel grid (rows, cols); not serialised.
    heatmaps: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def triage_label(self) -> str:
        return triage_label(self.positive)

    def key_slices(self, n: int = 3) -> list[int]:
        """Indices of the most suspicious analysed slices (those with model output), most suspicious first."""
        order = np.argsort([-s.probability if s.analysed else np.inf for s in self.slices], kind="stable")
        return [int(i) for i in order[:n] if self.slices[i].analysed]

    def to_json(self) -> dict:
        return {
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "probability": round(float(self.probability), 6),
            "positive": bool(self.positive),
            "threshold": float(self.threshold),
            "model": self.model.to_json(),
            "slices": [s.to_json() for s in self.slices],
            "findings": [f.to_json() for f in self.findings],
            "warnings": list(self.warnings),
            "timing_s": {k: round(float(v), 4) for k, v in self.timing_s.items()},
        }
