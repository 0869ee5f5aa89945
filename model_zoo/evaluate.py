"""Evaluate a model like a clinical study, on held-out phantom studies.

    python -m model_zoo.evaluate --model NAME_OR_PATH [--data test,external] [--variant float32]

Study probability = the card's aggregation of slice probabilities; the threshold is
the card's (chosen on validation). Reports study-level AUC with a bootstrap 95% CI,
sensitivity/specificity at the threshold, sensitivity per largest-lesion size,
specificity per hard-negative type, calibration (ECE), and the external
configuration (scanner/anatomy outside the training ranges) separately.
Writes metrics.json, roc.png and reliability.png (default: <model>/evaluation/).

A split is a name from the model's training config (train, val, test, external)
or an ad-hoc spec NAME=SEED:STUDIES[:SLICES[:external]].

Exit codes: 0 done, 2 model or data problem.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from model_zoo.aggregation import study_probability
from model_zoo.card import ModelCard, ModelError, resolve_model
from model_zoo.contract import iter_input_batches
from model_zoo.dataset import DEFAULT_CACHE, PreparedStudy, SplitSpec, iter_split, split_specs
from model_zoo.litert import LiteRTError
from model_zoo.metrics import study_report

log = logging.getLogger("model_zoo.evaluate")
SlicePredictor = Callable[[np.ndarray], np.ndarray]  # (N, H, W, C) -> (N,) probabilities


def tflite_predictor(card: ModelCard, variant: str | None, threads: int = 2) -> tuple[str, SlicePredictor]:
    from model_zoo.litert import TFLiteModel

    key, v = card.variant(variant)
    model = TFLiteModel(card.verify(v.file), threads=threads)
    return key, lambda x: model.predict(x)[0]


def keras_predictor(card: ModelCard) -> SlicePredictor:
    import os

    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tf_keras

    from model_zoo.architectures import custom_objects, inference

    model = tf_keras.models.load_model(str(card.verify(card.keras_file)), custom_objects=custom_objects(), compile=False)
    run = inference(model)
    return lambda x: run(x)[0][:, 0]


def predictor(card: ModelCard, variant: str | None, threads: int = 2) -> tuple[str, SlicePredictor]:
    """(variant name, slice predictor): a TFLite variant through LiteRT (None: the card's default), or 'keras'."""
    if variant == "keras":
        return "keras", keras_predictor(card)
    return tflite_predictor(card, variant, threads)


def add_scoring_arguments(parser: argparse.ArgumentParser, models: str = "the model") -> None:
    """The options of the commands that score phantom studies: --variant, --threads, --cache."""
    parser.add_argument("--variant", default=None, help=f"TFLite variant of {models} to run with LiteRT (default: "
                                                        "the card's default); 'keras' runs the float Keras model")
    parser.add_argument("--threads", type=int, default=2, help="LiteRT threads (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="prepared-study cache (default: %(default)s)")


def study_probability_of(study: PreparedStudy, card: ModelCard, predict: SlicePredictor,
                         batch_size: int = 16) -> float:
    """The card's aggregation of the study's analysed-slice probabilities, as the app computes it."""
    slice_probs = np.concatenate([predict(x) for _, x in iter_input_batches(
        study.resampled_hu, study.z_mm, card.contract, batch_size)])
    return study_probability(slice_probs, card.aggregation.method, card.aggregation.k)


def parse_splits(text: str, card: ModelCard) -> list[SplitSpec]:
    known = split_specs(card.training["config"]) if "config" in card.training else {}
    specs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" in item:
            name, rest = item.split("=", 1)
            parts = rest.split(":")
            try:
                if not 2 <= len(parts) <= 4 or len(parts) == 4 and parts[3] != "external":
                    raise ValueError
                specs.append(SplitSpec(name, int(parts[0]), int(parts[1]), int(parts[2]) if len(parts) > 2 else 48,
                                       len(parts) == 4))
            except ValueError:
                raise ModelError(f"data split {item!r} is not NAME=SEED:N[:K[:external]]") from None
        elif item in known:
            specs.append(known[item])
        else:
            raise ModelError(f"unknown data split {item!r}; known: {', '.join(known) or 'none'} or NAME=SEED:N[:K[:external]]")
    return specs


def _number(value: float | None) -> str:
    """A metric for the table; None where it is undefined (e.g. specificity of a split without negatives)."""
    return "n/a" if value is None else f"{value:.3f}"


def plot_curves(results: dict[str, tuple[list[dict], np.ndarray]], reports: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (truths, probs) in results.items():
        fpr, tpr, _ = roc_curve([int(t["positive"]) for t in truths], probs)
        ax.plot(fpr, tpr, label=f"{name} (AUC {_number(reports[name]['auc']['value'])})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="Study-level ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / "roc.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    for name in results:
        bins = reports[name]["calibration"]["bins"]
        ax.plot([b["mean_probability"] for b in bins], [b["observed_rate"] for b in bins], "o-",
                label=f"{name} (ECE {_number(reports[name]['calibration']['ece'])})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="predicted study probability", ylabel="observed fraction positive", title="Reliability")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out_dir / "reliability.png", dpi=110)
    plt.close(fig)


def format_table(reports: dict) -> str:
    rows = ["| split | studies (pos) | AUC [95% CI] | sensitivity | specificity | ECE |", "|---|---|---|---|---|---|"]
    for name, r in reports.items():
        auc = r["auc"]
        low, high = auc.get("ci95") or (None, None)
        rows.append(f"| {name} | {r['n_studies']} ({r['n_positive']}) | {_number(auc['value'])} "
                    f"[{_number(low)}, {_number(high)}] | {_number(r['sensitivity']['value'])} | "
                    f"{_number(r['specificity']['value'])} | {_number(r['calibration']['ece'])} |")
    for name, r in reports.items():
        sizes = ", ".join(f"{k}: {_number(v['value'])} (n={v['n']})" for k, v in r["sensitivity_by_largest_lesion_mm"].items())
        negs = ", ".join(f"{k}: {_number(v['value'])} (n={v['n']})" for k, v in r["specificity_by_hard_negative"].items())
        rows.append(f"\n{name}: sensitivity by largest lesion: {sizes}\n{name}: specificity by hard negative: {negs}")
    return "\n".join(rows)


def evaluate(card: ModelCard, splits: list[SplitSpec], predict: SlicePredictor,
             cache_root: Path = DEFAULT_CACHE) -> tuple[dict, dict]:
    results, reports = {}, {}
    for split in splits:
        t0 = time.time()
        truths, probs = [], []
        for study in iter_split(split, card.contract, cache_root):
            truths.append(study.truth)
            probs.append(study_probability_of(study, card, predict))
        results[split.name] = (truths, np.asarray(probs))
        try:
            reports[split.name] = study_report(truths, probs, card.threshold)
        except ValueError as exc:  # e.g. a split whose studies are all of one class
            raise ValueError(f"split {split.name!r} cannot be scored: {exc}") from exc
        log.info("%s: %d studies in %.0f s", split.name, len(truths), time.time() - t0)
    return results, reports


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model_zoo.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="registry name, model folder or .tflite file (default: the default model)")
    p.add_argument("--data", default="test,external", help="comma-separated splits (default: %(default)s)")
    add_scoring_arguments(p)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <model>/evaluation)")
    p.add_argument("--update-card", action="store_true", help="store the metrics in the model card (release step)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        card = resolve_model(args.model)
        splits = parse_splits(args.data, card)
        variant, predict = predictor(card, args.variant, args.threads)
        results, reports = evaluate(card, splits, predict, args.cache)
    except (ModelError, LiteRTError, ValueError) as exc:  # as in compare
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out_dir = args.out or card.path_of("evaluation")
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {"model": card.name, "version": card.version, "variant": variant, "splits": reports}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_curves(results, reports, out_dir)
    print(format_table(reports))
    print(f"\nwrote {out_dir / 'metrics.json'}, roc.png, reliability.png")
    if args.update_card:
        card.metrics.update({name: r for name, r in reports.items()})
        card.metrics["evaluated_variant"] = variant
        card.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
