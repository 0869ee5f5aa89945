"""Append-only local audit log: who viewed, who read and who received what, and when.

One JSON object per line in ``<app data>/audit.jsonl`` (readable by this user only). Each entry
carries the SHA-256 of the previous line, so an edited, removed or reordered entry breaks the
chain and ``AuditLog.verify`` says where. Writers take an exclusive ``flock`` and ``fsync`` each
entry; several processes may append to the same file.

What it holds: the time (UTC), the actor (the name a user gave), the action and the objects as
the server knows them (pseudonymous Study/SOP Instance UIDs, the clinic's case id). Never a
patient name or ID, never a credential: ``append`` takes only those fields, and the pages pass
no free text of a report into ``detail``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from app.domain import AppError
from app.settings import app_data_dir

AUDIT_FILE = "audit.jsonl"
GENESIS = "0" * 64  # the "previous hash" of the first entry
MAX_FIELD = 200


class AuditError(AppError):
    """The audit log cannot be written, or its chain is broken."""


class Action(StrEnum):
    CASE_VIEWED = "case_viewed"  # a reader opened a case (images, AI result)
    READ_SAVED = "read_saved"  # a reader's verified report was stored on the server
    READ_RECEIVED = "read_received"  # the clinic fetched a read for one of its cases
    READ_SEEN = "read_seen"  # someone at the clinic acknowledged a read


@dataclass(frozen=True)
class AuditEntry:
    at: str  # ISO 8601, UTC
    actor: str
    action: str
    study_uid: str
    object_uid: str = ""  # e.g. the SOP Instance UID of the read SR
    detail: str = ""  # short coded facts ("agree, urgent"), never report text
    prev: str = GENESIS

    def line(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))


def _digest(line: str) -> str:
    return hashlib.sha256(line.encode()).hexdigest()


def _clean(value: str, what: str) -> str:
    value = " ".join(str(value).split())
    if len(value) > MAX_FIELD:
        raise AuditError(f"audit {what} is longer than {MAX_FIELD} characters")
    return value


class AuditLog:
    """The log file; cheap to create (nothing stays open between appends)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @contextmanager
    def _locked_append(self) -> Iterator[int]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open the audit log {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)  # releases the lock

    def append(self, actor: str, action: Action, study_uid: str, object_uid: str = "",
               detail: str = "") -> AuditEntry:
        """Add one entry (after the last one, whoever wrote it)."""
        actor = _clean(actor, "actor")
        if not actor:
            raise AuditError("an audit entry needs the name of who did it")
        with self._locked_append() as fd:
            lines = self._lines()
            entry = AuditEntry(at=datetime.now(UTC).isoformat(timespec="milliseconds"), actor=actor,
                               action=str(Action(action)), study_uid=_clean(study_uid, "study"),
                               object_uid=_clean(object_uid, "object"), detail=_clean(detail, "detail"),
                               prev=_digest(lines[-1]) if lines else GENESIS)
            os.write(fd, (entry.line() + "\n").encode())
            os.fsync(fd)
        return entry

    def _lines(self) -> list[str]:
        if not self.path.is_file():
            return []
        return [line for line in self.path.read_text().splitlines() if line.strip()]

    def entries(self) -> list[AuditEntry]:
        """Every entry, oldest first."""
        try:
            return [AuditEntry(**json.loads(line)) for line in self._lines()]
        except (ValueError, TypeError) as exc:
            raise AuditError(f"the audit log {self.path} has a damaged entry") from exc

    def verify(self) -> int:
        """Check the hash chain; returns the number of entries, raises AuditError at the first break."""
        previous = GENESIS
        lines = self._lines()
        for number, line in enumerate(lines, start=1):
            try:
                prev = json.loads(line)["prev"]
            except (ValueError, KeyError, TypeError):
                raise AuditError(f"audit log entry {number} is damaged") from None
            if prev != previous:
                raise AuditError(f"audit log entry {number} does not follow entry {number - 1}: "
                                 "the log was edited, truncated or reordered")
            previous = _digest(line)
        return len(lines)


def open_audit_log(data_dir: Path | None = None) -> AuditLog:
    """The audit log in the app data dir (``$MYELOMA_APP_DATA``)."""
    return AuditLog((data_dir or app_data_dir()) / AUDIT_FILE)
