"""De-identification: PS3.15 Basic Profile via dicognito, consistent UIDs across CT + SR + SC, pseudonym map."""

from __future__ import annotations

import copy
import sqlite3

import pydicom
import pytest

from app.deid import Pseudonym, PseudonymStore, StudyDeidentifier
from app.domain import AppError
from app.results_dicom import build_results
from tests.forward_helpers import (
    ACCESSION,
    BIRTH_DATE,
    INSTITUTION,
    PATIENT_ID,
    PATIENT_NAME,
    make_study_result,
    write_ct_series,
)


def original_identifiers() -> set[str]:
    """Strings that must not survive de-identification (name parts, IDs, birth date)."""
    return {*(part for part in PATIENT_NAME.split("^") if len(part) > 2), PATIENT_ID, BIRTH_DATE, ACCESSION,
            INSTITUTION}


def original_uids(datasets: list[pydicom.Dataset]) -> set[str]:
    """Every instance-level UID in the originals (study, series, SOP instances, frame of reference...)."""
    found = set()
    for ds in datasets:
        ds.walk(lambda _, elem: found.update(_uid_values(elem)))
    return {uid for uid in found if not uid.startswith("1.2.840.10008.")}  # DICOM-defined class/syntax UIDs stay


def _uid_values(elem) -> list[str]:
    if elem.VR != "UI" or not elem.value:
        return []
    return [str(v) for v in (elem.value if elem.VM > 1 else [elem.value])]


def all_text(ds: pydicom.Dataset) -> list[str]:
    values: list[str] = []

    def collect(_, elem) -> None:
        if elem.VR in ("PN", "LO", "SH", "DA", "LT", "ST", "UT", "UI", "CS", "DT") and elem.value:
            values.extend(str(v) for v in (elem.value if elem.VM > 1 else [elem.value]))

    ds.walk(collect)
    for elem in ds.file_meta:
        collect(None, elem)
    return values


@pytest.fixture
def study(tmp_path):
    series = write_ct_series(tmp_path / "ct", n_slices=10)
    objects = build_results(series, make_study_result(series))
    slices = [pydicom.dcmread(f) for f in series.files]
    return series, slices, objects.datasets


def _deidentify(store, series, datasets):
    """As forwarding does it: the app's own objects (SR, key images) are flagged as generated."""
    deidentify = StudyDeidentifier(store, series.study_instance_uid, series.patient_id)
    return ([deidentify(copy.deepcopy(ds), generated=ds.Modality != "CT") for ds in datasets],
            deidentify.pseudonym)


def test_no_patient_identity_or_original_uid_remains(study, tmp_path):
    series, slices, results = study
    originals = slices + results
    forbidden_uids = original_uids(originals)
    assert series.study_instance_uid in forbidden_uids and len(forbidden_uids) > 15
    with PseudonymStore(tmp_path / "p.sqlite") as store:
        out, _ = _deidentify(store, series, originals)
    for ds in out:
        text = all_text(ds)
        leaked = {s for s in original_identifiers() for v in text if s.upper() in v.upper()}
        assert not leaked, f"{ds.Modality}: identity survived: {leaked}"
        assert not forbidden_uids & set(text), f"{ds.Modality}: an original UID survived"
        assert ds.PatientIdentityRemoved == "YES"
        assert "DICOGNITO" in ds.DeidentificationMethod
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert ds.PatientBirthDate == ""
        assert ds.PatientSex == "F"  # patient characteristics are kept (and declared: 113108)


def test_uids_are_remapped_consistently_so_sr_references_stay_valid(study, tmp_path):
    series, slices, results = study
    with PseudonymStore(tmp_path / "p.sqlite") as store:
        out, pseudonym = _deidentify(store, series, slices + results)
    ct, sr, key_images = out[:len(slices)], out[len(slices)], out[len(slices) + 1:]
    sent_uids = {ds.SOPInstanceUID for ds in out}
    assert len(sent_uids) == len(out)
    assert {ds.StudyInstanceUID for ds in out} == {pseudonym.pseudo_study_uid}
    assert len({ds.SeriesInstanceUID for ds in ct}) == 1
    assert {ds.FrameOfReferenceUID for ds in ct} == {ct[0].FrameOfReferenceUID}
    referenced = set()
    sr.walk(lambda _, e: referenced.add(e.value) if e.keyword == "ReferencedSOPInstanceUID" else None)
    assert referenced and referenced <= sent_uids, "every SR reference points at a forwarded instance"
    assert {sc.SourceImageSequence[0].ReferencedSOPInstanceUID for sc in key_images} <= {d.SOPInstanceUID for d in ct}
    for ds in out:
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_pseudonym_map_stays_local_and_matches_returning_reads(study, tmp_path):
    series, slices, results = study
    path = tmp_path / "p.sqlite"
    with PseudonymStore(path) as store:
        first, pseudonym = _deidentify(store, series, slices[:2])
        assert store.by_pseudonymous_study(pseudonym.pseudo_study_uid) == pseudonym
        assert store.by_original_study(series.study_instance_uid) == pseudonym
        assert pseudonym.original_patient_id == PATIENT_ID
        assert pseudonym.pseudo_patient_id == first[0].PatientID != PATIENT_ID
        assert store.by_pseudonymous_study("1.2.3.4") is None
    with PseudonymStore(path) as reopened:  # same installation, later: same pseudonyms, mapping kept
        again, same = _deidentify(reopened, series, slices[:2])
        assert (same.pseudo_study_uid, same.pseudo_patient_id) == (pseudonym.pseudo_study_uid,
                                                                   pseudonym.pseudo_patient_id)
        assert [d.SOPInstanceUID for d in again] == [d.SOPInstanceUID for d in first], "a resend is the same object"
        assert reopened.by_pseudonymous_study(pseudonym.pseudo_study_uid).original_study_uid == series.study_instance_uid
    with PseudonymStore(tmp_path / "other_site.sqlite") as other:  # another installation: other secret
        _, elsewhere = _deidentify(other, series, slices[:1])
        assert elsewhere.pseudo_patient_id != pseudonym.pseudo_patient_id


def test_source_free_text_is_removed_but_the_ai_labels_stay(study, tmp_path):
    series, slices, results = study
    ct = copy.deepcopy(slices[0])
    request = pydicom.Dataset()
    request.RequestedProcedureDescription = "CT for Zephyrine Quillfeather, room 4"
    ct.RequestAttributesSequence = [request]
    ct.ImageComments = "operator: Smith"
    with PseudonymStore(tmp_path / "p.sqlite") as store:
        out, _ = _deidentify(store, series, [ct, *results])
    assert "StudyDescription" not in out[0] and "SeriesDescription" not in out[0] and "ImageComments" not in out[0]
    assert "RequestedProcedureDescription" not in out[0].RequestAttributesSequence[0]
    sr, key_images = out[1], out[2:]
    assert "StudyDescription" not in sr, "copied from the source: removed"
    assert "NOT FOR DIAGNOSTIC USE" in sr.SeriesDescription
    assert all("NOT FOR DIAGNOSTIC USE" in sc.SeriesDescription and sc.ImageComments for sc in key_images)


def test_private_elements_are_removed(study, tmp_path):
    series, slices, _ = study
    ds = copy.deepcopy(slices[0])
    block = ds.private_block(0x0011, "ACME SCANNER", create=True)
    block.add_new(0x01, "LO", "operator: Quillfeather^Zephyrine")
    with PseudonymStore(tmp_path / "p.sqlite") as store:
        (out,), _ = _deidentify(store, series, [ds])
    assert not any(elem.tag.is_private for elem in out.iterall())


def test_burned_in_annotation_and_foreign_instances_are_refused(study, tmp_path):
    series, slices, _ = study
    burned = copy.deepcopy(slices[0])
    burned.BurnedInAnnotation = "YES"
    foreign = copy.deepcopy(slices[1])
    foreign.StudyInstanceUID = pydicom.uid.generate_uid()
    with PseudonymStore(tmp_path / "p.sqlite") as store:
        with pytest.raises(AppError, match="burned-in"):
            _deidentify(store, series, [burned])
        with pytest.raises(AppError, match="another study"):
            _deidentify(store, series, [foreign])


def test_identifying_attributes_dicognito_passes_through_are_removed(study, tmp_path):
    series, slices, results = study
    ct = copy.deepcopy(slices[0])
    ct.AdmissionID, ct.ServiceEpisodeID, ct.PatientInstitutionResidence = "ADM-555123", "EP-77", "Ward Quillfeather"
    ct.MedicalAlerts, ct.Allergies = "Quillfeather alert", "penicillin (Quillfeather)"
    ct.DeviceSerialNumber, ct.StationName = "SN-998877", "CT-QUILL"
    ct.PatientBirthTime = "073000"
    request = pydicom.Dataset()
    request.ReasonForTheRequestedProcedure = "f/u, pt Quillfeather"
    ct.RequestAttributesSequence = [request]
    operator = pydicom.Dataset()
    operator.PersonAddress, operator.PersonTelephoneNumbers = "1 Quill Lane", "555-0199"
    ct.OperatorIdentificationSequence = [operator]
    institution = pydicom.Dataset()
    institution.CodeValue, institution.CodingSchemeDesignator = "SEH", "LOCAL"
    institution.CodeMeaning = "St Quillfeather Hospital"
    ct.InstitutionCodeSequence = [institution]
    nested = pydicom.Dataset()
    nested.PatientBirthDate = BIRTH_DATE
    ct.ReferencedPatientSequence = [nested]
    ct.add_new(0x60000022, "LO", "Quillfeather Zephyrine")  # overlay description
    ct.add_new(0x60003000, "OW", bytes(512))  # overlay data
    with PseudonymStore(tmp_path / "p.sqlite") as store:
        (out,), _ = _deidentify(store, series, [ct])
    assert not [v for v in all_text(out) if "QUILL" in v.upper() or v in ("ADM-555123", "EP-77", "SN-998877")]
    for keyword in ("AdmissionID", "ServiceEpisodeID", "DeviceSerialNumber", "StationName", "PatientBirthTime",
                    "OperatorIdentificationSequence", "InstitutionCodeSequence", "MedicalAlerts", "Allergies"):
        assert keyword not in out, keyword
    assert "ReasonForTheRequestedProcedure" not in out.RequestAttributesSequence[0]
    assert out.ReferencedPatientSequence[0].PatientBirthDate == ""
    assert not any(0x6000 <= elem.tag.group <= 0x601E for elem in out.iterall())


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")  # the placeholder date, on purpose
def test_placeholder_dates_and_missing_patient_id_do_not_stop_or_split_the_case(study, tmp_path):
    series, slices, results = study
    ct = [copy.deepcopy(ds) for ds in slices[:2]]
    for ds in ct:
        ds.PatientBirthDate = "00000000"  # "unknown", common for emergency patients
        del ds.PatientID  # the slices have none; the results made from them carry an empty one (Type 2)
    made = [copy.deepcopy(ds) for ds in results]
    for ds in made:
        ds.PatientID = ""
    with PseudonymStore(tmp_path / "p.sqlite") as store:
        out, pseudonym = _deidentify(store, series, [*ct, *made])
    assert {ds.PatientID for ds in out} == {pseudonym.pseudo_patient_id} and pseudonym.pseudo_patient_id
    bad_time = copy.deepcopy(slices[2])
    bad_time.StudyDate = "2024-05-06"
    with PseudonymStore(tmp_path / "p.sqlite") as store, pytest.raises(AppError, match="date or time"):
        _deidentify(store, series, [bad_time])


def test_a_study_sent_again_under_a_corrected_patient_id_keeps_both_pseudonyms(study, tmp_path):
    series, slices, _ = study
    with PseudonymStore(tmp_path / "p.sqlite") as store:
        _, first = _deidentify(store, series, slices[:1])
        corrected = StudyDeidentifier(store, series.study_instance_uid, "MERGED-0042")
        corrected(copy.deepcopy(slices[0]))
        second = corrected.pseudonym
        assert second.pseudo_study_uid != first.pseudo_study_uid
        for pseudonym in (first, second):  # a read of either study comes home
            assert store.by_pseudonymous_study(pseudonym.pseudo_study_uid).original_study_uid == \
                series.study_instance_uid
        assert store.by_original_study(series.study_instance_uid).original_patient_id in (PATIENT_ID, "MERGED-0042")


def test_a_pseudonym_map_of_the_first_layout_is_carried_over(tmp_path):
    path = tmp_path / "p.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE studies (original_study_uid TEXT PRIMARY KEY, original_patient_id TEXT NOT NULL, "
                   "pseudo_study_uid TEXT NOT NULL UNIQUE, pseudo_patient_id TEXT NOT NULL, created_at REAL NOT NULL)")
        db.execute("INSERT INTO studies VALUES ('1.2.3', 'PID-1', '2.25.9', 'PSEUDO', 1.0)")
    with PseudonymStore(path) as store:
        assert store.by_pseudonymous_study("2.25.9") == Pseudonym("1.2.3", "PID-1", "2.25.9", "PSEUDO", 1.0)
