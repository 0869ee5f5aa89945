"""Start the clinic app (what ``make run`` calls): Streamlit on http://localhost:8501, headless.

The model (default: the registry's default, bundled in model_zoo/models/) is checked
before the server starts, so a missing or corrupt model is reported here, not in the
browser. Upload limits and other server options are in .streamlit/config.toml.

Exit codes:
  0   the server stopped normally (or --check passed)
  2   the model cannot be loaded, or bad options; reason on stderr
  130 interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from app.domain import CLI_WORK_DIR_PREFIX, UI_WORK_DIR_PREFIX, AppError
from app.ui import MODEL_ENV, THREADS_ENV, VARIANT_ENV

REPO_ROOT = Path(__file__).resolve().parent.parent
MAIN_SCRIPT = REPO_ROOT / "app" / "ui" / "main.py"
DEFAULT_PORT = 8501
DEFAULT_ADDRESS = "localhost"
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 2, 130


def streamlit_command(port: int = DEFAULT_PORT, address: str = DEFAULT_ADDRESS) -> list[str]:
    """The ``streamlit run`` command line; run it with ``cwd=REPO_ROOT`` so .streamlit/ is found."""
    return [sys.executable, "-m", "streamlit", "run", str(MAIN_SCRIPT),
            "--server.headless", "true", "--server.port", str(port), "--server.address", address,
            "--browser.gatherUsageStats", "false"]


def app_environment(model: str | None = None, variant: str | None = None, threads: int | None = None,
                    base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The server's environment: the model choice for app/ui/state.py on top of ``base``."""
    env = dict(os.environ if base is None else base)
    for key, value in ((MODEL_ENV, model), (VARIANT_ENV, variant), (THREADS_ENV, threads)):
        if value is not None:
            env[key] = str(value)
    env.setdefault("MPLBACKEND", "Agg")
    return env


STALE_WORK_DIR_S = 24 * 3600  # older than any analysis or forward still running


def remove_stale_work_dirs(root: Path | None = None, max_age_s: float = STALE_WORK_DIR_S) -> int:
    """Delete analysis temp folders (patient images) that a killed app or CLI left in ``root``
    (default: the system temp folder): this user's, untouched for ``max_age_s``. Returns how many."""
    root = Path(root or tempfile.gettempdir())
    removed = 0
    for folder in root.glob("myeloma-*"):
        try:
            info = folder.lstat()
        except OSError:
            continue
        if (folder.name.startswith((UI_WORK_DIR_PREFIX, CLI_WORK_DIR_PREFIX)) and stat.S_ISDIR(info.st_mode)
                and info.st_uid == os.getuid() and time.time() - info.st_mtime > max_age_s):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port (default: %(default)s)")
    parser.add_argument("--address", default=DEFAULT_ADDRESS,
                        help="address to listen on (default: %(default)s, this computer only)")
    parser.add_argument("--model", default=os.environ.get(MODEL_ENV), metavar="NAME_OR_PATH",
                        help=f"registry name, model folder or .tflite file (default: ${MODEL_ENV} or the "
                             "registry's default)")
    parser.add_argument("--variant", default=os.environ.get(VARIANT_ENV),
                        help="model variant from the card, e.g. float32 or pqat_int8 (default: the card's choice)")
    parser.add_argument("--threads", type=int, default=os.environ.get(THREADS_ENV), metavar="N",
                        help=f"CPU threads for inference (default: ${THREADS_ENV}, else the number of cores, "
                             "at most 4)")
    parser.add_argument("--check", action="store_true", help="only check that the model loads, then exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from app.runtime import load_model  # after argument parsing: --help stays instant

    try:
        loaded = load_model(args.model, args.variant, args.threads)
    except AppError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"model {loaded.card.name} {loaded.card.version} ({loaded.variant}) verified", file=sys.stderr)
    if args.check:
        return EXIT_OK
    if removed := remove_stale_work_dirs():
        print(f"removed {removed} temp folder(s) of analyses that ended without cleaning up", file=sys.stderr)
    del loaded  # the app loads its own copy, once, in the server process
    print(f"Myeloma CT app: http://{args.address}:{args.port}  (Ctrl-C stops it)", file=sys.stderr)
    env = app_environment(args.model, args.variant, args.threads)
    server = subprocess.Popen(streamlit_command(args.port, args.address), cwd=REPO_ROOT, env=env)
    signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop: same as Ctrl-C
    try:
        return server.wait()
    except KeyboardInterrupt:
        stop_server(server)
        return EXIT_INTERRUPTED


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def stop_server(server: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Ask the server to stop (SIGINT, as Ctrl-C would), kill it if it does not within ``timeout_s``."""
    if server.poll() is None:
        server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


if __name__ == "__main__":
    sys.exit(main())
