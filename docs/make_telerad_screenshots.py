"""Regenerate docs/screenshot_worklist.png and docs/screenshot_case.png: the teleradiologist's side.

Writes phantom CT studies (model_zoo.phantoms), analyses them with the chosen model (the
engine the clinic app runs), forwards them from two clinics to a throw-away Orthanc on
loopback (a clinic user and a reader user), starts the app and takes the screenshots in
Debian's Chromium: the Worklist, then the Case view of the top case with its AI finding
confirmed and an impression typed.

    .venv/bin/python docs/make_telerad_screenshots.py [--model NAME_OR_PATH] [--slices 32] [--out-dir docs]

The app entry is app/ui/main.py once it navigates to the worklist, tests/telerad_app.py before.
Exit codes: 0 written; 2 the app or the server failed (reason on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from orthanc_helpers import OrthancServer  # noqa: E402
from ui_helpers import chromium, free_port, phantom_series  # noqa: E402
from worklist_helpers import READER_PASSWORD, READER_USER, Telerad, forward_analysed  # noqa: E402

from app.domain import AppError  # noqa: E402
from app.engine import Analyzer, analyze_paths  # noqa: E402
from app.launch import MAIN_SCRIPT, app_environment, streamlit_command  # noqa: E402

VIEWPORT = (1500, 1250)
CASE_VIEWPORT = (1500, 2500)
# (clinic, positive phantom?, phantom index): what the reading site receives, in this order
CASES = (("Clinic South", False, 1), ("Clinic North", True, 0), ("Clinic North", False, 2),
         ("Clinic South", True, 3))


def app_entry() -> Path:
    wired = "worklist.py" in MAIN_SCRIPT.read_text()
    return MAIN_SCRIPT if wired else REPO / "tests" / "telerad_app.py"


@contextlib.contextmanager
def running_streamlit(entry: Path, env: dict[str, str], log_path: Path, timeout_s: float = 60.0):
    port = free_port()
    command = streamlit_command(port, "127.0.0.1")
    command[command.index(str(MAIN_SCRIPT))] = str(entry)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"streamlit did not start:\n{log_path.read_text()[-2000:]}") from None
                time.sleep(0.25)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # its own session: only what this script started
        process.wait(timeout=15)


def prepare_server(root: Path, model: str | None, slices: int) -> Telerad:
    server = OrthancServer(workdir=root / "orthanc", extra_users={READER_USER: READER_PASSWORD}).start()
    telerad = Telerad(server=server, clinic_data=root / "reader")
    analyzer = Analyzer(model)
    for number, (clinic, positive, index) in enumerate(CASES):
        data = root / clinic.replace(" ", "_")
        data.mkdir(exist_ok=True)
        (data / "settings.json").write_text(json.dumps({"server": {
            "url": telerad.url, "user": server.user, "password": server.password, "site_name": clinic}}))
        folder = root / f"study{number}"
        phantom_series(folder, positive=positive, n_slices=slices, index=index)
        ((series, result),), _ = analyze_paths([folder], analyzer, root / f"work{number}")
        forward_analysed(series, result, data)
        print(f"forwarded {clinic}: {result.triage_label} (p={result.probability:.2f})")
        time.sleep(1.0)  # distinct arrival times
    return telerad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model for the analysis (default: the registry's default)")
    parser.add_argument("--slices", type=int, default=32, help="phantom slices per study (default: %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="telerad-shots-") as tmp:
        root = Path(tmp)
        try:
            telerad = prepare_server(root, args.model, args.slices)
        except AppError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        try:
            telerad.clinic_data.mkdir(exist_ok=True)
            env = app_environment(args.model, base={**os.environ, **telerad.env()})
            with running_streamlit(app_entry(), env, root / "streamlit.log") as url, chromium(VIEWPORT) as page:
                # From the start page, as a user would (a deep link may bypass the navigation script).
                page.goto(url, wait_until="domcontentloaded")
                page.get_by_role("link", name="Worklist").first.click(timeout=60_000)
                page.locator('[data-testid="stDataFrame"]').first.wait_for(timeout=60_000)
                page.wait_for_timeout(1500)
                args.out_dir.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out_dir / "screenshot_worklist.png"))
                page.set_viewport_size({"width": CASE_VIEWPORT[0], "height": CASE_VIEWPORT[1]})
                page.get_by_role("button", name="Open case").click()
                page.get_by_role("button", name="and send").wait_for(timeout=60_000)  # the read form: page complete
                confirm = page.get_by_text("Confirm AI finding F1")
                if confirm.count():
                    confirm.first.click()
                    page.get_by_text("confirmed AI finding F1").wait_for(timeout=30_000)
                page.get_by_label("Impression").fill("Punched-out lytic lesion in the vertebral body, "
                                                     "consistent with myeloma. Recommend haematology review.")
                page.locator('[data-testid="stMain"]').evaluate("main => main.scrollTo(0, 0)")
                page.wait_for_timeout(1500)
                page.screenshot(path=str(args.out_dir / "screenshot_case.png"))
        except (AppError, RuntimeError, TimeoutError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        finally:
            telerad.server.stop(kill=True)
    print(f"wrote {args.out_dir / 'screenshot_worklist.png'} and {args.out_dir / 'screenshot_case.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
