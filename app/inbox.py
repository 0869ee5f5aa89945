"""The clinic's inbox: radiologists' reads of the cases this clinic sent, matched to its patients.

``fetch_reads(client, outbox, pseudonyms, inbox)`` looks (QIDO-RS, one query per case) for new
SRs in the studies of the cases the outbox delivered to this server in the last
``lookback_days`` (and of cases still queued but partly on the server), fetches them (WADO-RS), keeps the verified reads (``app.reads``) and records
each in the local inbox database together with the patient it belongs to: the pseudonymous study
is mapped back through the de-identification mapping (``app.deid.PseudonymStore``); a case sent
with identity needs no mapping. The inbox database stays at the clinic, like the mapping.

``Inbox.reads()`` lists them urgent first, then new (not yet acknowledged), then newest.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from app.deid import PseudonymStore
from app.dicomweb import AuthenticationFailed, DicomWebClient, DicomWebError
from app.outbox import CaseInfo, CaseState, ItemKind, Outbox
from app.reads import Agreement, LesionMark, MarkKind, ReadError, ReadReport, Urgency, parse_read_sr
from app.settings import app_data_dir
from app.sqlite_db import open_wal_database

log = logging.getLogger(__name__)

INBOX_DB = "inbox.sqlite"
LOOKBACK_DAYS = 30.0
SERIES_UID, SOP_UID = "0020000E", "00080018"

SCHEMA = """
CREATE TABLE IF NOT EXISTS reads (
    sop_instance_uid    TEXT PRIMARY KEY,
    case_id             TEXT NOT NULL,
    sent_study_uid      TEXT NOT NULL,
    original_study_uid  TEXT NOT NULL,
    original_patient_id TEXT NOT NULL,
    ai_summary          TEXT NOT NULL,
    report              TEXT NOT NULL,
    received_at         REAL NOT NULL,
    seen_at             REAL,
    seen_by             TEXT
);
CREATE TABLE IF NOT EXISTS ignored (sop_instance_uid TEXT PRIMARY KEY);
"""


@dataclass(frozen=True)
class InboxRead:
    """A read as the clinic sees it: against its own patient and study."""

    report: ReadReport
    case_id: str
    original_study_uid: str
    original_patient_id: str
    ai_summary: str  # the AI call as the clinic sent it (outbox summary)
    received_at: float
    seen_at: float | None
    seen_by: str | None

    @property
    def is_new(self) -> bool:
        return self.seen_at is None


@dataclass
class FetchReport:
    cases_checked: int = 0
    new_reads: list[InboxRead] = field(default_factory=list)
    unmatched: int = 0  # reads whose study the de-identification mapping does not know
    unretrieved: int = 0  # reports the server listed but would not return (tried again next time)


def _report_json(report: ReadReport) -> str:
    document = asdict(report)
    document["verified_at"] = report.verified_at.isoformat()
    return json.dumps(document)


def _report_from_json(text: str) -> ReadReport:
    d = json.loads(text)
    lesions = tuple(LesionMark(m["sop_instance_uid"], m["sop_class_uid"], MarkKind(m["kind"]), tuple(m["coords"]))
                    for m in d.pop("lesions"))
    return ReadReport(**{**d, "verified_at": datetime.fromisoformat(d["verified_at"]),
                         "agreement": Agreement(d["agreement"]), "urgency": Urgency(d["urgency"]),
                         "lesions": lesions})


class Inbox:
    """The local database of reads received (SQLite, WAL); shared by threads."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = open_wal_database(self.path)
        with self._db:
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Inbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def known(self) -> set[str]:
        """SOP Instance UIDs already handled (stored reads and SRs that are not reads)."""
        with self._lock:
            rows = self._db.execute("SELECT sop_instance_uid FROM reads UNION SELECT sop_instance_uid FROM ignored")
            return {r[0] for r in rows}

    def ignore(self, sop_instance_uid: str) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT OR IGNORE INTO ignored VALUES (?)", (sop_instance_uid,))

    def add(self, read: InboxRead) -> bool:
        """Record a read; False if it was there already."""
        with self._lock, self._db:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO reads VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
                (read.report.sop_instance_uid, read.case_id, read.report.study_uid, read.original_study_uid,
                 read.original_patient_id, read.ai_summary, _report_json(read.report), read.received_at))
            return cursor.rowcount == 1

    def mark_seen(self, sop_instance_uid: str, who: str) -> None:
        with self._lock, self._db:
            self._db.execute("UPDATE reads SET seen_at = ?, seen_by = ? WHERE sop_instance_uid = ? AND seen_at IS NULL",
                             (time.time(), who, sop_instance_uid))

    def reads(self) -> list[InboxRead]:
        """Urgent first, then new, then the most recently verified."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM reads").fetchall()
        found = [InboxRead(report=_report_from_json(r[6]), case_id=r[1], original_study_uid=r[3],
                           original_patient_id=r[4], ai_summary=r[5], received_at=r[7], seen_at=r[8], seen_by=r[9])
                 for r in rows]
        return sorted(found, key=lambda r: (not r.report.urgent, not r.is_new, -r.report.verified_at.timestamp()))


def open_inbox(data_dir: Path | None = None) -> Inbox:
    return Inbox((data_dir or app_data_dir()) / INBOX_DB)


def _may_have_reads(case: CaseInfo, since: float) -> bool:
    """Delivered since ``since``; or still queued but partly on the server (the CT can be read while
    one of the app's objects keeps failing)."""
    if case.state == CaseState.DELIVERED:
        return (case.delivered_at or 0) >= since
    return case.n_confirmed > 0 and case.created_at >= since


def fetch_reads(client: DicomWebClient, outbox: Outbox, pseudonyms: PseudonymStore, inbox: Inbox,
                lookback_days: float = LOOKBACK_DAYS,
                on_new_read: Callable[[InboxRead], None] | None = None) -> FetchReport:
    """Fetch the reads of recently forwarded cases (see ``_may_have_reads``) that the inbox does not have yet.

    ``on_new_read`` is called for each read as it is stored (e.g. the audit entry), so a fetch
    that fails part-way has still accounted for the reads it stored: they are not new next time.
    """
    report = FetchReport()
    since = time.time() - lookback_days * 86400
    cases = [c for c in outbox.cases(destination=client.base_url) if _may_have_reads(c, since)]
    known = inbox.known()
    for case in cases:
        report.cases_checked += 1
        own = {i.sop_instance_uid for i in outbox.items(case.case_id) if i.kind == ItemKind.SR}  # the AI SR
        for item in client.search_instances(case.study_uid, Modality="SR"):
            sop = (item.get(SOP_UID, {}).get("Value") or [""])[0]
            if not sop or sop in known or sop in own:
                continue
            series = (item.get(SERIES_UID, {}).get("Value") or [""])[0]
            try:
                ds = client.retrieve_instance(case.study_uid, series, sop)
            except DicomWebError as exc:
                if exc.retryable or isinstance(exc, AuthenticationFailed):  # the server, not this report
                    raise
                # One report the server will not return must not hold back the reads of later cases.
                log.warning("inbox: a report of case %s could not be retrieved (%s); trying again next time",
                            case.case_id, exc)
                report.unretrieved += 1
                continue
            try:
                read = parse_read_sr(ds)
            except ReadError:
                inbox.ignore(sop)  # an SR that is not a read (e.g. another AI result): never fetched again
                continue
            if case.deidentified:
                pseudonym = pseudonyms.by_pseudonymous_study(case.study_uid)
                if pseudonym is None:
                    log.warning("a read came back for case %s, but the de-identification mapping does not know "
                                "its study; it is not shown", case.case_id)
                    report.unmatched += 1
                    continue
                original_study, original_patient = pseudonym.original_study_uid, pseudonym.original_patient_id
            else:
                original_study, original_patient = case.study_uid, str(ds.get("PatientID", ""))
            entry = InboxRead(report=read, case_id=case.case_id, original_study_uid=original_study,
                              original_patient_id=original_patient, ai_summary=case.summary,
                              received_at=time.time(), seen_at=None, seen_by=None)
            if inbox.add(entry):
                report.new_reads.append(entry)
                known.add(sop)
                if on_new_read is not None:
                    on_new_read(entry)
    log.info("inbox: checked %d case(s), %d new read(s)", report.cases_checked, len(report.new_reads))
    return report
