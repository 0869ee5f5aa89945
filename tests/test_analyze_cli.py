"""The `analyze` command contract, run as a user would: in a subprocess, on DICOM files."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import CTSeriesSpec, ct_dataset, save, stored_values
from model_helpers import MODEL_FILE, bone_block_volume, copy_model_folder, shared_tiny_model

import app.ingest
from app.engine import Analyzer, analyze_paths, iter_study_analyses
from app.ingest import ingest

REPO = Path(__file__).resolve().parent.parent
BLOCK_ROWS, BLOCK_COLS = (62, 108), (83, 128)  # bone_block_volume's default block
# Runs app.cli like `python -m app.cli`, then records which TensorFlow modules were loaded.
WRAPPER = """
import atexit, runpy, sys
marker, sys.argv = sys.argv[1], ["app.cli", *sys.argv[2:]]
def record():
    with open(marker, "w") as f:
        f.write("\\n".join(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tf_keras", "keras")))
atexit.register(record)
runpy.run_module("app.cli", run_name="__main__", alter_sys=True)
"""
STUDY_KEYS = {"study_instance_uid", "series_instance_uid", "probability", "positive", "threshold", "model",
              "slices", "findings", "warnings", "timing_s"}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return shared_tiny_model(tmp_path_factory)


def write_volume(folder: Path, hu: np.ndarray, study: str) -> CTSeriesSpec:
    """Write an int16 HU volume as an axial CT series (0.75 mm pixels, 2 mm apart)."""
    spec = CTSeriesSpec(n_slices=len(hu), rows=hu.shape[1], cols=hu.shape[2], pixel_spacing=(0.75, 0.75),
                        slice_spacing=2.0, study=study, shuffle=False)
    for i in range(len(hu)):
        save(ct_dataset(spec, i, stored_values(hu[i], spec), i + 1), folder / f"{i:04d}.dcm")
    return spec


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze_inputs")
    positive = write_volume(root / "positive", bone_block_volume(), "positive")
    negative = write_volume(root / "negative", bone_block_volume(hot_slices=range(0)), "negative")
    (root / "notes.txt").write_text("not an image\n")
    return root, positive, negative


def run_cli(args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    marker = tmp_path / "tf_modules.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", WRAPPER, str(marker), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    loaded = marker.read_text().split() if marker.exists() else ["<marker not written>"]
    return proc, loaded


def test_analyze_writes_the_contract_json_without_tensorflow(inputs, tiny_model, tmp_path):
    root, positive, negative = inputs
    out = tmp_path / "result.json"
    proc, tf_modules = run_cli(["analyze", str(root / "positive"), str(root / "negative"), str(root / "notes.txt"),
                                "--json", str(out), "--model", str(tiny_model), "--threads", "1"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no traceback, no LiteRT banner; the progress bar only appears on a terminal
    assert tf_modules == []  # TensorFlow was never imported
    doc = json.loads(out.read_text())
    assert set(doc) == {"studies", "errors"}
    assert [e["path"] for e in doc["errors"]] == [str(root / "notes.txt")]
    assert isinstance(doc["errors"][0]["error"], str) and doc["errors"][0]["error"]
    studies = {s["series_instance_uid"]: s for s in doc["studies"]}
    assert set(studies) == {positive.series_uid, negative.series_uid}
    for s in doc["studies"]:
        assert set(s) == STUDY_KEYS
        assert isinstance(s["probability"], float) and 0.0 <= s["probability"] <= 1.0
        assert isinstance(s["positive"], bool) and s["threshold"] == 0.5
        assert set(s["model"]) >= {"name", "version", "sha256"} and s["model"]["name"] == "tiny-test"
        assert len(s["model"]["sha256"]) == 64
        assert len(s["slices"]) == 24
        assert set(s["slices"][0]) == {"sop_instance_uid", "z_mm", "probability"}
        assert all(isinstance(v, float) for v in s["timing_s"].values())
        assert set(s["timing_s"]) == {"read", "preprocess", "inference", "post", "total"}
        assert isinstance(s["warnings"], list)
    pos, neg = studies[positive.series_uid], studies[negative.series_uid]
    assert pos["study_instance_uid"] == positive.study_uid
    assert pos["positive"] and not neg["positive"] and neg["findings"] == []
    assert [s["sop_instance_uid"] for s in pos["slices"]] == [positive.sop_uid(i) for i in range(24)]
    (finding,) = pos["findings"]
    assert (finding["slice_start"], finding["slice_end"]) == (10, 14)
    assert finding["peak_sop_instance_uid"] == positive.sop_uid(finding["peak_slice"])
    row, col = finding["center_px"]
    assert BLOCK_ROWS[0] <= row < BLOCK_ROWS[1] and BLOCK_COLS[0] <= col < BLOCK_COLS[1]


def test_nothing_analysable_exits_2_with_one_line_reason(inputs, tiny_model, tmp_path):
    root, _, _ = inputs
    proc, _ = run_cli(["analyze", str(root / "notes.txt"), "--json", "-", "--model", str(tiny_model)], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("error: ") and "not a DICOM file" in lines[0]
    doc = json.loads(proc.stdout)  # --json - writes the document to stdout, even when nothing was analysed
    assert doc == {"studies": [], "errors": [{"path": str(root / "notes.txt"), "error": doc["errors"][0]["error"]}]}


def test_corrupt_model_exits_2_with_a_clear_reason(inputs, tiny_model, tmp_path):
    root, _, _ = inputs
    folder = copy_model_folder(tiny_model, tmp_path / "model")
    (folder / MODEL_FILE).write_bytes((folder / MODEL_FILE).read_bytes()[:-10])
    proc, _ = run_cli(["analyze", str(root / "positive"), "--json", str(tmp_path / "r.json"),
                       "--model", str(folder)], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "sha256" in lines[0] and "corrupt" in lines[0]


def test_help_explains_the_command():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    top = subprocess.run([sys.executable, "-m", "app.cli", "--help"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    sub = subprocess.run([sys.executable, "-m", "app.cli", "analyze", "--help"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert top.returncode == 0 and sub.returncode == 0
    assert "analyze" in top.stdout and "Exit codes" in top.stdout
    for option in ("--json", "--model", "--threads", "--variant", "--heatmaps"):
        assert option in sub.stdout


def test_library_api_and_key_images(inputs, tiny_model, tmp_path):
    root, positive, _ = inputs
    analyzer = Analyzer(str(tiny_model), threads=1)
    pairs, errors = analyze_paths([root / "positive", root / "missing"], analyzer, tmp_path / "work")
    assert len(pairs) == 1 and len(errors) == 1 and "missing" in errors[0].path
    series, result = pairs[0]
    assert series.series_instance_uid == positive.series_uid and result.positive
    assert result.timing_s["read"] > 0 and result.timing_s["total"] >= result.timing_s["read"]
    from app.engine import write_key_images

    paths = write_key_images(series, result, tmp_path / "keys")
    assert [p.name for p in paths] == [f"slice_{i:04d}.png" for i in sorted(result.heatmaps)]
    from PIL import Image

    assert Image.open(paths[0]).size == (128, 128)


# --- reading overlaps the analysis --------------------------------------------------------------


def _slice_results(result):
    return [(s.sop_instance_uid, s.probability) for s in result.slices], [f.to_json() for f in result.findings]


class SeriesOnlyAnalyzer:
    """An analyzer wrapper offering ``analyze_series`` only: ``analyze_paths`` decodes the series first."""

    def __init__(self, analyzer: Analyzer):
        self._analyzer = analyzer
        self.card, self.model_ref = analyzer.card, analyzer.model_ref

    def analyze_series(self, series, progress=None, cancel=None):
        return self._analyzer.analyze_series(series, progress=progress, cancel=cancel)


def test_decoding_streams_into_the_analysis_with_the_same_results(tiny_model, tmp_path, monkeypatch):
    write_volume(tmp_path / "long", bone_block_volume(n_slices=48, hot_slices=range(20, 25)), "long")
    analyzer = Analyzer(str(tiny_model), threads=1, batch_size=4)
    decoded = []
    real_decode = app.ingest._decode_into
    monkeypatch.setattr(app.ingest, "_decode_into", lambda h, out: (decoded.append(h), real_decode(h, out)))
    first_analysed = []

    def progress(stage, done, total):
        if stage == "analyze" and not first_analysed:
            first_analysed.append(len(decoded))

    pairs, errors = analyze_paths([tmp_path / "long"], analyzer, tmp_path / "work", progress=progress)
    assert errors == [] and len(decoded) == 48
    # Bounded queues: at most 8 chunks of 4 slices are read before the first batch is analysed.
    assert first_analysed[0] <= 32
    series, streamed = pairs[0]
    expected = analyzer.analyze_series(ingest([tmp_path / "long"], tmp_path / "work2").series[0])
    assert _slice_results(streamed) == _slice_results(expected)
    assert [(f.slice_start, f.slice_end) for f in streamed.findings] == [(20, 24)]
    assert streamed.timing_s["read"] > 0 and streamed.timing_s["total"] >= streamed.timing_s["read"]
    fallback_pairs, _ = analyze_paths([tmp_path / "long"], SeriesOnlyAnalyzer(analyzer), tmp_path / "work3")
    assert _slice_results(fallback_pairs[0][1]) == _slice_results(expected)


def test_a_file_unreadable_during_streaming_is_left_out_and_reported(inputs, tiny_model, tmp_path):
    root, positive, _ = inputs
    folder = tmp_path / "positive"
    folder.mkdir()
    for f in (root / "positive").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    damaged = folder / "0012.dcm"  # slice 12 of 24, inside the bone block
    damaged.write_bytes(damaged.read_bytes()[:-500])
    analyzer = Analyzer(str(tiny_model), threads=1)
    pairs, errors = analyze_paths([folder], analyzer, tmp_path / "work")
    assert [e.path for e in errors] == [str(damaged)] and "truncated" in errors[0].error
    series, result = pairs[0]
    assert series.n_slices == 23 and positive.sop_uid(12) not in series.sop_instance_uids
    assert "1 slice could not be read (see errors)" in result.warnings
    expected = analyzer.analyze_series(ingest([folder], tmp_path / "work2").series[0])
    assert _slice_results(result) == _slice_results(expected)
    assert [(f.slice_start, f.slice_end) for f in result.findings] == [(10, 13)]  # 5 hot slices, one lost


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert all(f in lines[0] for f in fragments), lines[0]


def test_bad_destinations_fail_before_the_analysis(inputs, tiny_model, tmp_path):
    root, _, _ = inputs
    base = ["analyze", str(root / "positive"), "--model", str(tiny_model)]
    proc, _ = run_cli([*base, "--json", ""], tmp_path)
    assert_one_line_error(proc, "--json needs a file name")
    proc, _ = run_cli([*base, "--json", str(tmp_path)], tmp_path)
    assert_one_line_error(proc, "--json needs a file name")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc, _ = run_cli([*base, "--json", str(tmp_path / "r.json"), "--heatmaps", str(blocker / "keys")], tmp_path)
    assert_one_line_error(proc, "cannot create the key image folder")
    assert not (tmp_path / "r.json").exists()
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*.partial"))


def test_a_failed_run_does_not_leave_an_earlier_result_in_place(inputs, tiny_model, tmp_path):
    root, _, _ = inputs
    out = tmp_path / "r.json"
    out.write_text(json.dumps({"studies": [{"probability": 0.99}], "errors": []}))  # yesterday's result
    folder = copy_model_folder(tiny_model, tmp_path / "model")
    (folder / MODEL_FILE).write_bytes(b"replaced")
    proc, _ = run_cli(["analyze", str(root / "positive"), "--json", str(out), "--model", str(folder)], tmp_path)
    assert_one_line_error(proc, "sha256")
    doc = json.loads(out.read_text())
    assert doc["studies"] == [] and "sha256" in doc["errors"][0]["error"]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the hostile UID, written on purpose
def test_a_hostile_series_uid_cannot_place_key_images_outside_their_folder(tiny_model, tmp_path):
    hu = bone_block_volume()
    spec = CTSeriesSpec(n_slices=len(hu), rows=hu.shape[1], cols=hu.shape[2], pixel_spacing=(0.75, 0.75),
                        study="hostile", shuffle=False)
    for i in range(len(hu)):
        ds = ct_dataset(spec, i, stored_values(hu[i], spec), i + 1)
        ds.SeriesInstanceUID = "../../escaped"
        save(ds, tmp_path / "in" / f"{i:04d}.dcm")
    keys = tmp_path / "out" / "keys"
    proc, _ = run_cli(["analyze", str(tmp_path / "in"), "--json", str(tmp_path / "out" / "r.json"),
                       "--heatmaps", str(keys), "--model", str(tiny_model)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    written = [p for p in tmp_path.rglob("*.png")]
    assert written and all(p.resolve().is_relative_to(keys.resolve()) for p in written)


def test_a_reader_that_closes_stdout_gets_no_traceback(inputs, tiny_model, tmp_path):
    root, _, _ = inputs
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "analyze", str(root / "positive"), "--json", "-",
                             "--model", str(tiny_model)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # like "| head -c0"
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 2
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    assert stderr.strip().splitlines() == ["error: the result could not be written: the reader of standard output "
                                           "closed it"]


def test_studies_are_analysed_one_at_a_time_without_holding_earlier_pixels(inputs, tiny_model, tmp_path):
    root, _, _ = inputs
    errors: list = []
    first_pixels = None
    held_while_analysing_the_second: list[bool] = []

    def progress(stage: str, _done: int, _total: int) -> None:
        if stage == "analyze" and first_pixels is not None:
            gc.collect()
            held_while_analysing_the_second.append(first_pixels() is not None)

    studies = iter_study_analyses([root / "positive", root / "negative"], Analyzer(str(tiny_model), threads=1),
                                  tmp_path / "work", errors, progress)
    first_series, first_result = next(studies)
    first_pixels = weakref.ref(first_series.hu)
    del first_series
    _, second_result = next(studies)
    # The first study's pixels went as soon as the consumer let go of them, before the second was analysed.
    assert held_while_analysing_the_second and not any(held_while_analysing_the_second)
    assert next(studies, None) is None and errors == []
    assert {first_result.series_instance_uid, second_result.series_instance_uid} == {
        s.series_uid for s in inputs[1:]}


def test_the_threads_option_reaches_the_interpreter(inputs, tiny_model, tmp_path, monkeypatch):
    import model_zoo.litert
    from app.cli import main

    interpreter = model_zoo.litert._interpreter_class()
    asked: list[int] = []

    def recording(**kwargs):
        asked.append(kwargs["num_threads"])
        return interpreter(**kwargs)

    monkeypatch.setattr(model_zoo.litert, "_interpreter_class", lambda: recording)
    root, _, _ = inputs
    out = tmp_path / "result.json"
    assert main(["analyze", str(root / "positive"), "--json", str(out), "--model", str(tiny_model), "--threads", "3"]) == 0
    assert asked == [3]
    assert len(json.loads(out.read_text())["studies"]) == 1


def test_a_terminal_sees_progress_bars_and_the_json_stays_clean(inputs, tiny_model, tmp_path):
    import pty
    import threading

    root, _, _ = inputs
    primary, secondary = pty.openpty()
    shown: list[bytes] = []

    def read_terminal() -> None:  # drained while the command runs, so a full terminal buffer cannot block it
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the command closed the terminal
                return
            if not chunk:
                return
            shown.append(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        with subprocess.Popen([sys.executable, "-m", "app.cli", "analyze", str(root / "positive"), "--json", "-",
                               "--model", str(tiny_model), "--threads", "1"], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                              stderr=secondary) as proc:
            os.close(secondary)
            stdout, _ = proc.communicate(timeout=300)
        reader.join(timeout=30)
    finally:
        os.close(primary)
    assert proc.returncode == 0
    terminal = b"".join(shown).decode(errors="replace")
    assert "reading DICOM" in terminal and "analysing slices" in terminal and "Traceback" not in terminal
    assert len(json.loads(stdout)["studies"]) == 1  # the bars went to the terminal, not into the JSON
