"""Regenerate docs/screenshot_result.png: the app's result page for a positive phantom study.

Starts the real app (same command line as ``make run``) with the chosen model, uploads a
zipped positive phantom series in Debian's Chromium, waits for the result, moves the
slice viewer to the most suspicious slice (heatmap overlay on, findings boxed) and
saves the page.

    .venv/bin/python docs/make_screenshot.py [--model NAME_OR_PATH] [--slices 48] [--out docs/screenshot_result.png]

Exit codes: 0 written; 2 the result was not positive (pick another --index) or the app failed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from ui_helpers import TRIAGE_LABELS, chromium, open_app, phantom_zip, running_app, upload_and_wait  # noqa: E402

VIEWPORT = (1500, 2300)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model for the app (default: the registry's default)")
    parser.add_argument("--slices", type=int, default=48, help="phantom slices (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=11, help="phantom seed (default: %(default)s)")
    parser.add_argument("--index", type=int, default=0, help="phantom study index (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshot_result.png")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="screenshot-") as tmp:
        archive = phantom_zip(Path(tmp), positive=True, n_slices=args.slices, seed=args.seed, index=args.index)
        with running_app(args.model, Path(tmp) / "logs", {"MYELOMA_APP_DATA": str(Path(tmp) / "app-data")}) as app, \
                chromium(VIEWPORT) as page:
            open_app(page, app.url)
            label, seconds = upload_and_wait(page, [archive])
            if label != TRIAGE_LABELS[0]:
                print(f"error: the app called this phantom '{label}'; try another --index", file=sys.stderr)
                return 2
            page.get_by_role("button", name="Show").first.click()  # viewer on the most suspicious key image
            page.wait_for_timeout(1500)
            page.get_by_text("Slice viewer").scroll_into_view_if_needed()
            # Streamlit scrolls its main container, not the window: back to the top of both.
            page.evaluate("window.scrollTo(0, 0); document.querySelectorAll('[data-testid=stMain], section.main')"
                          ".forEach(e => e.scrollTo(0, 0))")
            page.wait_for_timeout(500)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out))
    print(f"wrote {args.out} ({label}, result after {seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
