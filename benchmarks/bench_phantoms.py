"""Speed of the phantom generator: spec sampling, rendering and DICOM writing (prints a markdown table).

    python benchmarks/bench_phantoms.py [--studies 6] [--slices 48] [--seed 0]

Single process. Wall time and CPU time (time.process_time) are both printed: on a
shared machine the CPU time is the better estimate of the single-core cost.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_zoo.phantoms import render_study, sample_study_spec, write_study_dicom  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--slices", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    steps = ("sample_study_spec", "render_study", "write_study_dicom")
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}

    def timed(name, fn, *fn_args):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn(*fn_args)
        wall[name].append(time.perf_counter() - w0)
        cpu[name].append(time.process_time() - c0)
        return out

    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.studies):
            spec = timed("sample_study_spec", sample_study_spec, args.seed, index, None, args.slices)
            study = timed("render_study", render_study, spec)
            timed("write_study_dicom", write_study_dicom, study, Path(tmp) / str(index))

    print(f"phantom generator, {args.studies} studies x {args.slices} slices (512 x 512), one process\n")
    print("| step | wall median s | CPU median s | CPU max s |")
    print("| --- | --- | --- | --- |")
    for name in steps:
        print(
            f"| {name} | {statistics.median(wall[name]):.3f} | {statistics.median(cpu[name]):.3f} | {max(cpu[name]):.3f} |"
        )
    total_wall = sum(sum(v) for v in wall.values())
    total_cpu = sum(sum(v) for v in cpu.values())
    print(
        f"\nend to end: {args.studies / total_wall:.2f} studies/s wall, {args.studies / total_cpu:.2f} studies/s per CPU core"
    )


if __name__ == "__main__":
    main()
