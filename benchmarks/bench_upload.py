"""Upload -> result in the browser versus the `analyze` command, on the same 300-slice zip. Run by hand.

    .venv/bin/python benchmarks/bench_upload.py [--model NAME_OR_PATH] [--slices 300] [--repeats 3]

Input: the phantom study of benchmarks/bench_analyze.py (``--slices`` slices of 512 x 512,
cached under build/bench/), zipped once (deflate level 1) next to it.

CLI: wall time of ``python -m app.cli analyze ZIP --json OUT`` as a user runs it (interpreter
start, model load, unzip, read, inference, JSON). Browser: the real app (the ``make run``
command line) in Debian's Chromium: from choosing the zip in the file picker to the triage
label on screen (browser upload over loopback, writing the upload to disk, unzip, read,
inference, rendering). The page was loaded before the clock starts, so the model is loaded.
Medians of ``--repeats``. Acceptance: browser <= 3 x CLI.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from ui_helpers import chromium, open_app, running_app, upload_and_wait, zip_folder  # noqa: E402

from benchmarks.bench_analyze import DEFAULT_CACHE, phantom_series  # noqa: E402

LIMIT = 3.0


def cli_seconds(archive: Path, model: str | None, out: Path) -> float:
    command = [sys.executable, "-m", "app.cli", "analyze", str(archive), "--json", str(out)]
    command += ["--model", model] if model else []
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - started


def browser_seconds(page, url: str, archive: Path) -> tuple[float, float, str]:
    """(upload -> result seconds, the app's own analysis seconds, label)."""
    open_app(page, url)
    label, seconds = upload_and_wait(page, [archive], timeout_s=600)
    caption = page.get_by_text("analysed in").first.inner_text()
    analysed = float(re.search(r"analysed in ([0-9.]+) s", caption).group(1))
    return seconds, analysed, label


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="registry name, model folder or .tflite (default: registry default)")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)

    folder = phantom_series(args.cache, args.slices)
    archive = args.cache / f"{folder.name}.zip"
    if not archive.is_file():
        print(f"zipping {folder} (once)...", file=sys.stderr)
        zip_folder(folder, archive.with_suffix(".partial")).replace(archive)
    size_mb = archive.stat().st_size / 1e6

    with tempfile.TemporaryDirectory(prefix="bench-upload-") as tmp:
        tmp = Path(tmp)
        cli_seconds(archive, args.model, tmp / "warm.json")  # page cache and .pyc warm-up
        cli = [cli_seconds(archive, args.model, tmp / f"cli{i}.json") for i in range(args.repeats)]
        browser, analysed = [], []
        with running_app(args.model, tmp / "logs", {"MYELOMA_APP_DATA": str(tmp / "app-data")}) as app, \
                chromium() as page:
            for _ in range(args.repeats):
                seconds, inside, label = browser_seconds(page, app.url, archive)
                browser.append(seconds)
                analysed.append(inside)
    cli_s, browser_s, inside_s = (statistics.median(v) for v in (cli, browser, analysed))
    ratio = browser_s / cli_s
    print(f"\n{args.slices}-slice 512x512 phantom zip, {size_mb:.0f} MB; model {args.model or 'registry default'}; "
          f"median of {args.repeats}; result: {label}\n")
    print("| path | seconds |")
    print("|---|---|")
    print(f"| CLI `python -m app.cli analyze ZIP --json OUT` (whole command) | {cli_s:.2f} |")
    print(f"| browser: file chosen -> triage label on screen | {browser_s:.2f} |")
    print(f"| ... of which the app's analysis job (write upload, unzip, read, infer) | {inside_s:.2f} |")
    print(f"| ... of which browser upload + page rendering | {browser_s - inside_s:.2f} |")
    print(f"\nbrowser / CLI = {ratio:.2f} (limit {LIMIT:.1f}): {'PASS' if ratio <= LIMIT else 'FAIL'}")
    return 0 if ratio <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
