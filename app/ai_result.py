"""The AI result as the reading site gets it: parsed back from the AI SR (``app.results_dicom``).

``parse_ai_sr`` reads the study-level probability, threshold and call, the key slices, each
finding's box on its peak slice, the algorithm identity (name, version, model sha256, variant),
and when and by whom the case was released (the De-identifying Equipment item that
``app.deid`` adds; for a case sent with identity, the SR's content time).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import highdicom as hd
import pydicom
from pydicom.valuerep import DT

from app.deid import DEIDENTIFYING_EQUIPMENT
from app.domain import AppError, ModelRef, triage_label
from app.results_dicom import LYTIC_BONE_LESION, PRESENT, PROBABILITY, THRESHOLD

ALGORITHM_NAME, ALGORITHM_VERSION, ALGORITHM_PARAMETERS = "111001", "111003", "111002"


class NotAnAIResult(AppError):
    """The SR is not an AI result this app can read."""


@dataclass(frozen=True)
class AIFinding:
    """One suspicious region: its box on the peak slice, in pixel indices as ``Finding.bbox_px``."""

    number: int
    sop_instance_uid: str
    bbox_px: tuple[int, int, int, int]  # (row0, col0, row1, col1), inclusive
    probability: float


@dataclass(frozen=True)
class AIResult:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    probability: float
    threshold: float
    positive: bool
    model: ModelRef
    key_slice_uids: tuple[str, ...]
    findings: tuple[AIFinding, ...]
    sent_at: datetime | None  # when the clinic released the case (aware datetime)
    sent_by: str  # the sending site's name ("" if it did not give one)

    @property
    def triage_label(self) -> str:
        return triage_label(self.positive)


def _content_items(ds: pydicom.Dataset):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def _concept(item: pydicom.Dataset) -> str:
    names = item.get("ConceptNameCodeSequence")
    return str(names[0].CodeValue) if names else ""


def _model(sr: pydicom.Dataset) -> ModelRef:
    """Algorithm identification of the content tree (name, version, sha256=..., variant=...)."""
    values: dict[str, list[str]] = {}
    for item in _content_items(sr):
        if item.get("ValueType") == "TEXT" and _concept(item) in (ALGORITHM_NAME, ALGORITHM_VERSION,
                                                                   ALGORITHM_PARAMETERS):
            values.setdefault(_concept(item), []).append(str(item.TextValue))
    parameters = dict(p.split("=", 1) for p in values.get(ALGORITHM_PARAMETERS, []) if "=" in p)
    name = (values.get(ALGORITHM_NAME) or [""])[0]
    if not name:
        raise NotAnAIResult("the SR names no algorithm")
    return ModelRef(name=name, version=(values.get(ALGORITHM_VERSION) or [""])[0],
                    sha256=parameters.get("sha256", ""), variant=parameters.get("variant", ""))


def as_utc(value: str) -> datetime:
    """A DICOM DT value as an aware datetime in UTC (a value without offset is local time)."""
    return datetime.fromtimestamp(DT(value).timestamp(), UTC)


def _release(sr: pydicom.Dataset) -> tuple[datetime | None, str]:
    for item in reversed(sr.get("ContributingEquipmentSequence", [])):
        purpose = item.get("PurposeOfReferenceCodeSequence")
        if purpose and purpose[0].CodeValue == DEIDENTIFYING_EQUIPMENT[0] and item.get("ContributionDateTime"):
            return as_utc(item.ContributionDateTime), str(item.get("InstitutionName", ""))
    if sr.get("ContentDate") and sr.get("ContentTime"):  # sent with identity: dates are real
        return as_utc(f"{sr.ContentDate}{sr.ContentTime}"), str(sr.get("InstitutionName", ""))
    return None, ""


def _finding(number: int, group) -> AIFinding:
    region = group.roi
    if region is None:
        raise NotAnAIResult("a finding has no region")
    columns, rows = region.value[:, 0], region.value[:, 1]
    source = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    # The polyline runs along the outer pixel edges (see results_dicom._finding_group): back to indices.
    bbox = (int(round(rows.min())), int(round(columns.min())), int(round(rows.max())) - 1,
            int(round(columns.max())) - 1)
    probability = next((m.value for m in group.get_measurements(name=PROBABILITY)), float("nan"))
    return AIFinding(number, str(source), bbox, float(probability))


def parse_ai_sr(sr: pydicom.Dataset) -> AIResult:
    """The AI result in ``sr``; ``NotAnAIResult`` if it is not one (e.g. a radiologist's read)."""
    if sr.get("VerificationFlag") != "UNVERIFIED":
        raise NotAnAIResult("a verified SR is a person's report, not an AI result")
    try:
        report = hd.sr.MeasurementReport.from_sequence([hd.sr.Comprehensive3DSR.from_dataset(sr)])
        study_groups = report.get_image_measurement_groups()
        roi_groups = report.get_planar_roi_measurement_groups()
    except (ValueError, AttributeError, TypeError, IndexError) as exc:
        raise NotAnAIResult(f"the SR is not a TID 1500 measurement report ({type(exc).__name__})") from None
    for group in study_groups:
        probability = [m.value for m in group.get_measurements(name=PROBABILITY)]
        threshold = [m.value for m in group.get_measurements(name=THRESHOLD)]
        call = [e.value for e in group.get_qualitative_evaluations(name=LYTIC_BONE_LESION)]
        if probability and threshold and call:
            break
    else:
        raise NotAnAIResult("the SR has no study-level probability, threshold and call")
    sent_at, sent_by = _release(sr)
    key_slices = tuple(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for item in group.source_images)
    return AIResult(
        study_uid=str(sr.StudyInstanceUID), series_uid=str(sr.SeriesInstanceUID),
        sop_instance_uid=str(sr.SOPInstanceUID), sop_class_uid=str(sr.SOPClassUID),
        probability=float(probability[0]), threshold=float(threshold[0]),
        positive=call[0].value == PRESENT.value and call[0].scheme_designator == PRESENT.scheme_designator,
        model=_model(sr), key_slice_uids=key_slices,
        findings=tuple(_finding(n, g) for n, g in enumerate(roi_groups, start=1)),
        sent_at=sent_at, sent_by=sent_by)
