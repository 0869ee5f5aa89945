"""Clinic -> teleradiologist -> clinic, end to end against a real Orthanc (DICOMweb, two users).

The clinic forwards two cases (library calls behind its "Forward for review" button); the
Worklist, Case and Inbox pages run in streamlit.testing's AppTest (tests/telerad_app.py holds
them in one navigation); what reaches the server is checked directly with QIDO-RS / WADO-RS.
"""

from __future__ import annotations

import pytest
from dicom_factory import dciodvfy_errors
from orthanc_helpers import orthanc_factory  # noqa: F401 - fixture
from streamlit.testing.v1 import AppTest
from worklist_helpers import (
    CLINIC_SITE,
    ORGANIZATION,
    RADIOLOGIST,
    READER_PASSWORD,
    TELERAD_APP,
    forward,
    patient_series,
    start_telerad,
    telerad_env,
)

from app.audit import Action, open_audit_log
from app.domain import TRIAGE_NEGATIVE, TRIAGE_POSITIVE
from app.reads import READ_SERIES_DESCRIPTION, parse_read_sr
from app.ui.telerad import CASE_KEY, ENTRIES_KEY

pytestmark = pytest.mark.orthanc

TIMEOUT_S = 60
NEGATIVE_PATIENT, POSITIVE_PATIENT = ("PID-1001-ORIG", "Roe^Richard"), ("PID-2002-ORIG", "Poe^Paula")


def page_text(at: AppTest) -> str:
    parts = []
    for kind in ("title", "markdown", "caption", "error", "warning", "success", "info", "metric", "text_input",
                 "exception", "selectbox"):
        for element in getattr(at, kind):
            parts += [str(getattr(element, attr, "")) for attr in ("value", "label", "body", "message", "options")]
    for frame in at.dataframe:
        parts.append(frame.value.to_string())
    return "\n".join(parts)


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    problems = [e.value for e in at.error if not e.value.startswith(("**AI: ", "**Read by "))]  # red = suspicious
    assert not problems, problems


def test_forward_worklist_read_and_clinic_inbox(orthanc_factory, tmp_path, monkeypatch):  # noqa: F811
    telerad = start_telerad(orthanc_factory, tmp_path / "clinic")
    telerad_env(monkeypatch, telerad)
    data = telerad.clinic_data

    # --- the clinic forwards the negative case first: it waits longer --------------------------------
    negative = patient_series(tmp_path / "neg", *NEGATIVE_PATIENT, seed=1)
    negative_study = forward(negative, positive=False, data_dir=data)
    at = AppTest.from_file(str(TELERAD_APP), default_timeout=TIMEOUT_S)
    at.run()
    assert_clean(at)
    assert list(at.dataframe[0].value["Case"]) and len(at.dataframe[0].value) == 1

    positive = patient_series(tmp_path / "pos", *POSITIVE_PATIENT, seed=2)
    positive_study = forward(positive, positive=True, data_dir=data)

    # --- the worklist refreshes, lists both, AI-suspicious first ---------------------------------------
    at.run()
    assert_clean(at)
    assert any("1 new case(s) arrived" in i.value for i in at.info)
    table = at.dataframe[0].value
    assert list(table["AI triage"]) == [TRIAGE_POSITIVE, TRIAGE_NEGATIVE]
    assert list(table["AI probability"]) == ["90.0%", "5.0%"]
    assert set(table["Clinic"]) == {CLINIC_SITE} and set(table["Status"]) == {"unread"}
    with telerad.reader_client() as client:  # the server holds the two pseudonymous studies, nothing else
        on_server = {s["0020000D"]["Value"][0] for s in client.search_studies()}
        assert on_server == {negative_study, positive_study}
        pseudo_ids = {s["00100020"]["Value"][0] for s in client.search_studies()}
    assert list(table["Case"])[0] in pseudo_ids and NEGATIVE_PATIENT[0] not in pseudo_ids
    text = page_text(at)
    for identity in (*NEGATIVE_PATIENT, *POSITIVE_PATIENT, "Roe", "Poe", READER_PASSWORD):
        assert identity not in text

    # --- the radiologist opens the suspicious case ------------------------------------------------------
    at.selectbox(key="worklist_open").set_value(positive_study)
    at.button(key="open_case").click().run()
    assert_clean(at)
    assert at.title[0].value == "Case"
    assert at.metric[0].value == "90.0%"
    assert "myeloma-mobilenet25d 1.2.0" in page_text(at)  # model identity from the SR
    slider = at.slider(key=f"case_slice_{positive_study}")
    assert slider.value == 6  # the AI's most suspicious slice (index 5 of 10) opens first
    assert any(c == "Slice 6 of 10" for image in at.get("image") for c in image.captions)

    # --- images come lazily (WADO-RS) and are fetched once per session ------------------------------------
    cache = at.session_state["case_image_cache"]
    opened = cache.fetched  # the slice shown and the key images, not the whole series
    assert opened == 1 + 3
    slider.set_value(4).run()
    assert cache.fetched == opened + 1
    slider.set_value(6).run()
    assert cache.fetched == opened + 1
    listed = at.session_state[ENTRIES_KEY]
    slider.set_value(4).run()
    assert at.session_state[ENTRIES_KEY] is listed  # moving through the slices does not query the worklist
    at.button(key="case_refresh").click().run()  # ... the refresh button does, and the case stays open
    assert_clean(at)
    assert at.session_state[ENTRIES_KEY] is not listed and at.session_state[CASE_KEY] == positive_study
    slider.set_value(6).run()

    # --- ... confirms the AI finding, adds a point on another slice and signs an urgent read ------------
    at.checkbox(key=f"confirm_{positive_study}_1").check().run()
    slider.set_value(4).run()
    at.radio(key="mark_kind").set_value("point").run()
    at.number_input(key="mark_x").set_value(20.0)
    at.number_input(key="mark_y").set_value(30.0)
    at.button(key="add_mark").click().run()
    assert_clean(at)
    marks = [m.value for m in at.markdown if m.value.startswith("R")]
    assert marks == ["R1: box (27, 33, 38, 44) on slice 6 - confirmed AI finding F1", "R2: point (20, 30) on slice 4"]
    sign = f"sign_read_{positive_study}"
    assert at.radio(key=f"read_agreement_{positive_study}").value is None  # a decision, not a default
    at.button(key=sign).click().run()
    assert any("Choose whether you agree" in e.value for e in at.error), page_text(at)
    at.radio(key=f"read_agreement_{positive_study}").set_value("agree")
    at.radio(key=f"read_urgency_{positive_study}").set_value("urgent")
    at.text_area(key=f"read_impression_{positive_study}").input(
        "Lytic lesions in two vertebrae. Recommend haematology review.").run()
    at.switch_page("../app/ui/page_scripts/worklist.py").run()  # a look at the worklist keeps the draft
    at.switch_page("../app/ui/page_scripts/case.py").run()
    assert_clean(at)
    assert at.checkbox(key=f"confirm_{positive_study}_1").value
    assert at.radio(key=f"read_urgency_{positive_study}").value == "urgent"
    assert at.text_area(key=f"read_impression_{positive_study}").value.startswith("Lytic lesions in two vertebrae")
    at.button(key=sign).click().run()
    assert_clean(at)
    assert any("Read saved on the server" in s.value for s in at.success), page_text(at)
    at.button(key=sign).click().run()  # a second click on the same read sends nothing
    assert any("already sent" in i.value for i in at.info), page_text(at)

    # --- what the server holds: a verified SR that references the AI SR, and passes dciodvfy ------------
    with telerad.reader_client() as client:
        srs = client.search_instances(positive_study, Modality="SR")
        by_description = {s["0008103E"]["Value"][0]: s for s in srs}
        read_item = by_description[READ_SERIES_DESCRIPTION]
        read_sr = client.retrieve_instance(positive_study, read_item["0020000E"]["Value"][0],
                                           read_item["00080018"]["Value"][0])
        ai_uid = next(s["00080018"]["Value"][0] for d, s in by_description.items() if d != READ_SERIES_DESCRIPTION)
    assert len(srs) == 2
    assert read_sr.VerificationFlag == "VERIFIED" and read_sr.CompletionFlag == "COMPLETE"
    observer = read_sr.VerifyingObserverSequence[0]
    assert observer.VerifyingObserverName == RADIOLOGIST and observer.VerifyingOrganization == ORGANIZATION
    assert len(observer.VerificationDateTime) >= 14
    evidence = {item.ReferencedSOPInstanceUID for study in read_sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    assert ai_uid in evidence
    read = parse_read_sr(read_sr)
    assert read.ai_sr_uid == ai_uid and read.urgent and read.lesion_present
    assert [m.kind for m in read.lesions] == ["box", "point"]
    assert read_sr.PatientID in pseudo_ids and read_sr.PatientIdentityRemoved == "YES"
    path = tmp_path / "read.dcm"
    read_sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []

    # --- the worklist shows it read ---------------------------------------------------------------------
    at.switch_page("../app/ui/page_scripts/worklist.py").run()
    assert_clean(at)
    assert len(at.dataframe[0].value) == 1  # default filter: unread only
    at.multiselect(key="worklist_status").set_value(["unread", "read"]).run()
    table = at.dataframe[0].value
    assert list(table["Status"]) == ["unread", "read (urgent, agrees with AI)"]

    # --- the clinic's inbox shows the read against the original patient ----------------------------------
    at.switch_page("../app/ui/page_scripts/inbox.py").run()
    assert_clean(at)
    inbox = at.dataframe[0].value
    assert list(inbox["Patient ID"]) == [POSITIVE_PATIENT[0]]
    assert list(inbox["Study"]) == [positive.study_instance_uid]
    assert list(inbox["Flag"]) == ["URGENT NEW"]
    assert list(inbox["Radiologist"]) == ["Curie Marie"]
    at.button(key=f"seen_{read.sop_instance_uid}").click().run()
    assert_clean(at)
    assert list(at.dataframe[0].value["Flag"]) == ["URGENT"]

    # --- the audit log: who viewed, read, received and acknowledged; no identity, no credentials ---------
    log = open_audit_log(data)
    assert log.verify() == 4
    entries = log.entries()
    assert [e.action for e in entries] == [Action.CASE_VIEWED, Action.READ_SAVED, Action.READ_RECEIVED,
                                           Action.READ_SEEN]
    assert entries[0].actor == entries[1].actor == RADIOLOGIST
    assert {e.study_uid for e in entries} == {positive_study}
    raw = log.path.read_text()
    for secret in (*POSITIVE_PATIENT, positive.study_instance_uid, READER_PASSWORD, telerad.server.password):
        assert secret not in raw


def test_worklist_filters_by_clinic_and_reader_credentials_are_its_own(orthanc_factory, tmp_path,  # noqa: F811
                                                                        monkeypatch):
    telerad = start_telerad(orthanc_factory, tmp_path / "north", site_name="Clinic North")
    south = tmp_path / "south"
    south.mkdir()
    (south / "settings.json").write_text((telerad.clinic_data / "settings.json").read_text()
                                         .replace("Clinic North", "Clinic South"))
    telerad_env(monkeypatch, telerad)
    forward(patient_series(tmp_path / "a", "PID-A", "A^A", seed=3), positive=False, data_dir=telerad.clinic_data)
    forward(patient_series(tmp_path / "b", "PID-B", "B^B", seed=4), positive=False, data_dir=south)

    at = AppTest.from_file(str(TELERAD_APP), default_timeout=TIMEOUT_S)
    at.run()
    assert_clean(at)
    assert sorted(at.dataframe[0].value["Clinic"]) == ["Clinic North", "Clinic South"]
    at.multiselect(key="worklist_clinics").set_value(["Clinic South"]).run()
    assert list(at.dataframe[0].value["Clinic"]) == ["Clinic South"]

    monkeypatch.setenv("TELERAD_READER_PASSWORD", "wrong")  # the clinic's credentials are not used instead
    at.run()
    assert not at.exception
    assert any("refused the credentials" in e.value for e in at.error)
    assert "wrong" not in page_text(at)


def test_reads_are_pseudonymous_on_the_server(orthanc_factory, tmp_path, monkeypatch):  # noqa: F811
    """No object on the server, the read included, carries the clinic's patient identity."""
    telerad = start_telerad(orthanc_factory, tmp_path / "clinic")
    telerad_env(monkeypatch, telerad)
    series = patient_series(tmp_path / "ct", "PID-7-ORIG", "Secret^Sam", seed=5)
    forward(series, positive=True, data_dir=telerad.clinic_data)
    for ds in telerad.server.datasets():
        assert ds.PatientID != "PID-7-ORIG" and "Secret" not in str(ds.PatientName)
        assert ds.InstitutionName == "Clinic North"
        released = ds.ContributingEquipmentSequence[-1]
        assert released.PurposeOfReferenceCodeSequence[0].CodeValue == "109104"
        assert released.InstitutionName == "Clinic North" and released.ContributionDateTime.endswith("+0000")
