"""'Forward for review' and the Outbox's 'Retry now' in the background: queue the case in the
outbox (forward only), then try to deliver it.

Building the SR and key images, de-identifying and sending a 300-slice study takes from
seconds to minutes on a clinic's uplink; the page must stay usable meanwhile. The case is
in the persistent outbox as soon as ``enqueue_case`` returns, so whatever happens to this
thread (or the app), the Outbox page and ``python -m app.cli outbox flush`` can finish it.

The task keeps a reference to the analysis job: the job's temp folder (the DICOM files
being queued) lives until the task no longer needs it.
"""

from __future__ import annotations

import logging
import threading
from typing import Self

from app.domain import AppError, Series, StudyResult
from app.forward import CaseOutcome, enqueue_case, open_outbox, open_pseudonyms, retry_now
from app.outbox import AlreadyQueued
from app.settings import ServerSettings

log = logging.getLogger(__name__)

UNEXPECTED_ERROR = ("An unexpected error stopped forwarding. If the case was queued, it is on the Outbox page; "
                    "the technical details are in the app log.")


class _DeliveryTask:
    """One delivery attempt (with the client's retries) in a daemon thread; the page polls ``finished``."""

    def __init__(self, settings: ServerSettings) -> None:
        self._settings = settings.require_url()
        self.destination = self._settings.url
        self.case_id: str | None = None
        self.outcome: CaseOutcome | None = None
        self.error: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ui-delivery", daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def _deliver(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        try:
            self._deliver()
        except AppError as exc:
            self.error = str(exc)
        except Exception:
            log.exception("delivery failed")
            self.error = UNEXPECTED_ERROR
        finally:
            self._done.set()


class ForwardTask(_DeliveryTask):
    """One case: enqueue, then one delivery attempt."""

    def __init__(self, series: Series, result: StudyResult, settings: ServerSettings, keep_alive: object) -> None:
        super().__init__(settings)
        self._series = series
        self._result = result
        self._keep_alive = keep_alive  # owner of series.files (the analysis job)
        self.already_queued = False  # the study waited in the outbox already: that case is sent, not a copy

    def _deliver(self) -> None:
        try:
            with open_outbox() as outbox, open_pseudonyms() as pseudonyms:
                try:
                    self.case_id = enqueue_case(self._series, self._result, self._settings, outbox, pseudonyms)
                except AlreadyQueued as exc:
                    self.case_id, self.already_queued = exc.case_id, True
                self._keep_alive = None  # the outbox holds its own copies now
                self.outcome = retry_now(self.case_id, self._settings, outbox)
        finally:
            self._keep_alive = None


class RetryTask(_DeliveryTask):
    """The Outbox page's "Retry now" of one queued case, so the page stays usable while it sends."""

    def __init__(self, case_id: str, settings: ServerSettings) -> None:
        super().__init__(settings)
        self.case_id = case_id

    def _deliver(self) -> None:
        with open_outbox() as outbox:
            self.outcome = retry_now(self.case_id, self._settings, outbox)
