"""The radiologist's read SR: content, verification, reference to the AI SR, checks, dciodvfy."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta, timezone

import pydicom
import pytest
from dicom_factory import dciodvfy_errors
from forward_helpers import make_study_result
from worklist_helpers import CLINIC_SITE, ORGANIZATION, RADIOLOGIST, patient_series

from app.ai_result import NotAnAIResult, parse_ai_sr
from app.deid import PseudonymStore, StudyDeidentifier
from app.reads import (
    Agreement,
    LesionMark,
    MarkKind,
    Read,
    ReadError,
    Urgency,
    build_read_sr,
    parse_read_sr,
)
from app.results_dicom import build_results

VERIFIED_AT = datetime(2025, 3, 4, 10, 30, 15, tzinfo=timezone(timedelta(hours=1)))


def _case(folder, positive: bool):
    series = patient_series(folder / "ct", "PID-9-ORIG", "Quillfeather^Zephyrine", seed=7)
    result = make_study_result(series, positive=positive)
    objects = build_results(series, result)
    with PseudonymStore(folder / "pseudonyms.sqlite") as store:
        deidentify = StudyDeidentifier(store, series.study_instance_uid, series.patient_id, CLINIC_SITE)
        sr = deidentify(copy.deepcopy(objects.sr), generated=True)
        slices = [deidentify(pydicom.dcmread(p), generated=False) for p in series.files]
    return sr, slices, result


@pytest.fixture(scope="module")
def positive(tmp_path_factory):
    return _case(tmp_path_factory.mktemp("read_pos"), positive=True)


@pytest.fixture(scope="module")
def negative(tmp_path_factory):
    return _case(tmp_path_factory.mktemp("read_neg"), positive=False)


def _read(marks=(), agreement=Agreement.AGREE, **changes) -> Read:
    values = {"agreement": agreement, "urgency": Urgency.URGENT, "impression": "Lytic lesion, T10.",
              "lesions": tuple(marks), "radiologist": RADIOLOGIST, "organization": ORGANIZATION,
              "verified_at": VERIFIED_AT} | changes
    return Read(**values)


def _box_on(ds: pydicom.Dataset) -> LesionMark:
    return LesionMark(ds.SOPInstanceUID, ds.SOPClassUID, MarkKind.BOX, (10.0, 12.0, 20.0, 25.5))


def test_the_ai_result_is_read_back_from_the_deidentified_sr(positive):
    sr, slices, result = positive
    ai = parse_ai_sr(sr)
    assert ai.positive and ai.probability == pytest.approx(0.9) and ai.threshold == 0.5
    assert ai.model.name == "myeloma-mobilenet25d" and ai.model.sha256 == "ab" * 32 and ai.model.variant == "pqat_int8"
    assert ai.sent_by == CLINIC_SITE and ai.sent_at.tzinfo is not None
    assert abs((datetime.now(UTC) - ai.sent_at).total_seconds()) < 600  # real release time, not date-shifted
    assert ai.key_slice_uids[0] == slices[5].SOPInstanceUID
    (finding,) = ai.findings
    assert finding.sop_instance_uid == slices[5].SOPInstanceUID
    assert finding.bbox_px == result.findings[0].bbox_px
    assert finding.probability == pytest.approx(result.findings[0].peak_probability)


def test_read_sr_is_verified_signed_and_references_the_ai_sr(positive, tmp_path):
    sr, slices, _ = positive
    ai = parse_ai_sr(sr)
    read_sr = build_read_sr(sr, ai, _read([_box_on(slices[5])]), slices)
    assert read_sr.VerificationFlag == "VERIFIED"
    assert read_sr.CompletionFlag == "COMPLETE" and read_sr.PreliminaryFlag == "FINAL"
    observer = read_sr.VerifyingObserverSequence[0]
    assert observer.VerifyingObserverName == RADIOLOGIST and observer.VerifyingOrganization == ORGANIZATION
    assert observer.VerificationDateTime == "20250304093015.000000+0000"
    assert read_sr.StudyInstanceUID == sr.StudyInstanceUID and read_sr.PatientID == sr.PatientID
    assert read_sr.PatientIdentityRemoved == "YES"
    evidence = {i.ReferencedSOPInstanceUID for s in read_sr.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert evidence == {sr.SOPInstanceUID, slices[5].SOPInstanceUID}
    parsed = parse_read_sr(read_sr)
    assert parsed.ai_sr_uid == sr.SOPInstanceUID
    assert (parsed.agreement, parsed.urgency, parsed.lesion_present) == (Agreement.AGREE, Urgency.URGENT, True)
    assert parsed.impression == "Lytic lesion, T10." and parsed.radiologist == RADIOLOGIST
    assert parsed.verified_at == VERIFIED_AT
    assert parsed.lesions == (_box_on(slices[5]),)
    path = tmp_path / "read.dcm"
    read_sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []


def test_points_and_boxes_keep_their_slice_and_coordinates(positive, tmp_path):
    sr, slices, _ = positive
    marks = [_box_on(slices[5]), LesionMark(slices[3].SOPInstanceUID, slices[3].SOPClassUID, MarkKind.POINT, (7.5, 40))]
    read_sr = build_read_sr(sr, parse_ai_sr(sr), _read(marks, urgency=Urgency.ROUTINE), slices)
    parsed = parse_read_sr(pydicom.dcmread(_saved(read_sr, tmp_path)))
    assert parsed.lesions == tuple(marks) and parsed.urgency == Urgency.ROUTINE
    assert dciodvfy_errors(tmp_path / "read.dcm") == []


def _saved(ds, folder):
    path = folder / "read.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_disagreeing_with_a_negative_ai_result_means_lesion_present(negative):
    sr, slices, _ = negative
    ai = parse_ai_sr(sr)
    assert not ai.positive and ai.findings == ()
    read_sr = build_read_sr(sr, ai, _read([_box_on(slices[2])], agreement=Agreement.DISAGREE), slices)
    parsed = parse_read_sr(read_sr)
    assert parsed.lesion_present and parsed.agreement == Agreement.DISAGREE


@pytest.mark.parametrize("change, message", [
    ({"radiologist": " "}, "radiologist's name"),
    ({"organization": ""}, "organisation"),
    ({"impression": "  "}, "impression"),
    ({"verified_at": datetime(2025, 1, 1)}, "time zone"),
    ({"agreement": Agreement.DISAGREE}, "marks"),  # positive AI + disagree = no lesion, yet a mark
])
def test_an_incomplete_read_is_refused_with_what_to_change(positive, change, message):
    sr, slices, _ = positive
    with pytest.raises(ReadError, match=message):
        build_read_sr(sr, parse_ai_sr(sr), _read([_box_on(slices[5])], **change), slices)


def test_marks_must_lie_on_an_image_of_the_case(positive):
    sr, slices, _ = positive
    ai = parse_ai_sr(sr)
    outside = LesionMark(slices[5].SOPInstanceUID, slices[5].SOPClassUID, MarkKind.POINT, (70.0, 10.0))
    with pytest.raises(ReadError, match="outside the image"):
        build_read_sr(sr, ai, _read([outside]), slices)
    with pytest.raises(ReadError, match="not part of this case"):
        build_read_sr(sr, ai, _read([_box_on(slices[5])]), slices[:2])
    with pytest.raises(ReadError, match="left < right"):
        LesionMark(slices[5].SOPInstanceUID, slices[5].SOPClassUID, MarkKind.BOX, (10, 10, 5, 20))


def test_the_two_kinds_of_sr_are_told_apart(positive):
    sr, slices, _ = positive
    read_sr = build_read_sr(sr, parse_ai_sr(sr), _read(), slices)
    with pytest.raises(NotAnAIResult):
        parse_ai_sr(read_sr)
    with pytest.raises(ReadError, match="not a verified report"):
        parse_read_sr(sr)


def _content_items(ds: pydicom.Dataset):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def test_any_other_report_structure_is_a_read_error_never_a_crash(positive):
    """Other systems' reports sit in forwarded studies too: the inbox must be able to pass them over."""
    sr, slices, _ = positive
    read_sr = build_read_sr(sr, parse_ai_sr(sr), _read(), slices)
    long_codes = copy.deepcopy(read_sr)  # the same codes sent as LongCodeValue, as a system may do
    for item in _content_items(long_codes):
        for code in item.get("ConceptNameCodeSequence", []):
            code.LongCodeValue = code.CodeValue
            del code.CodeValue
    assert parse_read_sr(long_codes) == parse_read_sr(read_sr)
    broken = copy.deepcopy(read_sr)
    for item in _content_items(broken):
        if item.ValueType == "COMPOSITE":
            del item.ReferencedSOPSequence
    with pytest.raises(ReadError, match="structure of a read"):
        parse_read_sr(broken)
