"""How fast is ingest compared with just reading the DICOM files with pydicom? Run by hand, not in CI.

    python benchmarks/bench_ingest.py [--slices 300] [--syntax native,jpeg-ls,jpeg2000,rle] [--repeats 3]

Input: the 512 x 512 phantom study of ``bench_analyze.py`` (cached under ``build/bench/``),
re-encoded once per compressed transfer syntax asked for. For each syntax a fresh
worker process times, median of ``--repeats`` after a warm-up pass (files in the
page cache):

- floor: ``pydicom.dcmread(path).pixel_array`` for every file;
- ingest: ``app.ingest.ingest`` (header pass, series choice, pixel pass, HU int16);
- header pass alone (the part of ingest that reads every file without pixels);

and reports the ratio ingest / floor and the worker's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_analyze import DEFAULT_CACHE, REPO, dicom_files, peak_rss_mb, phantom_series, pydicom_floor

SYNTAXES = {"native": None, "jpeg-ls": "1.2.840.10008.1.2.4.80", "jpeg2000": "1.2.840.10008.1.2.4.90",
            "rle": "1.2.840.10008.1.2.5"}


def encoded_copy(source: Path, syntax: str) -> Path:
    """``source`` re-encoded losslessly into ``syntax``, written once next to it."""
    uid = SYNTAXES[syntax]
    if uid is None:
        return source
    folder = source.with_name(f"{source.name}_{syntax}")
    done = folder / ".complete"
    if done.exists():
        return folder
    import pydicom

    print(f"encoding {source.name} as {syntax} into {folder} (once)...", file=sys.stderr)
    folder.mkdir(parents=True, exist_ok=True)
    for path in dicom_files(source):
        ds = pydicom.dcmread(path)
        ds.compress(uid, generate_instance_uid=False)
        ds.save_as(folder / path.name, enforce_file_format=True)
    done.write_text("ok\n")
    return folder


def worker(folder: Path, repeats: int) -> dict:
    """One syntax, in its own process so peak RSS belongs to it alone."""
    from app.archive import InputFile
    from app.ingest import DEFAULT_LIMITS, _read_header, ingest

    files = dicom_files(folder)
    floor = pydicom_floor(files, repeats)
    ingest_times, header_times = [], []
    for _ in range(repeats + 1):
        with tempfile.TemporaryDirectory() as workdir:
            started = time.perf_counter()
            result = ingest([folder], Path(workdir))
            ingest_times.append(time.perf_counter() - started)
        if len(result.series) != 1:
            raise SystemExit(f"expected one series, got {len(result.series)}; errors: {result.errors[:3]}")
        shape = result.series[0].hu.shape
        del result
        started = time.perf_counter()
        for path in files:
            _read_header(InputFile(path, str(path)), DEFAULT_LIMITS)
        header_times.append(time.perf_counter() - started)
    ingest_s = statistics.median(ingest_times[1:])
    return {"files": len(files), "shape": list(shape), "floor_s": floor, "ingest_s": ingest_s,
            "header_pass_s": statistics.median(header_times[1:]), "ratio": ingest_s / floor,
            "peak_rss_mb": peak_rss_mb()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--syntax", default="native", help=f"comma-separated, from {', '.join(SYNTAXES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--input", type=Path, default=None, help="benchmark this DICOM folder instead of a phantom")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        folder, repeats = json.loads(args.worker)
        print(json.dumps(worker(Path(folder), repeats)))
        return 0
    source = args.input or phantom_series(args.cache, args.slices)
    print(f"{'syntax':10s} {'files':>5s} {'pydicom s':>9s} {'ingest s':>8s} {'ratio':>5s} {'headers s':>9s} "
          f"{'peak RSS MB':>11s}")
    for syntax in args.syntax.split(","):
        folder = encoded_copy(source, syntax)
        cmd = [sys.executable, __file__, "--worker", json.dumps([str(folder), args.repeats])]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
        if out.returncode != 0:
            raise SystemExit(f"worker {syntax} failed:\n{out.stderr[-2000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{syntax:10s} {r['files']:5d} {r['floor_s']:9.3f} {r['ingest_s']:8.3f} {r['ratio']:5.2f} "
              f"{r['header_pass_s']:9.3f} {r['peak_rss_mb']:11.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
