"""How fast is `analyze` compared with just reading the DICOM files? Run by hand, not in CI.

    python benchmarks/bench_analyze.py [--model NAME_OR_PATH] [--variants float32,pqat_int8] [--threads 1,2]

Input: one phantom study of ``--slices`` (300) slices of 512 x 512 CT, written once
with ``model_zoo.phantoms`` and cached under ``build/bench/``.

For every (variant, threads) pair a fresh worker process runs the library call
``app.engine.analyze_paths`` (ingest + inference + findings, the model already
loaded) ``--repeats`` times and reports the median wall time, the per-stage busy
times of ``StudyResult.timing_s`` and the process's peak RSS. The whole command
``python -m app.cli analyze`` (interpreter start, imports, model load, JSON) is
timed once per pair as well. The floor is reading and decoding the same files
with pydicom alone (``dcmread`` + ``pixel_array``), timed in the worker right before
each analyze run, so each ratio compares two runs under the same machine load; the
table shows medians of ``--repeats`` such pairs. Files are in the page cache for
both (a warm-up read comes first).

Stages overlap (producer threads decode the files and prepare model inputs while
the interpreter runs), so stage times may add up to more than the wall time.
``read`` is the header pass (every file, before anything else can start) plus
the pixel decoding, which runs inside the pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from quantize.memory_probe import peak_rss_mb  # noqa: E402

DEFAULT_CACHE = REPO / "build" / "bench"
STAGES = ("read", "preprocess", "inference", "post")


def phantom_series(cache: Path, slices: int, seed: int = 7, max_spacing_mm: float | None = None) -> Path:
    """A positive phantom study of ``slices`` 512 x 512 slices, written once into the cache.

    With ``max_spacing_mm`` the first seed from ``seed`` on whose scanner spaces slices at most
    that far apart (a thin-slice series, analysed on a subset of its slices).
    """
    from model_zoo.phantoms.generator import sample_study_spec

    spec = sample_study_spec(seed, 0, positive=True, n_slices=slices)
    while max_spacing_mm is not None and spec.scanner.slice_spacing_mm > max_spacing_mm:
        seed += 1
        spec = sample_study_spec(seed, 0, positive=True, n_slices=slices)
    folder = cache / f"phantom_{slices}_seed{seed}"
    done = folder / ".complete"
    if done.exists():
        return folder
    from model_zoo.phantoms.dicom_writer import write_study_dicom
    from model_zoo.phantoms.generator import render_study

    print(f"writing a {slices}-slice phantom study ({spec.scanner.slice_spacing_mm} mm apart) to {folder} (once)...",
          file=sys.stderr)
    study = render_study(spec)
    write_study_dicom(study, folder)
    done.write_text("ok\n")
    return folder


def dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def pydicom_floor_once(files: list[Path]) -> tuple[float, float]:
    """Wall and CPU seconds to read and decode every file with pydicom alone."""
    import pydicom

    wall, cpu = time.perf_counter(), time.process_time()
    for path in files:
        pydicom.dcmread(path).pixel_array  # noqa: B018 - decoding is the point
    return time.perf_counter() - wall, time.process_time() - cpu


def pydicom_floor(files: list[Path], repeats: int) -> float:
    """Median wall seconds to read and decode every file with pydicom alone (after a warm-up pass)."""
    runs = [pydicom_floor_once(files) for _ in range(repeats + 1)][1:]
    return statistics.median(wall for wall, _ in runs)


def worker(model: str, variant: str, threads: int, folder: Path, repeats: int) -> dict:
    """One configuration, in its own process so peak RSS belongs to it alone.

    Each repeat times the pydicom floor and then ``analyze`` back to back, so a ratio
    compares two runs under the same machine load (on this shared VM the floor alone
    varied between 0.26 and 0.53 s from one minute to the next).
    """
    from app.engine import Analyzer, analyze_paths

    started = time.perf_counter()
    analyzer = Analyzer(model, variant, threads)
    load_s = time.perf_counter() - started
    files = dicom_files(folder)
    pydicom_floor_once(files)  # warms the page cache and pydicom
    runs = []
    for _ in range(repeats):
        floor, floor_cpu = pydicom_floor_once(files)
        with tempfile.TemporaryDirectory() as workdir:
            started, cpu = time.perf_counter(), time.process_time()
            pairs, errors = analyze_paths([folder], analyzer, Path(workdir))
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        if len(pairs) != 1:
            raise SystemExit(f"expected one analysed study, got {len(pairs)}; errors: {errors}")
        result = pairs[0][1]
        analysed = sum(s.analysed for s in result.slices)
        runs.append({"wall_s": wall, "cpu_s": cpu, "floor_s": floor, "ratio": wall / floor,
                     "cpu_ratio": cpu / floor_cpu, "timing_s": result.timing_s, "probability": result.probability})
        del pairs, result
    median_run = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
    summary = {key: statistics.median(r[key] for r in runs) for key in ("wall_s", "cpu_s", "floor_s", "ratio", "cpu_ratio")}
    return {**summary, "load_s": load_s, "timing_s": median_run["timing_s"],
            "probability": round(median_run["probability"], 4), "analysed_slices": analysed,
            "peak_rss_mb": peak_rss_mb()}


def run_worker(model: str, variant: str, threads: int, folder: Path, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps([model, variant, threads, str(folder), repeats])]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    if out.returncode != 0:
        raise SystemExit(f"worker {variant}/{threads} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cli_wall(model: str, variant: str, threads: int, folder: Path) -> float:
    """Seconds for the whole `analyze` command, as a user runs it."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "app.cli", "analyze", str(folder), "--json", str(Path(tmp) / "r.json"),
               "--model", model, "--variant", variant, "--threads", str(threads)]
        started = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
        wall = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"analyze failed ({out.returncode}): {out.stderr.strip()}")
    return wall


def default_variants(model: str | None) -> list[str]:
    """The float32 variant and the int8 variants of the card."""
    from model_zoo.card import resolve_model

    card = resolve_model(model)
    chosen = [k for k, v in card.variants.items() if v.kind == "float32"][:1]
    chosen += [k for k, v in card.variants.items() if "int8" in v.kind]
    return chosen or [card.default_variant]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="registry name or model folder (default: the registry's)")
    parser.add_argument("--variants", default=None, help="comma-separated card variants (default: float32 + int8 ones)")
    parser.add_argument("--threads", default="1,2", help="comma-separated interpreter thread counts")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--input", type=Path, default=None, help="benchmark this DICOM folder instead of a phantom")
    parser.add_argument("--max-spacing", type=float, default=None, metavar="MM",
                        help="use a phantom whose slices are at most MM apart (e.g. 1.25: a thin-slice series, "
                             "which the model analyses about contract.z_step_mm apart)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        model, variant, threads, folder, repeats = json.loads(args.worker)
        print(json.dumps(worker(model, variant, threads, Path(folder), repeats)))
        return 0

    from model_zoo.card import ModelError, resolve_model

    try:
        card = resolve_model(args.model)
    except ModelError as exc:
        raise SystemExit(f"bench_analyze: {exc} (pass --model NAME_OR_PATH)") from None
    model = str(card.folder)
    variants = args.variants.split(",") if args.variants else default_variants(model)
    thread_counts = [int(t) for t in args.threads.split(",")]
    folder = args.input or phantom_series(args.cache, args.slices, max_spacing_mm=args.max_spacing)
    files = dicom_files(folder)
    load_before = os.getloadavg()[0]
    rows = []
    for variant in variants:
        for threads in thread_counts:
            result = run_worker(model, variant, threads, folder, args.repeats)
            result["cli_s"] = cli_wall(model, variant, threads, folder)
            rows.append((variant, threads, result))

    analysed = rows[0][2]["analysed_slices"] if rows else 0
    print(f"## analyze benchmark: {len(files)} files ({folder.name}, {analysed} analysed), model {card.name} {card.version}, "
          f"{os.cpu_count()} CPUs, load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after\n")
    print(f"pydicom read+decode floor (warm page cache): timed right before each analyze run, in the same "
          f"process; medians of {args.repeats} pairs\n")
    print("| variant | threads | floor s | analyze s | x floor | CPU s | x floor CPU | read s | preprocess s "
          "| inference s | post s | peak RSS MB | CLI s (incl. start-up) | p(study) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for variant, threads, r in rows:
        t = r["timing_s"]
        print(f"| {variant} | {threads} | {r['floor_s']:.2f} | {r['wall_s']:.2f} | {r['ratio']:.2f} | {r['cpu_s']:.2f} | "
              f"{r['cpu_ratio']:.2f} | " + " | ".join(f"{t[s]:.2f}" for s in STAGES)
              + f" | {r['peak_rss_mb']:.0f} | {r['cli_s']:.2f} | {r['probability']} |")
    print("\n`analyze s`: median wall time of `app.engine.analyze_paths` with the model loaded (the ratio's "
          "numerator); `CPU s`: the process CPU time of that run (all threads), the fairer measure on a busy "
          "machine. Stage columns are busy times; stages overlap, so they can add up to more than the wall "
          "(`read` = header pass + pixel decoding, the latter inside the pipeline).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
