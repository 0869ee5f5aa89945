"""The teleradiologist's worklist: forwarded studies on the server, their AI result and read status.

``fetch_worklist(client, cache)`` asks the server (QIDO-RS) for its studies and for every SR in
them, fetches each SR it has not seen yet (WADO-RS) and sorts it into the case's AI result
(``app.ai_result``) or a radiologist's read (``app.reads``). SRs never change, so ``cache`` (a
dict kept for the session) makes a refresh cost two queries plus the new SRs.

Order (``sort_worklist``): unread before read; then AI priority - suspicious first, then not
suspicious, then cases whose AI result has not arrived (yet); then the longest waiting first
(time since the clinic released the case); then the higher probability. ``filter_worklist``
keeps the chosen read statuses and sending clinics.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum, StrEnum

from app.ai_result import AIResult, NotAnAIResult, parse_ai_sr
from app.dicomweb import DicomWebClient
from app.reads import ReadError, ReadReport, parse_read_sr

log = logging.getLogger(__name__)

STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
PATIENT_ID, INSTITUTION, N_INSTANCES = "00100020", "00080080", "00201208"
UNKNOWN_CLINIC = "(not named)"

SrContent = AIResult | ReadReport | None  # None: an SR this app does not read


class ReadStatus(StrEnum):
    UNREAD = "unread"
    READ = "read"


class Priority(IntEnum):
    """AI priority tiers, most urgent first."""

    SUSPICIOUS = 0
    NOT_SUSPICIOUS = 1
    NO_AI_RESULT = 2


@dataclass(frozen=True)
class WorklistEntry:
    study_uid: str
    case_ref: str  # the pseudonymous Patient ID the server holds (no identity)
    clinic: str
    n_instances: int
    ai: AIResult | None
    reads: tuple[ReadReport, ...]  # oldest first

    @property
    def status(self) -> ReadStatus:
        return ReadStatus.READ if self.reads else ReadStatus.UNREAD

    @property
    def latest_read(self) -> ReadReport | None:
        return self.reads[-1] if self.reads else None

    @property
    def arrived_at(self) -> datetime | None:
        return self.ai.sent_at if self.ai else None

    @property
    def priority(self) -> Priority:
        if self.ai is None:
            return Priority.NO_AI_RESULT
        return Priority.SUSPICIOUS if self.ai.positive else Priority.NOT_SUSPICIOUS

    def waiting_s(self, now: datetime) -> float:
        """Seconds since the clinic released the case (0 when unknown)."""
        return max(0.0, (now - self.arrived_at).total_seconds()) if self.arrived_at else 0.0


def _value(item: dict, tag: str, default=""):
    values = item.get(tag, {}).get("Value") or [default]
    return values[0]


def _classify(sr) -> SrContent:
    """An SR fetched from the server: a read (verified), an AI result, or something else (None)."""
    try:
        return parse_read_sr(sr) if sr.get("VerificationFlag") == "VERIFIED" else parse_ai_sr(sr)
    except (ReadError, NotAnAIResult) as exc:
        log.info("ignoring an SR this app does not read: %s", exc)
        return None


def fetch_sr_contents(client: DicomWebClient, cache: dict[str, SrContent]) -> dict[str, list[SrContent]]:
    """Every SR on the server, by study: parsed from the cache, or fetched once (WADO-RS)."""
    by_study: dict[str, list[SrContent]] = {}
    for item in client.search_all_instances(Modality="SR"):
        study, series, sop = _value(item, STUDY_UID), _value(item, SERIES_UID), _value(item, SOP_UID)
        if sop not in cache:
            cache[sop] = _classify(client.retrieve_instance(study, series, sop))
        by_study.setdefault(study, []).append(cache[sop])
    return by_study


def fetch_worklist(client: DicomWebClient, cache: dict[str, SrContent] | None = None) -> list[WorklistEntry]:
    """Every study on the server with its AI result and reads (unsorted)."""
    cache = {} if cache is None else cache
    srs = fetch_sr_contents(client, cache)
    entries = []
    for study in client.search_studies(includefield=INSTITUTION):
        uid = _value(study, STUDY_UID)
        contents = srs.get(uid, [])
        results = [c for c in contents if isinstance(c, AIResult)]
        reads = sorted((c for c in contents if isinstance(c, ReadReport)), key=lambda r: r.verified_at)
        ai = max(results, key=lambda r: r.sent_at or datetime.min.replace(tzinfo=UTC), default=None)
        clinic = str(_value(study, INSTITUTION)) or (ai.sent_by if ai else "") or UNKNOWN_CLINIC
        entries.append(WorklistEntry(study_uid=uid, case_ref=str(_value(study, PATIENT_ID)), clinic=clinic,
                                     n_instances=int(_value(study, N_INSTANCES, 0) or 0), ai=ai,
                                     reads=tuple(reads)))
    return entries


def priority_key(entry: WorklistEntry, now: datetime) -> tuple:
    probability = entry.ai.probability if entry.ai else 0.0
    return (entry.status != ReadStatus.UNREAD, int(entry.priority), -entry.waiting_s(now), -probability,
            entry.study_uid)


def sort_worklist(entries: Iterable[WorklistEntry], now: datetime | None = None) -> list[WorklistEntry]:
    """Unread first, then AI priority, then the longest waiting (see the module docstring)."""
    now = now or datetime.now(UTC)
    return sorted(entries, key=lambda e: priority_key(e, now))


def filter_worklist(entries: Iterable[WorklistEntry], statuses: Collection[ReadStatus] | None = None,
                    clinics: Collection[str] | None = None) -> list[WorklistEntry]:
    """Entries whose status and clinic are among those chosen (None or empty: all)."""
    return [e for e in entries if (not statuses or e.status in statuses) and (not clinics or e.clinic in clinics)]


def new_arrivals(entries: Iterable[WorklistEntry], known: Collection[str]) -> list[WorklistEntry]:
    """Entries whose study was not in ``known`` (the previous refresh)."""
    return [e for e in entries if e.study_uid not in known]
