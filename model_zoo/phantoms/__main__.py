"""Write a synthetic CT data set: one DICOM folder per study plus truth.json.

    python -m model_zoo.phantoms OUT_DIR --studies N --seed S [--slices K] [--external] [--montage PNG]

Studies alternate positive (even index) / negative (odd index). Exit codes:
0 success, 2 invalid arguments, 3 the output could not be written, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from .dicom_writer import write_study_dicom
from .generator import render_study, sample_study_spec
from .montage import EXAMPLE_KINDS, example_panels, panels_from_study, save_montage

EXIT_OK, EXIT_USAGE, EXIT_OUTPUT, EXIT_INTERRUPTED = 0, 2, 3, 130
TRUTH_FILE = "truth.json"

log = logging.getLogger("model_zoo.phantoms")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model_zoo.phantoms",
        description=__doc__.split("\n\n")[0]
        + " Deterministic: the same --seed gives the same pixels and truth.",
        epilog="Exit codes: 0 success, 2 invalid arguments, 3 output not writable, 130 interrupted.",
    )
    parser.add_argument(
        "out_dir", type=Path, help="output folder (created); studies go to OUT_DIR/study_0000, ..."
    )
    parser.add_argument("--studies", type=_positive_int, default=4, help="number of studies (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="data set seed (default 0)")
    parser.add_argument("--slices", type=_positive_int, default=48, help="slices per study (default 48)")
    parser.add_argument(
        "--external",
        action="store_true",
        help="scanner/habitus settings outside the training ranges (domain-shift test set)",
    )
    parser.add_argument(
        "--montage", type=Path, metavar="PNG", help="also write a labelled bone-window montage"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every study")
    return parser


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def generate(
    out_dir: Path, studies: int, seed: int, slices: int, external: bool, montage: Path | None
) -> dict:
    """Generate the data set; returns the truth document that was written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    truth = {
        "generator": "model_zoo.phantoms",
        "seed": seed,
        "n_studies": studies,
        "n_slices": slices,
        "external": external,
        "label_rule": "slice positive if a lesion centre is within 0.75 radius of the slab centre, "
        "-1 (ambiguous) if a lesion only intersects the slab, else 0",
        "studies": [],
    }
    panels = []
    start = time.perf_counter()
    for index in range(studies):
        spec = sample_study_spec(seed, index, positive=index % 2 == 0, n_slices=slices, external=external)
        study = render_study(spec)
        folder = f"study_{index:04d}"
        write_study_dicom(study, out_dir / folder)
        truth["studies"].append({"folder": folder, **study.truth()})
        if montage is not None:
            panels += panels_from_study(study, set(EXAMPLE_KINDS) - {p.kind for p in panels})
        log.info("study %d/%d written (%s)", index + 1, studies, "positive" if spec.positive else "negative")
    elapsed = time.perf_counter() - start
    _write_json_atomic(out_dir / TRUTH_FILE, truth)
    print(
        f"wrote {studies} studies x {slices} slices to {out_dir} in {elapsed:.1f} s "
        f"({studies / elapsed:.2f} studies/s, {studies * slices / elapsed:.0f} slices/s)"
    )
    if montage is not None:
        path = save_montage(example_panels(seed, panels), montage)
        print(f"montage written to {path}")
    return truth


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        generate(args.out_dir, args.studies, args.seed, args.slices, args.external, args.montage)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        print(
            f"cannot write the output: {exc.strerror or exc} ({exc.filename or args.out_dir})",
            file=sys.stderr,
        )
        return EXIT_OUTPUT
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
