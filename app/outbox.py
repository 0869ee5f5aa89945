"""Store-and-forward outbox: a persistent SQLite (WAL) queue of cases waiting for the server.

Layout in the outbox folder (``<app data>/outbox`` by default)::

    outbox.sqlite          cases and their items (one row per DICOM instance)
    cases/<case_id>/*.dcm  the exact files to send, written at enqueue time
    deliver.lock           held (flock) by the one process delivering at a time

Item states: ``pending`` (to send) -> ``sent`` (the server acknowledged it in a STOW-RS answer)
-> ``confirmed`` (a QIDO-RS query found it). A case is ``queued`` until every item is
confirmed, then ``delivered``; its files are deleted then (the rows stay for the history).
Every state change is one committed transaction, so a crash or ``kill -9`` at any point
loses nothing: unacknowledged items are simply sent again, which the server tolerates.
The database holds no credentials and no patient names or IDs (only UIDs as sent).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import pydicom

from app.domain import AppError
from app.sqlite_db import open_wal_database

log = logging.getLogger(__name__)

DB_FILE, CASES_DIR, LOCK_FILE = "outbox.sqlite", "cases", "deliver.lock"
ORPHAN_AGE_S = 3600.0  # a case folder without a row older than this is a leftover of a crash

SCHEMA = """
CREATE TABLE IF NOT EXISTS cases (
    case_id         TEXT PRIMARY KEY,
    created_at      REAL NOT NULL,
    destination     TEXT NOT NULL,
    study_uid       TEXT NOT NULL,
    deidentified    INTEGER NOT NULL,
    summary         TEXT NOT NULL DEFAULT '',
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    last_attempt_at REAL,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    delivered_at    REAL
);
CREATE TABLE IF NOT EXISTS items (
    case_id          TEXT NOT NULL REFERENCES cases(case_id) ON DELETE CASCADE,
    sop_instance_uid TEXT NOT NULL,
    kind             TEXT NOT NULL,
    file             TEXT NOT NULL,
    size             INTEGER NOT NULL,
    state            TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    last_error       TEXT,
    PRIMARY KEY (case_id, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS items_by_state ON items (case_id, state);
"""


class OutboxError(AppError):
    """The outbox cannot be read or written."""


class OutboxBusy(OutboxError):
    """Another process is delivering right now."""


class AlreadyQueued(OutboxError):
    """The study is already waiting in the outbox for that server."""

    def __init__(self, case_id: str, destination: str) -> None:
        super().__init__(f"this study is already in the outbox for {destination} (case {case_id}), waiting to be "
                         "delivered; retry that case from the Outbox page instead of forwarding it again")
        self.case_id = case_id


class CaseState(StrEnum):
    QUEUED = "queued"
    DELIVERED = "delivered"


class ItemState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    CONFIRMED = "confirmed"


class ItemKind(StrEnum):
    IMAGE = "image"  # an instance of the analysed series
    SR = "sr"
    KEY_IMAGE = "sc"


@dataclass(frozen=True)
class OutboxItem:
    case_id: str
    sop_instance_uid: str
    kind: ItemKind
    file: str
    size: int
    state: ItemState
    attempts: int
    last_error: str | None


@dataclass(frozen=True)
class CaseInfo:
    """A case as the CLI and the UI list it."""

    case_id: str
    created_at: float
    destination: str
    study_uid: str
    deidentified: bool
    summary: str
    state: CaseState
    attempts: int
    last_error: str | None
    last_attempt_at: float | None
    next_attempt_at: float
    delivered_at: float | None
    n_items: int
    n_pending: int
    n_sent: int
    n_confirmed: int


class Outbox:
    """The queue. One instance may be shared by threads; several processes may open the same folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        # Owner-only: cases sent without de-identification carry patient identities.
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.root / CASES_DIR).mkdir(mode=0o700, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._db = open_wal_database(self.root / DB_FILE)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA synchronous=FULL")  # an enqueued case must survive a power cut
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open the outbox database in {self.root}: {exc}") from exc
        self._remove_leftovers()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. IMMEDIATE: it holds the write lock from its first read, so a check
        and the write it guards (e.g. no second queued case of a study) are one step for every
        process sharing the outbox."""
        with self._lock:
            try:
                with self._db:
                    self._db.execute("BEGIN IMMEDIATE")
                    yield self._db
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox database error: {exc}") from exc

    def case_dir(self, case_id: str) -> Path:
        return self.root / CASES_DIR / case_id

    # --- enqueue -------------------------------------------------------------------------
    def add_case(self, destination: str, deidentified: bool, datasets: Iterable[tuple[ItemKind, pydicom.Dataset]],
                 summary: str = "") -> str:
        """Write the datasets into a new case folder, then register the case in one transaction.

        Raises ``AlreadyQueued`` when a queued case holds the same study with the same ``summary``
        (the same analysis) for the same server: a second forward would make the reader see the
        study twice. Checked at the first dataset, before the rest is built, and again in the
        transaction that registers the case. A new analysis (another summary) is a new case.
        """
        case_id = uuid.uuid4().hex
        folder = self.case_dir(case_id)
        folder.mkdir(mode=0o700)
        rows, study_uids = [], set()
        try:
            for number, (kind, ds) in enumerate(datasets):
                if number == 0:
                    self._refuse_if_queued(self._db, destination, ds.StudyInstanceUID, summary)
                name = f"{number:05d}_{kind}.dcm"
                path = folder / name
                with open(path, "wb") as f:
                    ds.save_as(f, enforce_file_format=True)
                    f.flush()
                    os.fsync(f.fileno())
                rows.append((case_id, ds.SOPInstanceUID, str(kind), name, path.stat().st_size,
                             str(ItemState.PENDING)))
                study_uids.add(ds.StudyInstanceUID)
            if not rows:
                raise OutboxError("a case needs at least one instance")
            if len(study_uids) != 1:
                raise OutboxError("a case must hold instances of exactly one study")
            if len({r[1] for r in rows}) != len(rows):
                raise OutboxError("a case holds two instances with the same SOP Instance UID")
            _fsync_dir(folder)
            study_uid = study_uids.pop()
            with self._transaction() as db:
                self._refuse_if_queued(db, destination, study_uid, summary)
                db.execute("INSERT INTO cases (case_id, created_at, destination, study_uid, deidentified, summary, "
                           "state) VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (case_id, time.time(), destination, study_uid, int(deidentified), summary,
                            str(CaseState.QUEUED)))
                db.executemany("INSERT INTO items (case_id, sop_instance_uid, kind, file, size, state) "
                               "VALUES (?, ?, ?, ?, ?, ?)", rows)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        log.info("outbox: queued case %s with %d instance(s)", case_id, len(rows))
        return case_id

    def _refuse_if_queued(self, db: sqlite3.Connection, destination: str, study_uid: str, summary: str) -> None:
        with self._lock:
            row = db.execute("SELECT case_id FROM cases WHERE state = 'queued' AND destination = ? AND study_uid = ? "
                             "AND summary = ?", (destination, study_uid, summary)).fetchone()
        if row:
            raise AlreadyQueued(row[0], destination)

    # --- queries ----------------------------------------------------------------------------
    _CASE_QUERY = """
        SELECT c.*, COUNT(i.sop_instance_uid) AS n_items,
               COALESCE(SUM(i.state = 'pending'), 0) AS n_pending,
               COALESCE(SUM(i.state = 'sent'), 0) AS n_sent,
               COALESCE(SUM(i.state = 'confirmed'), 0) AS n_confirmed
        FROM cases c LEFT JOIN items i ON i.case_id = c.case_id
        {where} GROUP BY c.case_id ORDER BY c.created_at, c.case_id"""

    def cases(self, state: CaseState | None = None, destination: str | None = None,
              due_before: float | None = None, case_ids: Iterable[str] | None = None) -> list[CaseInfo]:
        """Cases, oldest first, optionally filtered."""
        clauses, params = [], []
        if state is not None:
            clauses.append("c.state = ?")
            params.append(str(state))
        if destination is not None:
            clauses.append("c.destination = ?")
            params.append(destination)
        if due_before is not None:
            clauses.append("c.next_attempt_at <= ?")
            params.append(due_before)
        if case_ids is not None:
            ids = list(case_ids)
            clauses.append(f"c.case_id IN ({','.join('?' * len(ids))})")
            params += ids
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._lock:
            rows = self._db.execute(self._CASE_QUERY.format(where=where), params).fetchall()
        return [_case_info(row) for row in rows]

    def holds_study(self, destination: str, study_uid: str) -> bool:
        """Whether a case of ``study_uid`` is queued for, or was delivered to, ``destination``."""
        with self._lock:
            return self._holds_study(self._db, destination, study_uid)

    @staticmethod
    def _holds_study(db: sqlite3.Connection, destination: str, study_uid: str) -> bool:
        return db.execute("SELECT 1 FROM cases WHERE destination = ? AND study_uid = ?",
                          (destination, study_uid)).fetchone() is not None

    def case(self, case_id: str) -> CaseInfo:
        found = self.cases(case_ids=[case_id])
        if not found:
            raise OutboxError(f"no case {case_id} in the outbox")
        return found[0]

    def items(self, case_id: str, state: ItemState | None = None) -> list[OutboxItem]:
        sql, params = "SELECT * FROM items WHERE case_id = ?", [case_id]
        if state is not None:
            sql += " AND state = ?"
            params.append(str(state))
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY file", params).fetchall()
        return [OutboxItem(r["case_id"], r["sop_instance_uid"], ItemKind(r["kind"]), r["file"], r["size"],
                           ItemState(r["state"]), r["attempts"], r["last_error"]) for r in rows]

    def read_file(self, item: OutboxItem) -> bytes:
        path = self.case_dir(item.case_id) / item.file
        try:
            return path.read_bytes()
        except OSError as exc:
            raise OutboxError(f"outbox file {path} is missing or unreadable; the case cannot be sent") from exc

    # --- state changes --------------------------------------------------------------------------
    def mark_sent(self, case_id: str, uids: Iterable[str]) -> None:
        with self._transaction() as db:
            db.executemany("UPDATE items SET state = 'sent', last_error = NULL WHERE case_id = ? "
                           "AND sop_instance_uid = ? AND state = 'pending'", [(case_id, u) for u in uids])

    def mark_failed(self, case_id: str, failures: dict[str, str]) -> None:
        """Items the server refused or lost: back to pending, with the reason."""
        with self._transaction() as db:
            db.executemany("UPDATE items SET state = 'pending', attempts = attempts + 1, last_error = ? "
                           "WHERE case_id = ? AND sop_instance_uid = ?",
                           [(reason, case_id, uid) for uid, reason in failures.items()])

    def mark_confirmed(self, case_id: str, uids: Iterable[str]) -> None:
        with self._transaction() as db:
            db.executemany("UPDATE items SET state = 'confirmed', last_error = NULL WHERE case_id = ? "
                           "AND sop_instance_uid = ?", [(case_id, u) for u in uids])

    def record_failure(self, case_id: str, error: str, retry_in_s: float) -> None:
        now = time.time()
        with self._transaction() as db:
            db.execute("UPDATE cases SET attempts = attempts + 1, last_error = ?, last_attempt_at = ?, "
                       "next_attempt_at = ? WHERE case_id = ?", (error, now, now + retry_in_s, case_id))

    def mark_delivered(self, case_id: str) -> None:
        """The server confirmed every item: close the case and delete its files."""
        now = time.time()
        with self._transaction() as db:
            db.execute("UPDATE cases SET state = 'delivered', delivered_at = ?, last_attempt_at = ?, "
                       "last_error = NULL WHERE case_id = ?", (now, now, case_id))
        shutil.rmtree(self.case_dir(case_id), ignore_errors=True)
        log.info("outbox: case %s delivered", case_id)

    def retarget(self, case_id: str, destination: str) -> bool:
        """Send a queued case to ``destination`` instead (e.g. after the server address was corrected).

        Every item goes back to pending and the retry count restarts: what the old address
        acknowledged is not on the new server. When the study is already queued for, or
        delivered to, ``destination`` (e.g. forwarded again after the address was fixed), the
        case is removed instead of sending the study twice; returns False then. Refuses a
        delivered case. Takes the delivery lock (``OutboxBusy`` while another process delivers):
        a delivery to the old address must not confirm items after they were reset.
        """
        with self.delivery_lock(), self._transaction() as db:
            row = db.execute("SELECT state, study_uid, destination FROM cases WHERE case_id = ?", (case_id,)).fetchone()
            if row is None:
                raise OutboxError(f"no case {case_id} in the outbox")
            if row["state"] != CaseState.QUEUED:
                raise OutboxError(f"case {case_id} was already delivered; forward the study again to send it elsewhere")
            if row["destination"] == destination:
                raise OutboxError(f"case {case_id} is already meant for {destination}")
            there = self._holds_study(db, destination, row["study_uid"])
            if there:
                db.execute("DELETE FROM cases WHERE case_id = ?", (case_id,))
            else:
                db.execute("UPDATE cases SET destination = ?, attempts = 0, last_error = NULL, "
                           "last_attempt_at = NULL, next_attempt_at = 0 WHERE case_id = ?", (destination, case_id))
                db.execute("UPDATE items SET state = 'pending', attempts = 0, last_error = NULL WHERE case_id = ?",
                           (case_id,))
        if there:
            shutil.rmtree(self.case_dir(case_id), ignore_errors=True)
            log.info("outbox: case %s removed: its study is already queued for or delivered to %s", case_id,
                     destination)
            return False
        log.info("outbox: case %s now goes to %s", case_id, destination)
        return True

    def remove_case(self, case_id: str) -> None:
        """Drop a case and its files (e.g. the user cancels a forward that can never succeed)."""
        with self._transaction() as db:
            db.execute("DELETE FROM cases WHERE case_id = ?", (case_id,))
        shutil.rmtree(self.case_dir(case_id), ignore_errors=True)

    # --- one deliverer at a time ----------------------------------------------------------------
    @contextmanager
    def delivery_lock(self) -> Iterator[None]:
        """Exclusive across processes; the kernel releases it if the holder dies (even by kill -9)."""
        with open(self.root / LOCK_FILE, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutboxBusy("another process is delivering the outbox right now; try again shortly") from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # --- housekeeping ---------------------------------------------------------------------------
    def _remove_leftovers(self) -> None:
        """Folders of delivered cases (crash after commit) and of enqueues that never committed."""
        with self._lock:
            known = {r[0]: r[1] for r in self._db.execute("SELECT case_id, state FROM cases")}
        for folder in (self.root / CASES_DIR).iterdir():
            state = known.get(folder.name)
            try:
                orphan = state is None and time.time() - folder.stat().st_mtime > ORPHAN_AGE_S
            except FileNotFoundError:  # another process or thread removed it meanwhile
                continue
            if state == CaseState.DELIVERED or orphan:
                shutil.rmtree(folder, ignore_errors=True)


def _case_info(row: sqlite3.Row) -> CaseInfo:
    return CaseInfo(
        case_id=row["case_id"], created_at=row["created_at"], destination=row["destination"],
        study_uid=row["study_uid"], deidentified=bool(row["deidentified"]), summary=row["summary"],
        state=CaseState(row["state"]), attempts=row["attempts"], last_error=row["last_error"],
        last_attempt_at=row["last_attempt_at"], next_attempt_at=row["next_attempt_at"],
        delivered_at=row["delivered_at"], n_items=row["n_items"], n_pending=row["n_pending"],
        n_sent=row["n_sent"], n_confirmed=row["n_confirmed"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
