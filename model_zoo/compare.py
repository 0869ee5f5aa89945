"""Is model B better than model A? Both score the same held-out studies; the AUC difference gets a paired CI.

    python -m model_zoo.compare A B [--data test,external] [--variant keras] [--json OUT]

A and B are registry names, model folders or .tflite files. Each model scores every
study of each split with its own contract, aggregation and (default) TFLite variant.
The study-level AUC difference B - A gets a paired bootstrap 95% CI: every bootstrap
sample resamples the studies once and scores both models on it. The two models fail
on many of the same studies, so the interval of the difference is much narrower than
the two AUC intervals side by side (each about +-0.07 on 120 studies), and it is the
one a ship-or-revert decision needs. ``--data`` takes split names from model A's
training config, or ad-hoc splits NAME=SEED:STUDIES[:SLICES[:external]]; larger
splits narrow the interval (studies are cheap to generate, prepared once into the cache).

The verdict per split: "B better" or "A better" when the interval excludes 0,
otherwise "no difference shown".

Exit codes: 0 compared, 2 model or data problem (or the --json file cannot be written).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_zoo.card import ModelCard, ModelError, resolve_model
from model_zoo.dataset import DEFAULT_CACHE, SplitSpec, iter_split
from model_zoo.evaluate import (
    SlicePredictor,
    add_scoring_arguments,
    parse_splits,
    predictor,
    study_probability_of,
)
from model_zoo.litert import LiteRTError
from model_zoo.metrics import Interval, auc_with_ci, paired_auc_difference

log = logging.getLogger("model_zoo.compare")


@dataclass(frozen=True)
class SplitComparison:
    """Both models on one split: their AUCs and the paired difference B - A."""

    split: str
    n_studies: int
    n_positive: int
    auc_a: Interval
    auc_b: Interval
    difference: Interval

    @property
    def verdict(self) -> str:
        if self.difference.low > 0:
            return "B better"
        if self.difference.high < 0:
            return "A better"
        return "no difference shown"

    def to_json(self) -> dict:
        return {"split": self.split, "n_studies": self.n_studies, "n_positive": self.n_positive,
                "auc_a": self.auc_a.to_json(), "auc_b": self.auc_b.to_json(),
                "auc_difference_b_minus_a": self.difference.to_json(), "verdict": self.verdict}


def compare_split(split: SplitSpec, models: list[tuple[ModelCard, SlicePredictor]],
                  cache_root: Path = DEFAULT_CACHE) -> SplitComparison:
    """Score one split with both models (each through its own contract) and compare them.

    One study at a time, so a large split does not have to fit in memory; models that
    share a contract share each loaded study.
    """
    labels, scores = [], ([], [])
    contracts = list(dict.fromkeys(card.contract for card, _ in models))
    for views in zip(*(iter_split(split, c, cache_root) for c in contracts), strict=True):
        labels.append(int(views[0].positive))  # the same study through each contract
        for score, (card, predict) in zip(scores, models, strict=True):
            score.append(study_probability_of(views[contracts.index(card.contract)], card, predict))
    log.info("%s: %d studies scored by both models", split.name, len(labels))
    y = np.asarray(labels)
    return SplitComparison(split.name, len(y), int(y.sum()), auc_with_ci(y, scores[0]), auc_with_ci(y, scores[1]),
                           paired_auc_difference(y, scores[0], scores[1]))


def _interval(i: Interval, signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"{fmt.format(i.value)} [{fmt.format(i.low)}, {fmt.format(i.high)}]"


def format_table(a: str, b: str, rows: list[SplitComparison]) -> str:
    lines = [f"A = {a}", f"B = {b}", "",
             "| split | studies (pos) | AUC A [95% CI] | AUC B [95% CI] | B - A [paired 95% CI] | verdict |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r.split} | {r.n_studies} ({r.n_positive}) | {_interval(r.auc_a)} | {_interval(r.auc_b)} | "
              f"{_interval(r.difference, signed=True)} | {r.verdict} |" for r in rows]
    return "\n".join(lines)


def _label(card: ModelCard, variant: str) -> str:
    return f"{card.name} {card.version} ({variant}, {card.folder})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model_zoo.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_a", help="model A: registry name, model folder or .tflite file (the reference)")
    p.add_argument("model_b", help="model B: the candidate")
    p.add_argument("--data", default="test", help="comma-separated splits (default: %(default)s)")
    add_scoring_arguments(p, models="both models")
    p.add_argument("--json", type=Path, default=None, help="also write the comparison here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        models, names = [], []
        for name in (args.model_a, args.model_b):
            card = resolve_model(name)
            variant, predict = predictor(card, args.variant, args.threads)
            models.append((card, predict))
            names.append(_label(card, variant))
        splits = parse_splits(args.data, models[0][0])
        rows = [compare_split(split, models, args.cache) for split in splits]
    except (ModelError, LiteRTError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(*names, rows))
    if args.json:
        document = {"a": names[0], "b": names[1], "splits": [r.to_json() for r in rows]}
        try:
            args.json.write_text(json.dumps(document, indent=2) + "\n")
        except OSError as exc:
            print(f"error: cannot write {args.json}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
