"""Latency and memory of every TFLite variant of a model on this machine. Run by hand, not in CI.

    python benchmarks/bench_variants.py [--model NAME_OR_PATH] [--threads 1,2] [--batch 1,16] [--runs 50]

Re-measures what ``python -m quantize`` recorded, with the same code
(``quantize.measure``: LiteRT + XNNPACK, median of ``--runs`` timed calls after a
warm-up; peak RSS of a fresh process), without TensorFlow, so it also runs on a
clinic laptop with only requirements-edge.txt. The input is a batch of phantom
slices through the model's input contract.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from model_zoo.card import ModelError, resolve_model  # noqa: E402
from model_zoo.contract import volume_to_input  # noqa: E402
from quantize import measure  # noqa: E402


def phantom_batch(card, n: int):
    from model_zoo.phantoms.generator import render_study, sample_study_spec

    study = render_study(sample_study_spec(5, 0, n_slices=max(n, 8)))
    spacing = float(study.pixel_spacing_mm)
    return volume_to_input(study.hu, (spacing, spacing), study.z_mm, card.contract)[:n]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="registry name or model folder (default: the default model)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default: %(default)s)")
    p.add_argument("--batch", default="1,16", help="comma-separated batch sizes (default: %(default)s)")
    p.add_argument("--runs", type=int, default=50, help="timed calls per setting (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        card = resolve_model(args.model)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    threads = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    x = phantom_batch(card, max(batches))
    paths = {name: card.verify(variant.file) for name, variant in card.variants.items()}
    columns = {f"b{b}/{t}T": measure.latencies_ms_per_slice(paths, x[:b], t, warmup=3, runs=args.runs)
               for b in batches for t in threads}
    print(f"{card.name} {card.version}: ms per slice (median of {args.runs}, variants timed round-robin), "
          f"peak RSS of a fresh process")
    print(" | ".join(["variant", "bytes", *columns, "peak MB"]))
    for name, path in paths.items():
        peak = measure.peak_memory_mb(path, max(threads), max(batches)).get("peak_mb", "n/a")
        cells = [name, f"{measure.file_sizes(path)['bytes']:,}", *[f"{col[name]:.2f}" for col in columns.values()], str(peak)]
        print(" | ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
