"""Worklist order and filters, the audit log's chain, the inbox order, the reader's own settings
(no server: the end-to-end test with Orthanc is tests/test_worklist_e2e.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pydicom
import pytest
from forward_helpers import write_ct_series

import app.inbox
from app.ai_result import AIResult
from app.audit import Action, AuditError, AuditLog
from app.deid import PseudonymStore
from app.dicomweb import RequestRejected, ServerUnavailable
from app.domain import ModelRef
from app.inbox import Inbox, InboxRead, fetch_reads
from app.outbox import ItemKind, Outbox
from app.reads import Agreement, LesionMark, MarkKind, ReadReport, Urgency
from app.settings import resolve_reader_settings
from app.worklist import (
    Priority,
    ReadStatus,
    WorklistEntry,
    filter_worklist,
    new_arrivals,
    sort_worklist,
)

NOW = datetime(2025, 5, 6, 12, 0, tzinfo=UTC)
MODEL = ModelRef("m", "1", "ab" * 32)


def _ai(probability: float, sent_minutes_ago: float | None) -> AIResult:
    sent = NOW - timedelta(minutes=sent_minutes_ago) if sent_minutes_ago is not None else None
    return AIResult("1.2", "1.2.3", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.88.34", probability, 0.5, probability >= 0.5,
                    MODEL, (), (), sent, "Clinic")


def _read(study: str, urgent: bool = False, minutes_ago: float = 0, uid: str = "") -> ReadReport:
    return ReadReport(study, "1.9", uid or f"{study}.99", "1.2.3.4", "Curie^Marie", "Org",
                      NOW - timedelta(minutes=minutes_ago), Agreement.AGREE,
                      Urgency.URGENT if urgent else Urgency.ROUTINE, True, "Impression",
                      (LesionMark("1.2.3.5", "1.2.840.10008.5.1.4.1.1.2", MarkKind.POINT, (1.0, 2.0)),))


def _entry(study: str, probability: float | None, waited_minutes: float | None = 10, clinic: str = "North",
           read: bool = False) -> WorklistEntry:
    ai = _ai(probability, waited_minutes) if probability is not None else None
    return WorklistEntry(study, f"case-{study}", clinic, 10, ai, (_read(study),) if read else ())


def test_suspicious_cases_come_first_then_the_longest_waiting():
    entries = [
        _entry("neg-old", 0.10, waited_minutes=300),
        _entry("pos-new", 0.60, waited_minutes=5),
        _entry("pos-old", 0.55, waited_minutes=90),
        _entry("no-ai", None),
        _entry("pos-read", 0.99, waited_minutes=600, read=True),
        _entry("neg-new", 0.30, waited_minutes=1),
    ]
    order = [e.study_uid for e in sort_worklist(entries, NOW)]
    assert order == ["pos-old", "pos-new", "neg-old", "neg-new", "no-ai", "pos-read"]
    assert [e.priority for e in sort_worklist(entries, NOW)][:5] == [
        Priority.SUSPICIOUS, Priority.SUSPICIOUS, Priority.NOT_SUSPICIOUS, Priority.NOT_SUSPICIOUS,
        Priority.NO_AI_RESULT]


def test_equal_waiting_times_fall_back_to_the_probability():
    entries = [_entry("a", 0.6, 30), _entry("b", 0.9, 30)]
    assert [e.study_uid for e in sort_worklist(entries, NOW)] == ["b", "a"]


def test_waiting_time_and_status():
    entry = _entry("x", 0.7, waited_minutes=45)
    assert entry.waiting_s(NOW) == pytest.approx(45 * 60)
    assert entry.status == ReadStatus.UNREAD and _entry("y", 0.7, read=True).status == ReadStatus.READ
    assert _entry("z", None).waiting_s(NOW) == 0.0 and _entry("z", None).arrived_at is None


def test_filters_by_status_and_clinic():
    entries = [_entry("a", 0.9, clinic="North"), _entry("b", 0.9, clinic="South", read=True),
               _entry("c", 0.1, clinic="South")]
    assert [e.study_uid for e in filter_worklist(entries, [ReadStatus.UNREAD])] == ["a", "c"]
    assert [e.study_uid for e in filter_worklist(entries, clinics=["South"])] == ["b", "c"]
    assert [e.study_uid for e in filter_worklist(entries, [ReadStatus.UNREAD], ["South"])] == ["c"]
    assert filter_worklist(entries, [], []) == entries
    assert [e.study_uid for e in new_arrivals(entries, {"a", "b"})] == ["c"]


# --- audit log ----------------------------------------------------------------------------------
def test_audit_log_appends_and_detects_tampering(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("Curie^Marie", Action.CASE_VIEWED, "2.25.1")
    log.append("Curie^Marie", Action.READ_SAVED, "2.25.1", "2.25.2", "agree, urgent, 1 mark(s)")
    log.append("nurse", Action.READ_SEEN, "2.25.1", "2.25.2")
    assert log.verify() == 3
    assert [e.action for e in log.entries()] == ["case_viewed", "read_saved", "read_seen"]
    assert oct(log.path.stat().st_mode & 0o777) == "0o600"

    lines = log.path.read_text().splitlines()
    edited = json.loads(lines[1]) | {"actor": "Someone^Else"}
    log.path.write_text("\n".join([lines[0], json.dumps(edited, sort_keys=True, separators=(",", ":")), lines[2]])
                        + "\n")
    with pytest.raises(AuditError, match="entry 3 does not follow entry 2"):
        log.verify()
    log.path.write_text("\n".join([lines[0], lines[2]]) + "\n")  # an entry removed
    with pytest.raises(AuditError, match="entry 2"):
        log.verify()


def test_audit_log_needs_an_actor_and_keeps_fields_short(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(AuditError, match="who did it"):
        log.append("  ", Action.CASE_VIEWED, "2.25.1")
    with pytest.raises(AuditError, match="longer than"):
        log.append("x", Action.READ_SAVED, "2.25.1", detail="y" * 500)
    assert not log.path.exists() or log.verify() == 0


# --- inbox ----------------------------------------------------------------------------------------
def test_inbox_lists_urgent_first_then_new_then_newest(tmp_path):
    with Inbox(tmp_path / "inbox.sqlite") as inbox:
        for study, urgent, minutes in (("s1", False, 5), ("s2", True, 50), ("s3", False, 1), ("s4", True, 2)):
            added = inbox.add(InboxRead(_read(study, urgent, minutes), f"case-{study}", f"orig-{study}",
                                        f"PID-{study}", "suspicious, p=0.90", 0.0, None, None))
            assert added
        assert not inbox.add(InboxRead(_read("s1", False, 5), "case-s1", "orig-s1", "PID-s1", "", 0.0, None, None))
        inbox.mark_seen("s4.99", "nurse")
        inbox.mark_seen("s3.99", "nurse")
        reads = inbox.reads()
        assert [r.original_patient_id for r in reads] == ["PID-s2", "PID-s4", "PID-s1", "PID-s3"]
        assert [r.is_new for r in reads] == [True, False, True, False]
        assert reads[1].seen_by == "nurse"
        assert reads[0].report == _read("s2", True, 50)  # stored and read back whole
        assert inbox.known() == {"s1.99", "s2.99", "s3.99", "s4.99"}


class ReportsServer:
    """Each delivered study holds one SR; ``failures`` maps a study to the error retrieving it raises."""

    base_url = "https://x/dicom-web"

    def __init__(self, failures: dict[str, Exception]):
        self.failures = failures

    def search_instances(self, study_instance_uid: str, **filters: str) -> list[dict]:
        return [{"00080018": {"Value": [f"{study_instance_uid}.99"]}, "0020000E": {"Value": ["1.9"]}}]

    def retrieve_instance(self, study: str, series: str, sop: str) -> pydicom.Dataset:
        if study in self.failures:
            raise self.failures[study]
        ds = pydicom.Dataset()
        ds.StudyInstanceUID, ds.PatientID = study, "PID-1"
        return ds


def test_one_report_the_server_will_not_return_does_not_hold_back_the_others(tmp_path, monkeypatch):
    monkeypatch.setattr(app.inbox, "parse_read_sr", lambda ds: _read(ds.StudyInstanceUID))
    with Outbox(tmp_path / "outbox") as outbox, PseudonymStore(tmp_path / "p.sqlite") as pseudonyms, \
            Inbox(tmp_path / "inbox.sqlite") as inbox:
        studies = []
        for seed in (1, 2, 3):
            series = write_ct_series(tmp_path / f"ct{seed}", n_slices=2, seed=seed)
            case_id = outbox.add_case(ReportsServer.base_url, False,
                                      [(ItemKind.IMAGE, pydicom.dcmread(f)) for f in series.files])
            if seed < 3:
                outbox.mark_delivered(case_id)
            else:  # still queued (one object keeps failing), but the CT is on the server and was read
                outbox.mark_confirmed(case_id, [series.sop_instance_uids[0]])
            studies.append(series.study_instance_uid)
        broken, fine, partly_sent = studies
        report = fetch_reads(ReportsServer({broken: RequestRejected("HTTP 404")}), outbox, pseudonyms, inbox)
        assert report.unretrieved == 1
        assert sorted(r.original_study_uid for r in report.new_reads) == sorted([fine, partly_sent])
        assert f"{broken}.99" not in inbox.known()  # asked for again next time
        with pytest.raises(ServerUnavailable):  # the server itself failing still stops the check
            fetch_reads(ReportsServer({broken: ServerUnavailable("down")}), outbox, pseudonyms, inbox)
        with Inbox(tmp_path / "fresh.sqlite") as fresh:  # the server goes down after some reads were stored
            stored: list[str] = []
            with pytest.raises(ServerUnavailable):
                fetch_reads(ReportsServer({partly_sent: ServerUnavailable("down")}), outbox, pseudonyms, fresh,
                            on_new_read=lambda read: stored.append(read.original_study_uid))
            # each stored read was reported (the app audits it) although the check as a whole failed
            assert sorted(stored) == sorted([broken, fine]) == sorted(r.original_study_uid for r in fresh.reads())


# --- the reader's connection --------------------------------------------------------------------------
def test_reader_has_its_own_credentials_and_shares_the_server_url(tmp_path):
    env = {"TELERAD_URL": "https://telerad.example.org/dicom-web", "TELERAD_USER": "clinic",
           "TELERAD_PASSWORD": "clinic-pw", "TELERAD_READER_USER": "reader", "TELERAD_READER_PASSWORD": "reader-pw"}
    reader = resolve_reader_settings(env=env, data_dir=tmp_path)
    assert (reader.url, reader.user, reader.password) == ("https://telerad.example.org/dicom-web", "reader",
                                                          "reader-pw")
    alone = resolve_reader_settings(env={"TELERAD_URL": env["TELERAD_URL"], "TELERAD_PASSWORD": "clinic-pw"},
                                    data_dir=tmp_path)
    assert alone.password == "" and alone.user == ""  # never the clinic's credentials
    (tmp_path / "settings.json").write_text(json.dumps({"reader": {"url": "https://read.example.org/dw",
                                                                   "user": "r2"}}))
    from_file = resolve_reader_settings(env=env, data_dir=tmp_path)
    assert from_file.url == "https://read.example.org/dw" and from_file.user == "reader"  # env beats file


def test_two_studies_of_one_patient_get_different_case_names():
    from dataclasses import replace

    from app.ui.telerad import case_name
    from app.ui.worklist_page import case_label

    first = _entry("1.2.826.0.1.111111", 0.7)
    second = replace(_entry("1.2.826.0.1.222222", 0.7), case_ref=first.case_ref)  # same patient, same clinic
    assert case_name(first) != case_name(second)
    assert case_label(first) != case_label(second)
    assert first.case_ref in case_name(first) and "North" in case_name(first)
