"""The teleradiologist's read: a verified DICOM SR stored next to the case on the server.

``build_read_sr`` makes a Comprehensive 3D SR (TID 1500 Measurement Report, highdicom) in the
case's study, with:
- VerificationFlag VERIFIED, CompletionFlag COMPLETE, PreliminaryFlag FINAL, and the verifying
  observer (name, organisation, date and time of verification); the radiologist is also the
  person observer of the content;
- an assessment group: lytic bone lesion present/absent (the radiologist's call), agreement
  with the AI (yes/no), urgency (urgent/routine), the impression (free text) and a COMPOSITE
  reference to the AI SR that was assessed (also listed as evidence);
- one planar ROI group per confirmed lesion: the CT slice and a point or a box (SCOORD POINT or
  closed POLYLINE, pixel coordinates (column, row) with 0,0 at the top-left corner of the image).

``parse_read_sr`` reads such an SR back (the worklist's read status, the clinic's inbox);
``save_read`` stores it with STOW-RS and confirms it with QIDO-RS.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

import highdicom as hd
import numpy as np
import pydicom
from pydicom.filebase import DicomBytesIO
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from app.ai_result import AIResult, as_utc
from app.dicomweb import DicomWebClient, DicomWebError
from app.domain import AppError
from app.results_dicom import (
    ABSENT,
    CODING_SCHEME,
    LYTIC_BONE_LESION,
    MANUFACTURER,
    PRESENT,
    coding_scheme_identification,
)

log = logging.getLogger(__name__)

READ_SERIES_NUMBER = 9903
READ_SERIES_DESCRIPTION = "RADIOLOGIST READ"
AI_AGREEMENT = hd.sr.CodedConcept("AIAGREE", CODING_SCHEME, "Agreement with AI result")
READ_URGENCY = hd.sr.CodedConcept("URGENCY", CODING_SCHEME, "Reporting urgency")
ASSESSED_AI_RESULT = hd.sr.CodedConcept("AIRESULT", CODING_SCHEME, "Assessed AI result")
URGENT = hd.sr.CodedConcept("103391001", "SCT", "Urgent")
ROUTINE = hd.sr.CodedConcept("373115008", "SCT", "Routine")
YES, NO = codes.SCT.Yes, codes.SCT.No
IMPRESSION = codes.DCM.Impression
MEASUREMENT_GROUP = codes.DCM.MeasurementGroup
MAX_IMPRESSION = 10_000
MAX_MARKS = 50


class ReadError(AppError):
    """The read cannot be saved as entered (the message says what to change)."""


class Agreement(StrEnum):
    AGREE = "agree"
    DISAGREE = "disagree"


class Urgency(StrEnum):
    ROUTINE = "routine"
    URGENT = "urgent"


class MarkKind(StrEnum):
    POINT = "point"
    BOX = "box"


@dataclass(frozen=True)
class LesionMark:
    """A confirmed lesion: the CT slice and a point (column, row) or a box (left, top, right, bottom)."""

    sop_instance_uid: str
    sop_class_uid: str
    kind: MarkKind
    coords: tuple[float, ...]

    def __post_init__(self) -> None:
        expected = 2 if self.kind == MarkKind.POINT else 4
        if len(self.coords) != expected:
            raise ReadError(f"a {self.kind} needs {expected} coordinates, not {len(self.coords)}")
        if self.kind == MarkKind.BOX and not (self.coords[0] < self.coords[2] and self.coords[1] < self.coords[3]):
            raise ReadError("a box needs left < right and top < bottom")
        if any(c < 0 for c in self.coords):
            raise ReadError("lesion coordinates are pixel positions and cannot be negative")

    def graphic_data(self) -> np.ndarray:
        if self.kind == MarkKind.POINT:
            return np.array([self.coords], dtype=float)
        left, top, right, bottom = self.coords
        return np.array([[left, top], [right, top], [right, bottom], [left, bottom], [left, top]], dtype=float)


@dataclass(frozen=True)
class Read:
    """What the radiologist decided, as entered."""

    agreement: Agreement
    urgency: Urgency
    impression: str
    lesions: tuple[LesionMark, ...]
    radiologist: str  # DICOM person name, e.g. "Curie^Marie"
    organization: str  # the reading organisation (verifying organisation)
    verified_at: datetime

    def lesion_present(self, ai: AIResult) -> bool:
        """The radiologist's call: the AI's call when agreeing, the opposite when not."""
        return ai.positive if self.agreement == Agreement.AGREE else not ai.positive


@dataclass(frozen=True)
class ReadReport:
    """A read as stored on the server."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    ai_sr_uid: str
    radiologist: str
    organization: str
    verified_at: datetime
    agreement: Agreement
    urgency: Urgency
    lesion_present: bool
    impression: str
    lesions: tuple[LesionMark, ...]

    @property
    def urgent(self) -> bool:
        return self.urgency == Urgency.URGENT


# --- building -----------------------------------------------------------------------------------
def _check(read: Read, ai: AIResult, images: dict[str, pydicom.Dataset]) -> None:
    if not read.radiologist.strip():
        raise ReadError("enter the reading radiologist's name: a verified report names who verified it")
    if not read.organization.strip():
        raise ReadError("enter the reading organisation: a verified report names it")
    if not read.impression.strip():
        raise ReadError("write an impression before saving the read")
    if len(read.impression) > MAX_IMPRESSION:
        raise ReadError(f"the impression is longer than {MAX_IMPRESSION} characters")
    if len(read.lesions) > MAX_MARKS:
        raise ReadError(f"more than {MAX_MARKS} lesion marks; mark the most relevant ones")
    if read.verified_at.tzinfo is None:
        raise ReadError("the verification time needs a time zone")
    if read.lesions and not read.lesion_present(ai):
        raise ReadError("lesion locations are marked, but the read says no lytic lesion: either remove the "
                        f"marks or {'agree with' if ai.positive else 'disagree with'} the AI result")
    for mark in read.lesions:
        image = images.get(mark.sop_instance_uid)
        if image is None or image.StudyInstanceUID != ai.study_uid:
            raise ReadError("a lesion mark refers to an image that is not part of this case")
        rows, columns = int(image.Rows), int(image.Columns)
        xs, ys = mark.graphic_data()[:, 0], mark.graphic_data()[:, 1]
        if xs.max() > columns or ys.max() > rows:
            raise ReadError(f"a lesion mark lies outside the image ({columns} x {rows} pixels)")


def _assessment(read: Read, ai: AIResult) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="Radiologist assessment"),
        finding_type=codes.SCT.Lesion, finding_sites=[hd.sr.FindingSite(codes.SCT.BoneStructure)],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(LYTIC_BONE_LESION, PRESENT if read.lesion_present(ai) else ABSENT),
            hd.sr.QualitativeEvaluation(AI_AGREEMENT, YES if read.agreement == Agreement.AGREE else NO),
            hd.sr.QualitativeEvaluation(READ_URGENCY, URGENT if read.urgency == Urgency.URGENT else ROUTINE),
        ])
    container = group[0]
    container.ContentSequence.append(hd.sr.CompositeContentItem(
        name=ASSESSED_AI_RESULT, referenced_sop_class_uid=ai.sop_class_uid,
        referenced_sop_instance_uid=ai.sop_instance_uid, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    container.ContentSequence.append(hd.sr.TextContentItem(
        name=IMPRESSION, value=read.impression.strip(), relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


def _lesion_group(number: int, mark: LesionMark) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POINT if mark.kind == MarkKind.POINT
        else hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=mark.graphic_data(),
        source_image=hd.sr.SourceImageForRegion(mark.sop_class_uid, mark.sop_instance_uid))
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"Confirmed lesion {number}"),
        referenced_region=region, finding_type=codes.SCT.Lesion,
        finding_sites=[hd.sr.FindingSite(codes.SCT.BoneStructure)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(LYTIC_BONE_LESION, PRESENT)])


def build_read_sr(ai_sr: pydicom.Dataset, ai: AIResult, read: Read,
                  images: Sequence[pydicom.Dataset] = ()) -> pydicom.Dataset:
    """The verified read SR in the study of ``ai_sr`` (``ai`` is its parsed content).

    ``images`` are the CT slices the lesion marks refer to (headers suffice); they and the AI SR
    become the SR's evidence. Raises ``ReadError`` with what to change when the read is incomplete.
    """
    by_uid = {str(ds.SOPInstanceUID): ds for ds in images}
    _check(read, ai, by_uid)
    person = hd.sr.ObserverContext(
        observer_type=codes.DCM.Person,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
            name=read.radiologist.strip(), organization_name=read.organization.strip()[:64]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=person),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=[_assessment(read, ai),
                              *(_lesion_group(n, mark) for n, mark in enumerate(read.lesions, start=1))])
    referenced = list(dict.fromkeys(mark.sop_instance_uid for mark in read.lesions))
    sr = hd.sr.Comprehensive3DSR(
        evidence=[ai_sr, *(by_uid[uid] for uid in referenced)], content=report,
        series_instance_uid=generate_uid(), series_number=READ_SERIES_NUMBER, sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer=MANUFACTURER, is_complete=True, is_final=True, is_verified=True,
        verifying_observer_name=read.radiologist.strip(), verifying_organization=read.organization.strip()[:64])
    verified = read.verified_at.astimezone(UTC)
    sr.VerifyingObserverSequence[0].VerificationDateTime = verified.strftime("%Y%m%d%H%M%S.%f+0000")
    sr.SeriesDescription = READ_SERIES_DESCRIPTION
    sr.CodingSchemeIdentificationSequence = [coding_scheme_identification()]
    for keyword in ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence"):
        if keyword in ai_sr:  # the same pseudonymous patient as the case
            sr[keyword] = ai_sr[keyword]
    return sr


def encode(ds: pydicom.Dataset) -> bytes:
    """Part 10 bytes, as sent with STOW-RS."""
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# --- reading back ---------------------------------------------------------------------------------
def _content(ds: pydicom.Dataset):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _content(item)


def _code(item: pydicom.Dataset, keyword: str) -> tuple[str, str]:
    code = item[keyword][0]
    # Codes longer than 16 characters travel as LongCodeValue or URNCodeValue instead (PS3.3 8.8).
    value = code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue") or ""
    return str(value), str(code.get("CodingSchemeDesignator", ""))


def _is(concept: tuple[str, str], code) -> bool:
    return concept == (code.value, code.scheme_designator)


def _mark(group: pydicom.Dataset) -> LesionMark | None:
    for item in _content(group):
        if item.get("ValueType") == "SCOORD":
            image = item.ContentSequence[0].ReferencedSOPSequence[0]
            data = [float(v) for v in item.GraphicData]
            if item.GraphicType == "POINT":
                kind, coords = MarkKind.POINT, tuple(data[:2])
            else:
                xs, ys = data[0::2], data[1::2]
                kind, coords = MarkKind.BOX, (min(xs), min(ys), max(xs), max(ys))
            return LesionMark(str(image.ReferencedSOPInstanceUID), str(image.ReferencedSOPClassUID), kind, coords)
    return None


def parse_read_sr(sr: pydicom.Dataset) -> ReadReport:
    """A read SR (as ``build_read_sr`` makes) back as a ``ReadReport``; ``ReadError`` if it is not one.

    Any SR may sit in a forwarded study (another system's report, another AI's result), so
    whatever its structure, the answer is a report or ``ReadError``, never another exception.
    """
    try:
        return _read_report(sr)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise ReadError(f"the SR does not have the structure of a read ({type(exc).__name__}: {exc})") from exc


def _read_report(sr: pydicom.Dataset) -> ReadReport:
    if sr.get("VerificationFlag") != "VERIFIED" or not sr.get("VerifyingObserverSequence"):
        raise ReadError("the SR is not a verified report")
    observer = sr.VerifyingObserverSequence[-1]
    values: dict[str, object] = {}
    lesions = []
    for item in _content(sr):
        kind, concept = item.get("ValueType"), (_code(item, "ConceptNameCodeSequence")
                                                if item.get("ConceptNameCodeSequence") else ("", ""))
        if kind == "CODE":
            value = _code(item, "ConceptCodeSequence")
            if _is(concept, AI_AGREEMENT):
                values["agreement"] = Agreement.AGREE if _is(value, YES) else Agreement.DISAGREE
            elif _is(concept, READ_URGENCY):
                values["urgency"] = Urgency.URGENT if _is(value, URGENT) else Urgency.ROUTINE
            elif _is(concept, LYTIC_BONE_LESION) and "lesion_present" not in values:
                values["lesion_present"] = _is(value, PRESENT)  # the assessment group comes first
        elif kind == "TEXT" and _is(concept, IMPRESSION):
            values["impression"] = str(item.TextValue)
        elif kind == "COMPOSITE" and _is(concept, ASSESSED_AI_RESULT):
            values["ai_sr_uid"] = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        elif kind == "CONTAINER" and _is(concept, MEASUREMENT_GROUP) and (mark := _mark(item)) is not None:
            lesions.append(mark)
    missing = {"agreement", "urgency", "lesion_present", "impression", "ai_sr_uid"} - set(values)
    if missing:
        raise ReadError(f"the SR is not a read of this app (no {', '.join(sorted(missing))})")
    return ReadReport(
        study_uid=str(sr.StudyInstanceUID), series_uid=str(sr.SeriesInstanceUID),
        sop_instance_uid=str(sr.SOPInstanceUID), ai_sr_uid=values["ai_sr_uid"],
        radiologist=str(observer.VerifyingObserverName), organization=str(observer.get("VerifyingOrganization", "")),
        verified_at=as_utc(str(observer.VerificationDateTime)) if observer.get("VerificationDateTime")
        else datetime.fromtimestamp(0, UTC),
        agreement=values["agreement"], urgency=values["urgency"], lesion_present=values["lesion_present"],
        impression=values["impression"], lesions=tuple(lesions))


# --- storing ----------------------------------------------------------------------------------------
def save_read(client: DicomWebClient, ai_sr: pydicom.Dataset, ai: AIResult, read: Read,
              images: Sequence[pydicom.Dataset] = ()) -> ReadReport:
    """Build the read SR, store it (STOW-RS) and confirm the server holds it (QIDO-RS)."""
    sr = build_read_sr(ai_sr, ai, read, images)
    uid = str(sr.SOPInstanceUID)
    outcome = client.store([(uid, encode(sr))])
    if uid not in outcome.stored:
        raise DicomWebError(f"the server did not store the read: {outcome.failed.get(uid, 'no reason given')}; "
                            "nothing was lost, save again")
    if uid not in client.study_instance_uids(ai.study_uid):
        raise DicomWebError("the server acknowledged the read but does not list it; save again")
    log.info("read stored on the server (%s)", read.urgency)
    return parse_read_sr(sr)
