"""The clinic app's parts without Streamlit: analysis jobs (progress, cancel, errors), upload
writing, pictures, model card view, summary, and the launcher."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from model_helpers import shared_tiny_model
from PIL import Image
from ui_helpers import block_series_zip, free_port, wait_healthy

from app.domain import AppError, Finding
from app.engine import Analyzer
from app.ingest import InputError
from app.ui.jobs import (
    UNEXPECTED_ERROR,
    AnalysisJob,
    SharedModel,
    safe_upload_name,
    shown_errors,
    write_uploads,
)
from app.ui.model_info import card_facts, metrics_table
from app.ui.summary import build_summary
from app.ui.viewer import FINDING_COLOUR, marks_on_slice, render_slice

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 60


@pytest.fixture(scope="module")
def shared_model(tmp_path_factory) -> SharedModel:
    return SharedModel(Analyzer(str(shared_tiny_model(tmp_path_factory))))


@pytest.fixture(scope="module")
def positive_zip(tmp_path_factory) -> Path:
    return block_series_zip(tmp_path_factory.mktemp("parts"), positive=True)


def copy_of(path: Path):
    """A PrepareInputs that copies one file into the job's input folder."""
    def prepare(dest: Path, progress) -> list[Path]:
        target = dest / path.name
        target.write_bytes(path.read_bytes())
        progress(1, 1)
        return [target]
    return prepare


class NamedBytes(io.BytesIO):
    def __init__(self, name: str, data: bytes) -> None:
        super().__init__(data)
        self.name = name


# --- jobs -------------------------------------------------------------------------------------


def test_a_job_analyses_and_keeps_its_files_for_forwarding(shared_model, positive_zip):
    job = AnalysisJob("ct.zip", copy_of(positive_zip), shared_model).start()
    assert job.wait(WAIT_S)
    (series, result), = job.outcome.studies
    assert result.positive and series.n_slices == 24
    assert job.status().stage == "done" and not job.outcome.message
    assert all(Path(f).is_file() and Path(f).is_relative_to(job.root) for f in series.files)
    job.cleanup()
    assert not job.root.exists()


def test_a_job_decodes_the_pixels_while_the_model_runs(shared_model, positive_zip, monkeypatch):
    streamed = []
    analyze_pending = shared_model.analyzer.analyze_pending

    def spy(pending, **kwargs):
        streamed.append(pending.n_slices)
        return analyze_pending(pending, **kwargs)

    monkeypatch.setattr(shared_model.analyzer, "analyze_pending", spy)
    job = AnalysisJob("ct.zip", copy_of(positive_zip), shared_model).start()
    assert job.wait(WAIT_S)
    (series, result), = job.outcome.studies
    assert streamed == [24]  # the engine's streaming path, as in the command line
    expected = shared_model.analyzer.analyze_series(series)
    assert [s.probability for s in result.slices] == [s.probability for s in expected.slices]
    job.cleanup()


def test_a_job_reports_progress_through_every_stage(shared_model, positive_zip):
    seen: list[str] = []
    job = AnalysisJob("ct.zip", copy_of(positive_zip), shared_model)
    report = job._report

    def spy(stage, done, total):
        seen.append(stage)
        report(stage, done, total)

    job._report = spy
    job.start().wait(WAIT_S)
    assert [s for i, s in enumerate(seen) if i == 0 or seen[i - 1] != s] == ["prepare", "read", "analyze"]


def test_cancel_while_preparing_stops_and_removes_the_files(shared_model):
    started = threading.Event()

    def slow_prepare(dest: Path, progress) -> list[Path]:
        (dest / "part.dcm").write_bytes(b"x")
        started.set()
        while True:  # a long upload: reports progress until told to stop
            progress(0, 1)
            time.sleep(0.01)

    job = AnalysisJob("big.zip", slow_prepare, shared_model).start()
    assert started.wait(WAIT_S)
    job.cancel()
    assert job.wait(WAIT_S)
    assert job.outcome.cancelled and job.outcome.message == "Analysis cancelled."
    assert not job.root.exists()


def test_cancel_while_waiting_for_the_model(shared_model, positive_zip):
    with shared_model.lock:  # another session is analysing
        job = AnalysisJob("ct.zip", copy_of(positive_zip), shared_model).start()
        deadline = time.monotonic() + WAIT_S
        while job.status().stage != "wait" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert job.status().label == "Waiting for the model (another analysis is running)"
        job.cancel()
        assert job.wait(WAIT_S) and job.outcome.cancelled


def test_cancel_during_inference_reaches_the_engine(positive_zip, shared_model):
    cancel_seen = threading.Event()

    class SlowAnalyzer:  # stands in for Analyzer: blocks until the job's cancel event is set
        card, model_ref = shared_model.analyzer.card, shared_model.analyzer.model_ref

        def analyze_pending(self, pending, progress=None, cancel=None):
            while not cancel.is_set():
                time.sleep(0.01)
            cancel_seen.set()
            progress(1, pending.n_slices)  # the job's progress callback stops the run from here
            raise AssertionError("not reached")

    job = AnalysisJob("ct.zip", copy_of(positive_zip), SharedModel(SlowAnalyzer())).start()
    deadline = time.monotonic() + WAIT_S
    while job.status().stage not in ("read", "analyze") and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    job.cancel()
    assert job.wait(WAIT_S) and job.outcome.cancelled and cancel_seen.is_set()


def test_errors_in_a_job_become_messages(shared_model, caplog):
    def app_error(dest, progress):
        raise AppError("the USB stick was removed")

    def bug(dest, progress):
        raise KeyError("internal detail")

    job = AnalysisJob("x", app_error, shared_model).start()
    job.wait(WAIT_S)
    assert job.outcome.message == "the USB stick was removed" and not job.outcome.studies
    job = AnalysisJob("x", bug, shared_model).start()
    job.wait(WAIT_S)
    assert job.outcome.message == UNEXPECTED_ERROR and "internal detail" not in job.outcome.message
    assert "analysis job failed" in caplog.text  # the details go to the log
    assert not job.root.exists()


# --- uploads ----------------------------------------------------------------------------------


@pytest.mark.parametrize("given, safe", [("scan.zip", "scan.zip"), ("../../etc/passwd", "passwd"),
                                         ("C:\\Users\\x\\IM0001", "IM0001"), (".hidden", "hidden"),
                                         ("", "upload"), ("..", "upload"), ("a\x00b.dcm", "ab.dcm")])
def test_upload_names_are_made_safe(given, safe):
    assert safe_upload_name(given) == safe


def test_uploads_are_written_once_each_and_same_names_are_kept(tmp_path):
    # Numeric names (common in DICOM exports) must not clash with where the duplicates go.
    files = [NamedBytes("3", b"first"), NamedBytes("2", b"two"), NamedBytes("dir/2", b"second two"),
             NamedBytes("../x.zip", b"zip"), NamedBytes("3", b"second three")]
    progress: list[tuple[int, int]] = []
    paths = write_uploads(files)(tmp_path, lambda d, t: progress.append((d, t)))
    assert [p.read_bytes() for p in paths] == [b"first", b"two", b"second two", b"zip", b"second three"]
    assert all(p.is_relative_to(tmp_path) for p in paths) and len(set(paths)) == 5
    assert progress == [(i, 5) for i in range(1, 6)]


def test_error_paths_lose_the_temp_folders(tmp_path):
    inputs, work = tmp_path / "input", tmp_path / "work"
    errors = [InputError(f"{inputs}/notes.txt", "is not a DICOM file"),
              InputError(f"{inputs}/ct.zip!a/b.dcm", "truncated"),
              InputError(f"{work}/archive-1/series", "inconsistent"),
              InputError(str(inputs), "only 3 slices"),
              InputError("elsewhere", "x")]
    assert [e.path for e in shown_errors(errors, inputs, work)] == [
        "notes.txt", "ct.zip!a/b.dcm", "extracted archive: archive-1/series", "the uploaded files", "elsewhere"]


# --- pictures, model card, summary ------------------------------------------------------------


def _finding(start=2, end=4, peak=3, bbox=(10, 20, 30, 40)) -> Finding:
    return Finding(slice_start=start, slice_end=end, z_start_mm=0.0, z_end_mm=4.0, peak_slice=peak,
                   peak_sop_instance_uid="1.2", peak_probability=0.9, center_px=(20, 30), bbox_px=bbox)


def test_findings_are_marked_on_every_slice_of_their_run():
    findings = [_finding(), _finding(start=8, end=8, peak=8)]
    assert [m.number for m in marks_on_slice(findings, 3)] == [1]
    assert marks_on_slice(findings, 3)[0].is_peak and not marks_on_slice(findings, 2)[0].is_peak
    assert [m.number for m in marks_on_slice(findings, 8)] == [2]
    assert marks_on_slice(findings, 5) == []


def test_render_slice_windows_overlays_and_boxes():
    hu = np.full((64, 64), 400, np.int16)  # bone window level: mid grey
    plain = np.asarray(render_slice(hu, None))
    assert plain.shape == (64, 64, 3) and np.all(plain == plain[0, 0]) and plain[0, 0, 0] == plain[0, 0, 2]
    heat = np.zeros((64, 64), np.float32)
    heat[30:40, 30:40] = 1.0
    hot = np.asarray(render_slice(hu, heat))
    assert not np.array_equal(hot[35, 35], plain[35, 35]) and np.array_equal(hot[5, 5], plain[5, 5])
    boxed = np.asarray(render_slice(hu, None, marks=marks_on_slice([_finding(bbox=(20, 20, 40, 40))], 3)))
    assert tuple(boxed[16, 30]) == FINDING_COLOUR  # the box edge, 4 px outside the region
    assert np.array_equal(boxed[30, 30], plain[30, 30])  # the inside stays visible


def test_model_card_view(shared_model):
    card, ref = shared_model.analyzer.card, shared_model.analyzer.model_ref
    facts = dict(card_facts(card, ref))
    assert facts["Name"] == "tiny-test" and facts["Decision threshold"] == "0.500"
    assert facts["File sha256"] == ref.sha256 and facts["Variant"] == "float32"
    assert facts["Probabilities"].startswith("not calibrated")
    calibrated = replace(card, training={"calibration": {"fitted_on": "validation split, 160 studies",
                                                         "val_ece_before": 0.37, "val_ece_after": 0.04}})
    assert dict(card_facts(calibrated, ref))["Probabilities"] == (
        "calibrated on the validation split, 160 studies (expected calibration error there 0.37 -> 0.04; "
        "held-out: the ECE column below)")
    metrics = {
        "validation": {"auc": 0.91, "threshold_rule": "highest threshold with sensitivity >= 0.9"},
        "test": {"n_studies": 200, "n_positive": 100, "auc": {"value": 0.93, "ci95": [0.9, 0.96]},
                 "sensitivity": {"value": 0.9}, "specificity": {"value": 0.85}, "calibration": {"ece": 0.04}},
        "evaluated_variant": "float32",
    }
    assert metrics_table(metrics) == [
        {"Split": "validation", "AUC": "0.910", "Sensitivity": "-", "Specificity": "-", "ECE": "-"},
        {"Split": "test", "Studies (positive)": "200 (100)", "AUC": "0.930 [0.900, 0.960]",
         "Sensitivity": "0.900", "Specificity": "0.850", "ECE": "0.040"}]


def test_summary_is_one_a4_page(shared_model, positive_zip):
    job = AnalysisJob("ct.zip", copy_of(positive_zip), shared_model).start()
    job.wait(WAIT_S)
    (series, result), = job.outcome.studies
    pdf = build_summary(series, result, "pdf")
    assert pdf.startswith(b"%PDF") and pdf.count(b"/Type /Page ") == 1  # one page (plus "/Type /Pages")
    png = Image.open(io.BytesIO(build_summary(series, result, "png")))
    assert png.size == (1240, 1753)  # A4 at 150 dpi
    with pytest.raises(ValueError):
        build_summary(series, result, "docx")


# --- launcher ---------------------------------------------------------------------------------


def run_launch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.launch", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_launch_help_and_model_check(shared_model):
    shown = run_launch("--help")
    assert shown.returncode == 0 and "Exit codes" in shown.stdout and "--model" in shown.stdout
    ok = run_launch("--check", "--model", str(shared_model.analyzer.card.folder))
    assert ok.returncode == 0 and "tiny-test" in ok.stderr
    bad = run_launch("--check", "--model", "/nonexistent/model")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    # The environment's thread count is checked at launch, like --threads, not later in the browser.
    threads = run_launch("--check", "--model", str(shared_model.analyzer.card.folder), env={"MYELOMA_THREADS": "0"})
    assert threads.returncode == 2 and "between 1 and 64" in threads.stderr and "Traceback" not in threads.stderr


def test_launch_command_line():
    from app.launch import MAIN_SCRIPT, app_environment, streamlit_command

    command = streamlit_command(8765, "127.0.0.1")
    assert command[1:4] == ["-m", "streamlit", "run"] and str(MAIN_SCRIPT) in command
    assert command[command.index("--server.port") + 1] == "8765"
    assert command[command.index("--server.headless") + 1] == "true"
    env = app_environment("m", "float32", 2, base={})
    assert env["MYELOMA_MODEL"] == "m" and env["MYELOMA_VARIANT"] == "float32" and env["MYELOMA_THREADS"] == "2"
    assert "MYELOMA_MODEL" not in app_environment(base={})


def test_launch_serves_the_app_and_stops_with_its_server(shared_model, tmp_path):
    port = free_port()
    log_path = tmp_path / "launch.log"
    with open(log_path, "wb") as log_file:
        launcher = subprocess.Popen([sys.executable, "-m", "app.launch", "--port", str(port), "--address", "127.0.0.1",
                                     "--model", str(shared_model.analyzer.card.folder)],
                                    cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", launcher, log_path, timeout_s=90)
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(launcher.pid)], capture_output=True, text=True)
        (server_pid,) = [int(p) for p in children.stdout.split()]
        launcher.send_signal(signal.SIGTERM)  # as a service manager stops it
        assert launcher.wait(timeout=30) == 130
        assert subprocess.run(["ps", "-p", str(server_pid)], capture_output=True).returncode != 0  # server gone
    finally:
        if launcher.poll() is None:  # the test failed half-way: stop this test's process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()


def test_the_app_never_imports_tensorflow():
    code = ("import sys, app.launch, app.ui.analyze_page, app.ui.settings_page, app.ui.outbox_page, "
            "app.ui.summary, app.ui.forwarding; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras', 'keras')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_analyses_take_turns_whatever_model_or_thread_count_a_session_chose(shared_model, positive_zip, monkeypatch):
    # Settings' Apply makes a second cached model (another SharedModel); its analyses must not run
    # beside the first one's.
    analyze_pending = shared_model.analyzer.analyze_pending
    running: list[int] = []
    at_once: list[int] = []

    def slow(pending, **kwargs):
        running.append(1)
        at_once.append(len(running))
        time.sleep(0.5)  # long enough for the other job to reach the model without the lock
        try:
            return analyze_pending(pending, **kwargs)
        finally:
            running.pop()

    monkeypatch.setattr(shared_model.analyzer, "analyze_pending", slow)
    jobs = [AnalysisJob("ct.zip", copy_of(positive_zip), SharedModel(shared_model.analyzer)).start() for _ in range(2)]
    assert all(job.wait(WAIT_S) for job in jobs)
    assert at_once == [1, 1]
    assert all(len(job.outcome.studies) == 1 for job in jobs)
    for job in jobs:
        job.cleanup()


def test_a_job_whose_temp_files_cannot_be_deleted_still_ends(shared_model, monkeypatch):
    def undeletable(self):
        raise PermissionError("busy")

    monkeypatch.setattr(AnalysisJob, "cleanup", undeletable)
    job = AnalysisJob("notes.txt", write_uploads([NamedBytes("notes.txt", b"not DICOM")]), shared_model).start()
    assert job.wait(WAIT_S) and job.finished  # the page's progress loop would otherwise spin for ever
    assert job.outcome.studies == [] and job.outcome.message


def test_launch_removes_only_stale_analysis_folders(tmp_path):
    from app.launch import STALE_WORK_DIR_S, remove_stale_work_dirs

    old = time.time() - STALE_WORK_DIR_S - 60
    stale_ui, stale_cli = tmp_path / "myeloma-ui-abc", tmp_path / "myeloma-ct-def"
    fresh, other = tmp_path / "myeloma-ui-running", tmp_path / "myeloma-other-old"
    for folder in (stale_ui, stale_cli, fresh, other):
        (folder / "input").mkdir(parents=True)
        (folder / "input" / "IM0001").write_bytes(b"patient images")
    for folder in (stale_ui, stale_cli, other):
        os.utime(folder, (old, old))
    assert remove_stale_work_dirs(tmp_path) == 2
    assert not stale_ui.exists() and not stale_cli.exists()
    assert fresh.exists() and other.exists()  # an analysis in progress; not ours


def test_a_read_interrupted_while_saving_is_not_sent_again_but_a_failed_one_may_be():
    from streamlit.runtime.scriptrunner_utils.exceptions import RerunException

    from app.ui.case_page import send_once

    saves: list[str] = []

    def interrupted():  # the radiologist clicked while the read was being stored
        saves.append("interrupted")
        raise RerunException(None)

    def failed():
        saves.append("failed")
        raise ConnectionError("server unreachable")

    sent: set = set()
    with pytest.raises(RerunException):
        send_once(sent, ("study-1", "agree"), interrupted)
    assert send_once(sent, ("study-1", "agree"), lambda: saves.append("again")) is False  # the rerun sends nothing
    with pytest.raises(ConnectionError):
        send_once(sent, ("study-2", "agree"), failed)
    assert send_once(sent, ("study-2", "agree"), lambda: saves.append("retry")) is True
    assert saves == ["interrupted", "failed", "retry"]


def test_a_full_disk_is_explained_not_reported_as_a_defect(shared_model):
    import errno

    def full_disk(dest, progress):
        raise OSError(errno.ENOSPC, "No space left on device", str(dest / "ct.zip"))

    job = AnalysisJob("ct.zip", full_disk, shared_model).start()
    assert job.wait(WAIT_S) and job.outcome.studies == []
    assert job.outcome.message.startswith("The study could not be stored for analysis: the disk is full.")
    assert "report" not in job.outcome.message and str(job.root) not in job.outcome.message
