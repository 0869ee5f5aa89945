"""Peak resident memory of one LiteRT inference, measured in this (fresh) process.

    python -m quantize.memory_probe MODEL.tflite [--threads 2] [--batch 16]

Prints one JSON line: ``baseline_mb`` (peak RSS after importing numpy and LiteRT),
``peak_mb`` (peak RSS after loading the model and running one batch of zeros) and
``model_mb`` (the difference: interpreter, weights, tensor arena). Linux only
(``/proc/self/status`` VmHWM). No TensorFlow is imported.

Exit codes: 0 measured, 2 the file cannot be loaded or run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it starts afresh at exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("VmHWM missing from /proc/self/status")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quantize.memory_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="TFLite file")
    p.add_argument("--threads", type=int, default=2, help="LiteRT threads (default: %(default)s)")
    p.add_argument("--batch", type=int, default=16, help="slices per inference (default: %(default)s)")
    args = p.parse_args(argv)

    import numpy as np
    from ai_edge_litert import interpreter  # noqa: F401  (imported before the baseline on purpose)

    from model_zoo.litert import LiteRTError, TFLiteModel

    baseline = peak_rss_mb()
    try:
        model = TFLiteModel(args.model, threads=args.threads)
        model.predict(np.zeros((args.batch, *model.input_shape[1:]), np.float32))
    except LiteRTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    peak = peak_rss_mb()
    print(json.dumps({"baseline_mb": round(baseline, 1), "peak_mb": round(peak, 1), "model_mb": round(peak - baseline, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
