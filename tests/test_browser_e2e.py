"""End to end in a real browser (Debian Chromium driven by Playwright) against the real server.

The app is started with the same command line as ``make run`` (on a free loopback port, with
the tiny test model); a zipped phantom series is uploaded through the file picker; the page
must show the probability and triage label the engine computes for the same files. The
screenshot goes to test-artifacts/ (docs/make_screenshot.py makes the committed one).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from model_helpers import shared_tiny_model
from ui_helpers import (
    CHROMIUM,
    TRIAGE_LABELS,
    chromium,
    open_app,
    phantom_zip,
    running_app,
    shown_probability,
    upload,
    upload_and_wait,
    wait_for_text,
)

from app.engine import Analyzer, analyze_paths
from app.ui import BANNER

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
NOTHING_ANALYSED = "No analysable CT series was found in the input."


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return shared_tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def app(tiny_model, tmp_path_factory):
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium is required at {CHROMIUM} for the browser test: install the Debian package "
                    "'chromium' (make debs)", pytrace=False)
    root = tmp_path_factory.mktemp("e2e")
    with running_app(tiny_model, root / "logs", {"MYELOMA_APP_DATA": str(root / "app-data")}) as running:
        yield running
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(running.log_path, ARTIFACTS / "e2e_streamlit.log")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return phantom_zip(tmp_path_factory.mktemp("e2e_phantom"), positive=True, n_slices=24)


def test_a_bookmarked_page_opens_inside_the_app(app):
    # First visit of a fresh server, straight to a page URL (a bookmark, a restored tab).
    with chromium() as page:
        page.goto(f"{app.url}/outbox", wait_until="domcontentloaded")
        page.get_by_role("heading", name="Outbox").wait_for(timeout=60_000)
        assert page.get_by_text(BANNER).is_visible()
        assert page.get_by_text("Analyze", exact=True).is_visible()  # the app's navigation, not a bare script


def test_upload_a_zipped_phantom_and_read_the_result(app, phantom, tiny_model, tmp_path):
    (_, expected), = analyze_paths([phantom], Analyzer(str(tiny_model)), tmp_path)[0]
    expected_slices = len(expected.slices)
    with chromium((1400, 2200)) as page:
        open_app(page, app.url)
        label, seconds = upload_and_wait(page, [phantom])
        assert label == expected.triage_label
        assert shown_probability(page) == f"{expected.probability:.1%}"
        assert page.get_by_text(BANNER).is_visible()
        page.get_by_role("button", name="Show").first.wait_for()  # key images rendered
        page.get_by_text(f"of {expected_slices}", exact=False).first.wait_for()  # slice viewer caption
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "e2e_result.png"))
        assert "Traceback" not in page.content()
        downloaded = {name: download(page, name) for name in ("result (JSON)", "summary (PDF)", "summary (PNG)")}
    assert seconds < 60
    (study,) = json.loads(downloaded["result (JSON)"])["studies"]
    assert study == expected.to_json() | {"timing_s": study["timing_s"]}  # the CLI's document
    assert downloaded["summary (PDF)"].startswith(b"%PDF") and downloaded["summary (PNG)"].startswith(b"\x89PNG")


def download(page, what: str) -> bytes:
    with page.expect_download() as event:
        page.get_by_role("button", name=f"Download {what}").click()
    return Path(event.value.path()).read_bytes()


def test_a_bad_upload_shows_a_message_not_a_traceback(app, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not a CT image\n")
    with chromium() as page:
        open_app(page, app.url)
        upload(page, [notes])
        assert wait_for_text(page, (NOTHING_ANALYSED, *TRIAGE_LABELS)) == NOTHING_ANALYSED
        message = page.locator('[data-testid="stAlert"]').filter(has_text=NOTHING_ANALYSED).inner_text()
        assert "notes.txt" in message and "DICOM" in message
        page.screenshot(path=str(ARTIFACTS / "e2e_bad_upload.png"))
        assert "Traceback" not in page.content()
