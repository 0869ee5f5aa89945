"""Forwarding to the teleradiology server: build results, de-identify, queue, deliver.

Library API (the CLI below and the Streamlit UI use the same calls)::

    outbox = open_outbox()                                      # the persistent queue
    case_id = enqueue_case(series, result, settings, outbox)    # SR + key images + slices, de-identified
    with DicomWebClient(settings) as client:
        report = deliver_pending(outbox, client)                # due cases of this server
    outbox.cases()                                              # state, retries, last error per case
    retry_now(case_id, settings, outbox)                        # "retry now" button
    retarget_case(case_id, settings, outbox)                    # send a queued case to the configured server

A case is delivered only when a QIDO-RS query finds every one of its instances on the
server. Each delivery runs rounds: send what is pending in batches (STOW-RS), ask the server
what it holds, put back what it lacks; it stops when all is confirmed, when a round makes no
progress, or when the server is unreachable or refuses the credentials. A case that is not
delivered waits with an exponential, jittered delay before automatic retries are due.
"""

from __future__ import annotations

import logging
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from app.cli import EXIT_FAILED, EXIT_OK, EXIT_QUEUED
from app.deid import PSEUDONYM_DB, PseudonymStore, StudyDeidentifier
from app.dicomweb import AuthenticationFailed, DicomWebClient, DicomWebError
from app.domain import CLI_WORK_DIR_PREFIX, AppError, Series, StudyResult
from app.outbox import (
    AlreadyQueued,
    CaseInfo,
    CaseState,
    ItemKind,
    ItemState,
    Outbox,
    OutboxBusy,
    OutboxError,
    OutboxItem,
)
from app.results_dicom import build_results
from app.settings import ServerSettings, app_data_dir, resolve_settings

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (case_id, instances sent, instances in the case)


@dataclass(frozen=True)
class CaseOutcome:
    """What one delivery attempt achieved for one case."""

    case_id: str
    delivered: bool
    confirmed: int
    expected: int
    error: str | None = None


@dataclass
class DeliveryReport:
    outcomes: list[CaseOutcome] = field(default_factory=list)
    stopped: str | None = None  # why the run stopped before trying every due case

    def outcome(self, case_id: str) -> CaseOutcome | None:
        return next((o for o in self.outcomes if o.case_id == case_id), None)

    @property
    def queued(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if not o.delivered]


def open_outbox(data_dir: Path | None = None) -> Outbox:
    """The outbox in the app data dir (``$MYELOMA_APP_DATA``)."""
    return Outbox((data_dir or app_data_dir()) / "outbox")


def open_pseudonyms(data_dir: Path | None = None) -> PseudonymStore:
    return PseudonymStore((data_dir or app_data_dir()) / PSEUDONYM_DB)


# --- enqueue ---------------------------------------------------------------------------
def _with_file_meta(ds: pydicom.Dataset) -> pydicom.Dataset:
    """Give a bare dataset (no Part 10 header) the file meta its encoding implies."""
    meta = ds.file_meta = getattr(ds, "file_meta", None) or pydicom.dataset.FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit
                                  else ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _case_datasets(series: Series, result: StudyResult) -> Iterator[tuple[ItemKind, pydicom.Dataset]]:
    """Every slice of the series (read one at a time), then the SR and the key images."""
    objects = build_results(series, result)
    expected = set(series.sop_instance_uids)
    for path in series.files:
        ds = pydicom.dcmread(path, force=True)
        if ds.get("SOPInstanceUID") not in expected or ds.get("StudyInstanceUID") != series.study_instance_uid:
            raise AppError(f"file {Path(path).name} changed since it was analysed; analyse the study again")
        yield ItemKind.IMAGE, _with_file_meta(ds)
    yield ItemKind.SR, objects.sr
    for image in objects.key_images:
        yield ItemKind.KEY_IMAGE, image


def case_summary(result: StudyResult, n_slices: int) -> str:
    """One line for lists: the AI call, without patient data."""
    call = "suspicious" if result.positive else "no lesion"
    return (f"{call}, p={result.probability:.2f} (threshold {result.threshold:.2f}); "
            f"{n_slices} slices; {result.model.name} {result.model.version}")


def enqueue_case(series: Series, result: StudyResult, settings: ServerSettings, outbox: Outbox | None = None,
                 pseudonyms: PseudonymStore | None = None) -> str:
    """Build the SR and key images, de-identify everything (unless the destination allows identity),
    and store the case in the outbox (default: the app data dir's). Returns the case id. Nothing is sent here.

    Raises ``AlreadyQueued`` (with the waiting case's id) when the study waits in the outbox for
    the same server already."""
    settings.require_url()
    with ExitStack() as stack:
        outbox = outbox or stack.enter_context(open_outbox())
        datasets: Iterable[tuple[ItemKind, pydicom.Dataset]] = _case_datasets(series, result)
        if settings.deidentify:
            pseudonyms = pseudonyms or stack.enter_context(open_pseudonyms())
            deidentify = StudyDeidentifier(pseudonyms, series.study_instance_uid, series.patient_id,
                                            settings.site_name)
            datasets = ((kind, deidentify(ds, generated=kind != ItemKind.IMAGE)) for kind, ds in datasets)
        return outbox.add_case(settings.url, settings.deidentify, datasets, case_summary(result, series.n_slices))


# --- delivery --------------------------------------------------------------------------
def _batches(items: Sequence[OutboxItem], size: int, max_bytes: float) -> Iterator[list[OutboxItem]]:
    batch: list[OutboxItem] = []
    total = 0
    for item in items:
        if batch and (len(batch) >= size or total + item.size > max_bytes):
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += item.size
    if batch:
        yield batch


def _retry_delay(settings: ServerSettings, attempts: int) -> float:
    """Exponential backoff with full jitter before the next automatic retry of a case."""
    # The exponent is capped: 2 ** 1024 overflows a float, and a case can fail that often in a month.
    ceiling = min(settings.outbox_backoff_max_s, settings.outbox_backoff_s * 2.0 ** min(max(0, attempts), 64))
    return random.uniform(0.5, 1.0) * ceiling


def _send_pending(outbox: Outbox, client: DicomWebClient, case: CaseInfo, progress: Progress | None) -> None:
    settings = client.settings
    pending = outbox.items(case.case_id, ItemState.PENDING)
    done = case.n_items - len(pending)
    for batch in _batches(pending, max(1, settings.batch_size), settings.batch_max_mb * 1e6):
        outcome = client.store([(item.sop_instance_uid, outbox.read_file(item)) for item in batch])
        outbox.mark_sent(case.case_id, outcome.stored)
        if outcome.failed:
            outbox.mark_failed(case.case_id, outcome.failed)
        done += len(outcome.stored)
        if progress is not None:
            progress(case.case_id, done, case.n_items)


def _verify(outbox: Outbox, client: DicomWebClient, case: CaseInfo) -> tuple[int, int, str | None]:
    """Ask the server which instances it holds; returns (confirmed, expected, why not complete)."""
    items = outbox.items(case.case_id)
    on_server = client.study_instance_uids(case.study_uid)
    # The study may hold more (e.g. a read added by the radiologist): what counts is that all of ours are there.
    outbox.mark_confirmed(case.case_id, [i.sop_instance_uid for i in items if i.sop_instance_uid in on_server])
    # Sent or even confirmed before, but gone now (e.g. the server purged an incomplete study): send again.
    lost = {i.sop_instance_uid: "acknowledged by the server but not found there afterwards"
            for i in items if i.state != ItemState.PENDING and i.sop_instance_uid not in on_server}
    if lost:
        outbox.mark_failed(case.case_id, lost)
    missing = [i for i in items if i.sop_instance_uid not in on_server]
    if not missing:
        return len(items), len(items), None
    reasons = sorted({lost.get(i.sop_instance_uid) or i.last_error or "not sent yet" for i in missing})
    return (len(items) - len(missing), len(items),
            f"{len(missing)} of {len(items)} instance(s) not on the server yet ({'; '.join(reasons)[:300]})")


def _deliver_case(outbox: Outbox, client: DicomWebClient, case: CaseInfo, progress: Progress | None) -> CaseOutcome:
    confirmed, expected, problem = case.n_confirmed, case.n_items, None
    for _ in range(max(1, client.settings.retry_attempts)):
        _send_pending(outbox, client, case, progress)
        before = confirmed
        confirmed, expected, problem = _verify(outbox, client, case)
        if problem is None:
            outbox.mark_delivered(case.case_id)
            return CaseOutcome(case.case_id, True, confirmed, expected)
        if confirmed == before:  # this round achieved nothing; another would not either
            break
    outbox.record_failure(case.case_id, problem, _retry_delay(client.settings, case.attempts))
    return CaseOutcome(case.case_id, False, confirmed, expected, problem)


def deliver_pending(outbox: Outbox, client: DicomWebClient, case_ids: Iterable[str] | None = None,
                    force: bool = False, progress: Progress | None = None) -> DeliveryReport:
    """Deliver the queued cases destined to ``client``'s server: those due for a retry, or all of
    them (``force``), or only ``case_ids``. ``progress(case_id, sent, total)`` follows each batch.
    One process delivers at a time (``OutboxBusy`` otherwise)."""
    report = DeliveryReport()
    with outbox.delivery_lock():
        cases = outbox.cases(state=CaseState.QUEUED, destination=client.base_url,
                             due_before=None if force else time.time(),
                             case_ids=list(case_ids) if case_ids is not None else None)
        for case in cases:
            try:
                report.outcomes.append(_deliver_case(outbox, client, case, progress))
            except (DicomWebError, OutboxError) as exc:
                outbox.record_failure(case.case_id, str(exc), _retry_delay(client.settings, case.attempts))
                now = outbox.case(case.case_id)
                report.outcomes.append(CaseOutcome(case.case_id, False, now.n_confirmed, now.n_items, str(exc)))
                if isinstance(exc, AuthenticationFailed) or getattr(exc, "retryable", False):
                    # the same server will refuse or miss the next case too: leave them for later
                    report.stopped = str(exc)
                    break
    return report


def _deliver_reporting_busy(outbox: Outbox, client: DicomWebClient, **kwargs) -> DeliveryReport:
    try:
        return deliver_pending(outbox, client, **kwargs)
    except OutboxBusy as exc:
        return DeliveryReport(stopped=str(exc))


def retry_now(case_id: str, settings: ServerSettings, outbox: Outbox) -> CaseOutcome:
    """Try to deliver one queued case immediately (the UI's "retry now")."""
    case = outbox.case(case_id)
    if case.state == CaseState.DELIVERED:
        return CaseOutcome(case_id, True, case.n_confirmed, case.n_items)
    if case.destination != settings.url:
        raise AppError(f"case {case_id} is meant for {case.destination}, not {settings.url}")
    with DicomWebClient(settings) as client:
        report = _deliver_reporting_busy(outbox, client, case_ids=[case_id], force=True)
    # Busy: the case stays queued and the process delivering now (e.g. ``outbox watch``) sends it.
    return report.outcome(case_id) or CaseOutcome(case_id, False, case.n_confirmed, case.n_items, report.stopped)


def retarget_case(case_id: str, settings: ServerSettings, outbox: Outbox) -> bool:
    """Send a queued case to the configured server instead of the one it was queued for (e.g. the
    address was mistyped). Returns False when the study is already queued for or delivered to the
    configured server: the case was removed rather than sending the study twice. A case queued
    with the patient's identity moves only to a server configured to receive identities."""
    settings.require_url()
    case = outbox.case(case_id)
    if not case.deidentified and settings.deidentify and not outbox.holds_study(settings.url, case.study_uid):
        raise AppError(f"case {case_id} carries the patient's identity and {settings.url} is set to receive "
                       "de-identified cases only; forward the study again instead")
    return outbox.retarget(case_id, settings.url)


def queued_elsewhere(outbox: Outbox, settings: ServerSettings) -> list[CaseInfo]:
    """Queued cases meant for another server than the configured one (none without one)."""
    if not settings.url:
        return []
    return [c for c in outbox.cases(state=CaseState.QUEUED) if c.destination != settings.url]


# --- command line ------------------------------------------------------------------------
def _print_outcomes(report: DeliveryReport) -> None:
    for o in report.outcomes:
        if o.delivered:
            print(f"case {o.case_id}: delivered ({o.expected} instances confirmed by the server)")
        else:
            print(f"case {o.case_id}: queued ({o.confirmed}/{o.expected} confirmed): {o.error}", file=sys.stderr)


def forward_cli(args) -> int:
    """``python -m app.cli forward``: exit 0 when the server confirmed the case, 3 when it stays queued."""
    from app.engine import Analyzer, analyze_paths, results_json, write_json

    settings = resolve_settings(server=args.server, user=args.user,
                                deidentify=False if args.no_deidentify else None).require_url()
    analyzer = Analyzer(args.model, args.variant, args.threads)
    with tempfile.TemporaryDirectory(prefix=CLI_WORK_DIR_PREFIX) as workdir, open_outbox() as outbox, \
            open_pseudonyms() as pseudonyms:
        pairs, errors = analyze_paths([args.input], analyzer, Path(workdir))
        if args.json:
            write_json(results_json([r for _, r in pairs], errors), args.json)
        if not pairs:
            reason = f"{errors[0]}" if errors else "no analysable CT series found"
            raise AppError(f"nothing to forward: {reason}")
        case_ids = []
        for series, result in pairs:
            try:
                case_ids.append(enqueue_case(series, result, settings, outbox, pseudonyms))
                print(f"{result.triage_label} (probability {result.probability:.3f}); {series.n_slices} slices queued")
            except AlreadyQueued as exc:  # deliver the waiting case rather than a second copy of the study
                case_ids.append(exc.case_id)
                print(f"{result.triage_label} (probability {result.probability:.3f}); the study already waits in "
                      f"the outbox as case {exc.case_id}: delivering that case")
        with DicomWebClient(settings) as client:
            report = _deliver_reporting_busy(outbox, client, case_ids=case_ids, force=True)
    _print_outcomes(report)
    if all((o := report.outcome(c)) is not None and o.delivered for c in case_ids):
        return EXIT_OK
    reason = report.stopped or next((o.error for o in report.queued if o.error), "not confirmed by the server")
    print(f"queued for later delivery ({len(case_ids)} case(s)); reason: {reason}; "
          "run 'python -m app.cli outbox flush' to retry", file=sys.stderr)
    return EXIT_QUEUED


def _format_time(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


def _status(outbox: Outbox) -> int:
    cases = outbox.cases()
    if not cases:
        print("outbox is empty")
        return EXIT_OK
    print(f"{'CASE':<32}  {'CREATED':<16}  {'STATE':<9}  {'ON SERVER':>9}  {'TRIES':>5}  "
          f"{'NEXT TRY':<16}  DESTINATION / LAST ERROR")
    for c in cases:
        next_try = _format_time(c.next_attempt_at) if c.state == CaseState.QUEUED and c.attempts else "-"
        print(f"{c.case_id:<32}  {_format_time(c.created_at):<16}  {c.state:<9}  "
              f"{f'{c.n_confirmed}/{c.n_items}':>9}  {c.attempts:>5}  {next_try:<16}  {c.destination}"
              + (f"  [{'de-identified' if c.deidentified else 'WITH PATIENT IDENTITY'}]")
              + (f"\n{'':>34}last error: {c.last_error}" if c.last_error and c.state == CaseState.QUEUED else ""))
    queued = sum(c.state == CaseState.QUEUED for c in cases)
    print(f"{len(cases)} case(s): {queued} queued, {len(cases) - queued} delivered")
    return EXIT_OK


def _destinations(queued: Sequence[CaseInfo], settings: ServerSettings) -> list[str]:
    """With a configured server only its cases go out; otherwise each case to the server it was queued for."""
    return [settings.url] if settings.url else sorted({c.destination for c in queued})


def _deliver_round(outbox: Outbox, settings: ServerSettings, destinations: Sequence[str],
                   force: bool) -> list[DeliveryReport]:
    reports = []
    for url in destinations:
        with DicomWebClient(replace(settings, url=url)) as client:
            reports.append(_deliver_reporting_busy(outbox, client, force=force))
    for report in reports:
        _print_outcomes(report)
    return reports


def _flush(outbox: Outbox, args) -> int:
    settings = resolve_settings(server=args.server, user=args.user)
    queued = outbox.cases(state=CaseState.QUEUED)
    if not queued:
        print("outbox: nothing to deliver")
        return EXIT_OK
    destinations = _destinations(queued, settings)
    reports = _deliver_round(outbox, settings, destinations, force=True)
    left = outbox.cases(state=CaseState.QUEUED)
    elsewhere = [c for c in left if c.destination not in destinations]
    if elsewhere:
        _report_elsewhere(elsewhere)
    if not left:
        return EXIT_OK
    reason = next((r.stopped for r in reports if r.stopped), None) or next(
        (c.last_error for c in left if c.last_error), "not confirmed by the server")
    print(f"{len(left)} case(s) still queued; reason: {reason}", file=sys.stderr)
    return EXIT_QUEUED


def _report_elsewhere(elsewhere: Sequence[CaseInfo]) -> None:
    """Cases this command does not send because they were queued for another server."""
    if elsewhere:
        print(f"{len(elsewhere)} case(s) wait for other servers: "
              f"{', '.join(sorted({c.destination for c in elsewhere}))}; 'python -m app.cli outbox retarget' "
              "moves them to the configured server", file=sys.stderr)


WATCH_MAX_SLEEP_S = 300.0  # look at the outbox at least this often: the UI may queue new cases meanwhile
WATCH_MIN_SLEEP_S = 2.0  # after a round that left a case due (another process was delivering)


def watch(outbox: Outbox, settings: ServerSettings, sleep: Callable[[float], None] | None = None) -> int:
    """Deliver every queued case when its automatic retry falls due (exponential backoff,
    ``outbox_backoff_s`` doubling up to ``outbox_backoff_max_s``), until none is left queued
    for ``settings.url`` (or, without one, for any server). Returns ``EXIT_OK`` then; Ctrl-C
    (KeyboardInterrupt) is left to the caller. For a clinic whose network comes and goes:
    left running, it empties the outbox without anyone pressing "retry"."""
    just_tried = False
    while True:
        queued = outbox.cases(state=CaseState.QUEUED)
        destinations = _destinations(queued, settings)
        waiting = [c for c in queued if c.destination in destinations]
        if not waiting:
            elsewhere = [c for c in queued if c.destination not in destinations]
            print("outbox: every case delivered" if not elsewhere else f"outbox: nothing queued for {settings.url}")
            _report_elsewhere(elsewhere)
            return EXIT_OK
        now, due = time.time(), min(c.next_attempt_at for c in waiting)
        if due <= now and not just_tried:
            _deliver_round(outbox, settings, destinations, force=False)
            just_tried = True
            continue
        just_tried = False
        print(f"outbox: {len(waiting)} case(s) queued; next try in {max(0.0, due - now):.0f} s", file=sys.stderr)
        (sleep or time.sleep)(min(WATCH_MAX_SLEEP_S, max(WATCH_MIN_SLEEP_S, due - now)))


def _retarget(outbox: Outbox, settings: ServerSettings, case_id: str | None) -> int:
    """Move queued cases (all meant for other servers, or ``case_id``) to the configured server."""
    settings.require_url()
    cases = [outbox.case(case_id)] if case_id else queued_elsewhere(outbox, settings)
    if not cases:
        print(f"outbox: no queued case is meant for another server than {settings.url}")
        return EXIT_OK
    refused = 0
    for case in cases:
        try:
            if retarget_case(case.case_id, settings, outbox):
                print(f"case {case.case_id}: now goes to {settings.url} (was {case.destination}); "
                      "run 'python -m app.cli outbox flush' to send it")
            else:
                print(f"case {case.case_id}: removed; the study is already queued for or delivered to {settings.url}")
        except AppError as exc:
            refused += 1
            print(f"case {case.case_id}: not moved: {exc}", file=sys.stderr)
    return EXIT_FAILED if refused else EXIT_OK


def outbox_cli(args) -> int:
    """``python -m app.cli outbox status|flush|watch|retarget``: flush exits 0 when the outbox is empty of
    queued cases, else 3; watch returns 0 once it is empty; retarget exits 2 when a case could not be moved."""
    with open_outbox() as outbox:
        if args.action == "retarget":
            return _retarget(outbox, resolve_settings(server=args.server, user=args.user), args.case)
        if args.action == "watch":
            return watch(outbox, resolve_settings(server=args.server, user=args.user))
        return _status(outbox) if args.action == "status" else _flush(outbox, args)
