"""'Forward for review' in the background: queue the case in the outbox, then try to deliver it.

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

from app.domain import AppError, Series, StudyResult
from app.forward import CaseOutcome, enqueue_case, open_outbox, open_pseudonyms, retry_now
from app.settings import ServerSettings

log = logging.getLogger(__name__)

UNEXPECTED_ERROR = ("An unexpected error stopped forwarding. If the case was queued, it is on the Outbox page; "
                    "the technical details are in the app log.")


class ForwardTask:
    """One case: enqueue, then one delivery attempt (with the client's retries), in a daemon thread."""

    def __init__(self, series: Series, result: StudyResult, settings: ServerSettings, keep_alive: object) -> None:
        self._series = series
        self._result = result
        self._settings = settings.require_url()
        self._keep_alive = keep_alive  # owner of series.files (the analysis job)
        self.destination = self._settings.url
        self.case_id: str | None = None
        self.outcome: CaseOutcome | None = None
        self.error: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ui-forward", daemon=True)

    def start(self) -> ForwardTask:
        self._thread.start()
        return self

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def _run(self) -> None:
        try:
            with open_outbox() as outbox, open_pseudonyms() as pseudonyms:
                self.case_id = enqueue_case(self._series, self._result, self._settings, outbox, pseudonyms)
                self._keep_alive = None  # the outbox holds its own copies now
                self.outcome = retry_now(self.case_id, self._settings, outbox)
        except AppError as exc:
            self.error = str(exc)
        except Exception:
            log.exception("forwarding failed")
            self.error = UNEXPECTED_ERROR
        finally:
            self._keep_alive = None
            self._done.set()
