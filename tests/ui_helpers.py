"""Helpers for the clinic app's tests, benchmark and screenshot script.

- ``phantom_zip``: a zipped phantom CT series (model_zoo.phantoms), as a clinician's USB stick would hold it;
- ``block_series_zip``: a small series the tiny test model (tests/model_helpers.py) calls positive or
  negative for sure, to check both triage labels;
- ``running_app``: the real Streamlit server (the ``python -m app.launch`` command line) on a free
  loopback port, torn down afterwards;
- ``chromium`` / ``upload_and_wait``: drive Debian's Chromium with Playwright through upload -> result.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from app.domain import TRIAGE_NEGATIVE, TRIAGE_POSITIVE
from app.launch import REPO_ROOT, app_environment, streamlit_command

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TRIAGE_LABELS = (TRIAGE_POSITIVE, TRIAGE_NEGATIVE)
PHANTOM_SEED = 11


def phantom_series(folder: Path, positive: bool = True, n_slices: int = 12, seed: int = PHANTOM_SEED,
                   index: int = 0) -> list[Path]:
    """Write one phantom CT study (512 x 512 slices) as DICOM files into ``folder``."""
    from model_zoo.phantoms.dicom_writer import write_study_dicom
    from model_zoo.phantoms.generator import render_study, sample_study_spec

    folder.mkdir(parents=True, exist_ok=True)
    study = render_study(sample_study_spec(seed, index, positive=positive, n_slices=n_slices))
    return write_study_dicom(study, folder)


def zip_folder(folder: Path, archive: Path, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """Zip a study folder the way a user would (members relative to the folder's parent; no hidden files)."""
    with zipfile.ZipFile(archive, "w", compression=compression, compresslevel=1) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                zf.write(path, path.relative_to(folder.parent))
    return archive


def phantom_zip(out_dir: Path, positive: bool = True, n_slices: int = 12, seed: int = PHANTOM_SEED,
                index: int = 0) -> Path:
    """A zipped phantom series, cached in ``out_dir`` by its parameters."""
    name = f"phantom_s{seed}_i{index}_{'pos' if positive else 'neg'}_{n_slices}"
    archive = out_dir / f"{name}.zip"
    if not archive.is_file():
        folder = out_dir / name
        phantom_series(folder, positive, n_slices, seed, index)
        partial = zip_folder(folder, out_dir / f"{name}.zip.partial")
        partial.replace(archive)
    return archive


def block_series_zip(out_dir: Path, positive: bool) -> Path:
    """A zipped 24-slice series of water, with a dense-bone block on 5 slices when ``positive``.

    The tiny model calls those 5 slices positive (p ~ 0.96) and everything else negative (p ~ 0.04).
    """
    from dicom_factory import CTSeriesSpec, ct_dataset, save, stored_values
    from model_helpers import bone_block_volume

    name = "block_positive" if positive else "block_negative"
    hu = bone_block_volume() if positive else bone_block_volume(hot_slices=range(0))
    spec = CTSeriesSpec(n_slices=len(hu), rows=hu.shape[1], cols=hu.shape[2], pixel_spacing=(0.75, 0.75),
                        slice_spacing=2.0, study=name, shuffle=False)
    folder = out_dir / name
    for i in range(len(hu)):
        save(ct_dataset(spec, i, stored_values(hu[i], spec), i + 1), folder / f"{i:04d}.dcm")
    return zip_folder(folder, out_dir / f"{name}.zip")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningApp:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""


def wait_healthy(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    raise RuntimeError(f"streamlit did not become healthy within {timeout_s:.0f} s:\n{log_path.read_text()[-3000:]}")


@contextlib.contextmanager
def running_app(model: str | Path | None, log_dir: Path, extra_env: dict[str, str] | None = None,
                timeout_s: float = 60.0) -> Iterator[RunningApp]:
    """The app's real server (same command line as ``python -m app.launch``) on a free loopback port."""
    port = free_port()
    env = app_environment(str(model) if model else None)
    env.update(extra_env or {})
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"streamlit-{port}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(streamlit_command(port, "127.0.0.1"), cwd=REPO_ROOT, env=env,
                                   stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log_path, timeout_s)
        yield RunningApp(url, process, log_path)
    finally:
        if process.poll() is None:  # its own session: only what this helper started
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@contextlib.contextmanager
def chromium(viewport: tuple[int, int] = (1400, 1000)) -> Iterator:
    """A Playwright page in Debian's Chromium (no browser download)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            yield page
        finally:
            browser.close()


def open_app(page, url: str, timeout_s: float = 60.0) -> None:
    """Load the app and wait until the upload form is ready."""
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_text("Decision support only; requires review by a radiologist").wait_for(timeout=timeout_s * 1000)
    page.locator("input[type=file]").wait_for(state="attached", timeout=timeout_s * 1000)


def upload(page, files: list[Path], timeout_s: float = 120.0) -> None:
    """Choose ``files`` in the file picker, wait until the browser has sent them, press Analyze."""
    page.locator("input[type=file]").set_input_files([str(f) for f in files])
    # Each file gets a chip, with a spinner until the browser has sent it to the server.
    for f in files:
        page.locator(f'[data-testid="stFileChip"][aria-label^="{f.name},"]').wait_for(timeout=timeout_s * 1000)
    page.locator('[data-testid="stFileChipIconSpinner"]').first.wait_for(state="detached", timeout=timeout_s * 1000)
    page.get_by_role("button", name="Analyze", exact=True).click()


def wait_for_text(page, texts: tuple[str, ...], timeout_s: float = 120.0) -> str:
    """Wait until one of ``texts`` is visible; return the text of the element found."""
    locator = page.get_by_text(texts[0])
    for text in texts[1:]:
        locator = locator.or_(page.get_by_text(text))
    locator.first.wait_for(timeout=timeout_s * 1000)
    return locator.first.inner_text().strip()


def upload_and_wait(page, files: list[Path], timeout_s: float = 120.0) -> tuple[str, float]:
    """Upload ``files``, press Analyze, wait for the triage label.

    Returns (the triage label shown, seconds from choosing the files to the result on screen).
    """
    started = time.perf_counter()
    upload(page, files, timeout_s)
    label = wait_for_text(page, TRIAGE_LABELS, timeout_s)
    return label, time.perf_counter() - started


def shown_probability(page) -> str:
    """The study probability as the page shows it, e.g. '97.9%'."""
    return page.locator('[data-testid="stMetricValue"]').first.inner_text().strip()
