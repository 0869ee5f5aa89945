"""Analyses run in a worker thread, so the page can show progress and a cancel button.

A Streamlit script run is interrupted whenever the user touches a widget; the work
must not be. An ``AnalysisJob`` owns its thread, its temp folder (uploads, extracted
zips) and a cancel event; the page keeps the job in ``st.session_state``, polls
``status()`` to draw progress bars and, on a rerun, finds it still running.

No Streamlit here: the module is tested directly.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePath
from typing import ClassVar, Protocol

from app.domain import UI_WORK_DIR_PREFIX, AppError, Series, StudyResult
from app.engine import AnalysisCancelled, Analyzer, analyze_paths
from app.ingest import IngestLimits, InputError, PendingSeries
from model_zoo.card import ModelCard

log = logging.getLogger(__name__)

StepProgress = Callable[[int, int], None]  # (done, total)
# Writes the job's input under the given folder and returns the paths to ingest.
PrepareInputs = Callable[[Path, StepProgress], list[Path]]

STAGE_LABELS = {
    "prepare": "Preparing the input",
    "read": "Reading DICOM files",
    "wait": "Waiting for the model (another analysis is running)",
    "analyze": "Analysing slices",
    "done": "Finished",
}
LOCK_POLL_S = 0.2
UNEXPECTED_ERROR = ("An unexpected error stopped the analysis. Nothing was analysed; the technical details "
                    "are in the app log. Please report this.")
NOTHING_ANALYSED = "No analysable CT series was found in the input."


class NamedBuffer(Protocol):
    """What an uploaded file offers (Streamlit's ``UploadedFile`` is one)."""

    name: str

    def getbuffer(self) -> memoryview: ...


@dataclass
class SharedModel:
    """The analyzer of one model/variant/thread count, shared by every session, and the analysis lock.

    The lock makes analyses take turns: two at once would only share the same cores
    and both finish late, holding two volumes in memory. It is one lock for every
    model, so sessions that chose different variants or thread counts take turns too.
    """

    analyzer: Analyzer
    lock: ClassVar[threading.Lock] = threading.Lock()


@dataclass(frozen=True)
class JobStatus:
    stage: str = "prepare"  # a key of STAGE_LABELS
    done: int = 0
    total: int = 0

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0

    @property
    def label(self) -> str:
        base = STAGE_LABELS.get(self.stage, self.stage)
        return f"{base}: {self.done} of {self.total}" if self.total else base


@dataclass
class JobOutcome:
    """What a finished job produced. ``message`` explains an empty result."""

    studies: list[tuple[Series, StudyResult]]
    errors: list[InputError]
    message: str = ""
    cancelled: bool = False
    elapsed_s: float = 0.0


class _TurnTakingAnalyzer:
    """The analyzer interface ``analyze_paths`` needs; waits for the shared model's lock first.

    Offers ``analyze_pending`` too, so a study's pixels are decoded while the model runs
    (the engine's streaming pipeline), as in the command-line ``analyze``.
    """

    def __init__(self, shared: SharedModel, report: Callable[[str, int, int], None],
                 cancel: threading.Event) -> None:
        self._shared = shared
        self._report = report
        self._cancel = cancel
        self.card = shared.analyzer.card
        self.model_ref = shared.analyzer.model_ref

    @contextlib.contextmanager
    def _turn(self) -> Iterator[None]:
        while not self._shared.lock.acquire(timeout=LOCK_POLL_S):
            self._report("wait", 0, 0)  # raises AnalysisCancelled once cancel is set
        try:
            yield
        finally:
            self._shared.lock.release()

    def analyze_series(self, series: Series, progress=None, cancel: threading.Event | None = None) -> StudyResult:
        with self._turn():
            return self._shared.analyzer.analyze_series(series, progress=progress, cancel=cancel or self._cancel)

    def analyze_pending(self, pending: PendingSeries, progress=None,
                        cancel: threading.Event | None = None) -> tuple[Series, StudyResult] | None:
        with self._turn():
            return self._shared.analyzer.analyze_pending(pending, progress=progress, cancel=cancel or self._cancel)


class AnalysisJob:
    """Prepare inputs, ingest and analyse them in a daemon thread; poll ``status``, read ``outcome``."""

    def __init__(self, source: str, prepare: PrepareInputs, model: SharedModel,
                 limits: IngestLimits | None = None) -> None:
        self.source = source  # what the user analysed, in their words ("CT.zip", "example study")
        self.started_at = time.time()
        self._prepare = prepare
        self._model = model
        self._limits = limits or IngestLimits()
        self._cancel = threading.Event()
        self._status = JobStatus()
        self._status_lock = threading.Lock()
        # Holds uploads and extracted files; the result's Series.files point here, so it lives as
        # long as the job (forwarding reads them). Removed on cleanup() or garbage collection.
        self._workdir = tempfile.TemporaryDirectory(prefix=UI_WORK_DIR_PREFIX)
        self.root = Path(self._workdir.name)
        self.outcome: JobOutcome | None = None
        self._thread = threading.Thread(target=self._run, name="ui-analysis", daemon=True)

    # --- control ----------------------------------------------------------------------
    def start(self) -> AnalysisJob:
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def card(self) -> ModelCard:
        """The model card of the model this job runs (for the result page)."""
        return self._model.analyzer.card

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has finished (True) or ``timeout`` seconds passed (False)."""
        self._thread.join(timeout)
        return self.finished

    def status(self) -> JobStatus:
        with self._status_lock:
            return self._status

    def cleanup(self) -> None:
        """Delete the job's files (uploads, extracted archives)."""
        self._workdir.cleanup()

    # --- the work ---------------------------------------------------------------------
    def _report(self, stage: str, done: int, total: int) -> None:
        if self._cancel.is_set():
            raise AnalysisCancelled("analysis cancelled")
        with self._status_lock:
            self._status = JobStatus(stage, done, total)

    def _run(self) -> None:
        started = time.perf_counter()
        input_dir, work_dir = self.root / "input", self.root / "work"
        prepare, self._prepare = self._prepare, None  # drop the uploads' bytes once they are on disk
        try:
            input_dir.mkdir()
            paths = prepare(input_dir, lambda done, total: self._report("prepare", done, total))
            del prepare
            self._report("read", 0, 0)
            analyzer = _TurnTakingAnalyzer(self._model, self._report, self._cancel)
            studies, errors = analyze_paths(paths, analyzer, work_dir, progress=self._report,
                                            limits=self._limits, cancel=self._cancel)
            outcome = JobOutcome(studies, shown_errors(errors, input_dir, work_dir),
                                 message="" if studies else NOTHING_ANALYSED)
        except AnalysisCancelled:
            outcome = JobOutcome([], [], message="Analysis cancelled.", cancelled=True)
        except AppError as exc:
            outcome = JobOutcome([], [], message=str(exc))
        except OSError as exc:  # e.g. the disk filled up writing or extracting the upload
            log.warning("analysis job stopped: %s", exc.strerror or exc)
            reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or "a file error")
            outcome = JobOutcome([], [], message=f"The study could not be stored for analysis: {reason}. Free some "
                                                 "disk space (or close other analyses) and try again.")
        except Exception:  # the page must never show a traceback; the log keeps it for the developers
            log.exception("analysis job failed")
            outcome = JobOutcome([], [], message=UNEXPECTED_ERROR)
        outcome.elapsed_s = time.perf_counter() - started
        try:
            if not outcome.studies:
                self.cleanup()
        except OSError:
            log.warning("the analysis job's temp files could not all be deleted", exc_info=True)
        finally:  # whatever happens, the job ends: the page waits for ``outcome``
            with self._status_lock:
                self._status = JobStatus("done", 1, 1)
            self.outcome = outcome


class RecentJobs:
    """The last analyses of this app process, newest first.

    A browser refresh starts a new Streamlit session with an empty ``session_state``: without
    this list the result on screen (or the analysis still running) would be out of reach, and
    the work lost. One by default: a finished job holds its series' HU (157 MB for 300 slices)
    and its upload on disk. A job dropped from the list keeps its files while a session or a
    forward still uses it (they go with the last reference).
    """

    def __init__(self, keep: int = 1) -> None:
        self._keep = keep
        self._jobs: list[AnalysisJob] = []
        self._lock = threading.Lock()

    def add(self, job: AnalysisJob) -> None:
        with self._lock:
            self._jobs = [job, *(j for j in self._jobs if j is not job)][:self._keep]

    def jobs(self) -> list[AnalysisJob]:
        with self._lock:
            return list(self._jobs)


def shown_errors(errors: Sequence[InputError], input_dir: Path, work_dir: Path) -> list[InputError]:
    """Input errors with paths as the user knows them: no temp-folder prefixes."""
    prefixes = ((f"{input_dir}/", ""), (str(input_dir), "the uploaded files"), (f"{work_dir}/", "extracted archive: "))

    def shown(path: str) -> str:
        for prefix, replacement in prefixes:
            if path.startswith(prefix):
                return replacement + path[len(prefix):]
        return path

    return [replace(e, path=shown(str(e.path))) for e in errors]


# --- input writers ------------------------------------------------------------------------


def safe_upload_name(name: str) -> str:
    """The last component of a browser-supplied file name, stripped of anything path-like."""
    base = PurePath(str(name).replace("\\", "/")).name.strip().lstrip(".")
    return "".join(ch for ch in base if ch.isprintable() and ch not in '/\\:\x00') or "upload"


def write_uploads(files: Sequence[NamedBuffer]) -> PrepareInputs:
    """A PrepareInputs that writes uploaded files to disk once each (no other copy) and returns them."""

    def prepare(dest: Path, progress: StepProgress) -> list[Path]:
        paths = []
        for number, upload in enumerate(files, start=1):
            name = safe_upload_name(upload.name)
            target = dest / name
            if target.exists():  # two uploads with the same name: keep both
                target = Path(tempfile.mkdtemp(prefix="duplicate-", dir=dest)) / name  # a fresh folder, whatever the names
            with open(target, "wb") as out:
                out.write(upload.getbuffer())
            paths.append(target)
            progress(number, len(files))
        return paths

    return prepare


def write_example_study(positive: bool, seed: int, index: int, n_slices: int) -> PrepareInputs:
    """A PrepareInputs that renders a phantom CT study (model_zoo.phantoms) as DICOM files."""

    def prepare(dest: Path, progress: StepProgress) -> list[Path]:
        from model_zoo.phantoms.dicom_writer import write_study_dicom
        from model_zoo.phantoms.generator import render_study, sample_study_spec

        progress(0, 2)
        study = render_study(sample_study_spec(seed, index, positive=positive, n_slices=n_slices))
        progress(1, 2)
        write_study_dicom(study, dest)
        progress(2, 2)
        return [dest]

    return prepare
