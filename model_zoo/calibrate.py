"""Calibrate a trained model's probabilities on its calibration split, inside its weights.

    python -m model_zoo.calibrate --model NAME_OR_PATH [--cache DIR]

A detector scored by its most suspicious slices is over-confident: every study has some
bone that looks a little like a lesion, so the top slices of negative studies score
high too (model 1.2.0 before calibration: test ECE 0.39, most negative studies above
0.8). Platt scaling of the slice logits fixes the scale: every slice logit z becomes
``slope * z + intercept``, fitted so that the study probability (the card's aggregation
of the slice probabilities) has the least log-loss on the calibration split: the training
config's ``data.calibration``, else its validation split. The order of
the slices is kept; the order of the studies too with ``max`` aggregation, and nearly
with ``top_k_mean`` (a mean of sigmoids can change order when the slope changes;
model 1.2.0's validation AUC went 0.7906 -> 0.7901).

The map goes into the weights, not into the app: the slice logit is the maximum of the
cam, and an increasing affine map commutes with the maximum, so folding it into the 1x1
``cam`` convolution (kernel * slope, bias * slope + intercept) maps the slice
probabilities, the cam and the study probability at once. One threshold keeps serving
slices (findings) and studies, and every TFLite variant made from the model inherits it.
The fit targets study labels, so it is the study probability that is calibrated; slice
probabilities share its scale.

Writes the calibrated ``model.keras`` into the model folder, chooses the threshold again
on the same split (same rule as training), records the map and the validation ECE before and
after in ``card.training["calibration"]``, and drops the card's TFLite variants, which
were made from the old weights: run ``python -m quantize`` and ``python -m
model_zoo.evaluate --update-card`` next. ``model_zoo.train`` calibrates every model it saves.

Exit codes: 0 done, 2 model or data problem.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402
import tf_keras  # noqa: E402
from scipy.optimize import minimize  # noqa: E402
from scipy.special import expit  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from model_zoo.aggregation import study_probability  # noqa: E402
from model_zoo.architectures import CAM, custom_objects, inference  # noqa: E402
from model_zoo.card import Aggregation, ModelCard, ModelError, resolve_model  # noqa: E402
from model_zoo.contract import InputContract  # noqa: E402
from model_zoo.dataset import (  # noqa: E402
    DEFAULT_CACHE,
    PreparedStudy,
    SplitSpec,
    load_scoring_split,
    split_specs,
    study_inputs,
)
from model_zoo.metrics import calibration, threshold_for_sensitivity  # noqa: E402

log = logging.getLogger("model_zoo.calibrate")


@dataclass(frozen=True)
class LogitMap:
    """z -> slope * z + intercept on every cam logit; slope > 0 keeps the ranking."""

    slope: float
    intercept: float

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        return self.slope * np.asarray(logits, dtype=np.float64) + self.intercept


def slice_outputs(model: tf_keras.Model, studies: Sequence[PreparedStudy], contract: InputContract,
                  batch_size: int = 32) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per study, the probabilities (the model's float32 output, as the app gets it) and the
    logits (cam maximum, for the fit: no sigmoid saturation) of the slices the model analyses."""
    probabilities, logits = [], []
    run = inference(model, batch_size)
    for study in studies:
        probability, cam = run(study_inputs(study, contract))
        probabilities.append(probability[:, 0])
        logits.append(cam.reshape(len(cam), -1).max(axis=1).astype(np.float64))
    return probabilities, logits


def aggregated(slice_probabilities: Sequence[np.ndarray], aggregation: Aggregation) -> np.ndarray:
    """One study probability per study, as the app aggregates its slice probabilities."""
    return np.array([study_probability(p, aggregation.method, aggregation.k) for p in slice_probabilities])


def study_probabilities(logits: Sequence[np.ndarray], aggregation: Aggregation,
                        logit_map: LogitMap | None = None) -> np.ndarray:
    """Study probabilities from slice logits, as the app aggregates them (after ``logit_map``)."""
    mapped = logit_map or LogitMap(1.0, 0.0)
    return aggregated([expit(mapped(z)) for z in logits], aggregation)


# Search box: the slope on a log scale (so it stays positive), the intercept in logits.
_LOG_SLOPE_BOUNDS = (np.log(0.02), np.log(50.0))
_INTERCEPT_BOUNDS = (-30.0, 30.0)


def fit_logit_map(logits: Sequence[np.ndarray], labels: Sequence[int], aggregation: Aggregation) -> LogitMap:
    """The map with the least study-level log-loss on (``logits``, ``labels``).

    With Platt's targets, (n+ + 1) / (n+ + 2) for positives and 1 / (n- + 2) for negatives
    instead of 1 and 0: on a few or perfectly separated studies the plain fit runs off to an
    infinite slope (measured: 1.5e6 on 4 validation studies), these keep it finite.
    """
    y = np.asarray(labels, dtype=int)
    n_pos, n_neg = int(np.sum(y == 1)), int(np.sum(y == 0))
    if not n_pos or not n_neg or n_pos + n_neg != len(y):
        raise ValueError("calibration needs positive and negative studies (labels 0 and 1)")
    target = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

    def log_loss(params: np.ndarray) -> float:
        p = np.clip(study_probabilities(logits, aggregation, LogitMap(float(np.exp(params[0])), float(params[1]))),
                    1e-12, 1 - 1e-12)
        return float(-np.mean(target * np.log(p) + (1 - target) * np.log1p(-p)))

    # Two parameters and a cheap objective: a derivative-free search is exact enough and
    # robust to the kinks of a top-k aggregation. It starts at the identity map.
    fit = minimize(log_loss, x0=np.zeros(2), method="Nelder-Mead", bounds=[_LOG_SLOPE_BOUNDS, _INTERCEPT_BOUNDS],
                   options={"xatol": 1e-4, "fatol": 1e-8, "initial_simplex": [[0.0, 0.0], [0.5, 0.0], [0.0, 1.0]]})
    at_bound = any(np.isclose(v, bound).any() for v, bound in zip(fit.x, (_LOG_SLOPE_BOUNDS, _INTERCEPT_BOUNDS),
                                                                   strict=True))
    if not fit.success or at_bound:
        log.warning("calibration fit %s (slope %.4g, intercept %.4g): check the validation split",
                    "stopped at the edge of its search range" if at_bound else f"did not converge: {fit.message}",
                    np.exp(fit.x[0]), fit.x[1])
    return LogitMap(slope=float(np.exp(fit.x[0])), intercept=float(fit.x[1]))


def fold_into_cam(model: tf_keras.Model, logit_map: LogitMap) -> None:
    """Apply ``logit_map`` to the model's cam logits by rescaling the 1x1 cam convolution in place."""
    layer = model.get_layer(CAM)
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel * np.float32(logit_map.slope),
                       (bias * logit_map.slope + logit_map.intercept).astype(bias.dtype)])


def calibration_split(config: dict) -> SplitSpec:
    """The split the map and the threshold are fitted on: the config's ``data.calibration``, else ``val``.

    The threshold is a tail quantile of the positive validation studies (the highest with
    sensitivity >= 0.95: the 8th-lowest of 160 positives), so it needs more studies than
    epoch-by-epoch model selection does. Model 1.7.0's threshold from its 160 validation
    studies gave 0.914 test sensitivity; from 480 studies of the same seed, 0.959.
    """
    name = "calibration" if "calibration" in config["data"] else "val"
    return split_specs(config, [name])[name]


def calibration_name(split: SplitSpec) -> str:
    """How the card names the split: 'validation', or e.g. 'calibration (seed 2000)'."""
    return "validation" if split.name == "val" else f"{split.name} (seed {split.seed})"


def calibrate(model: tf_keras.Model, studies: Sequence[PreparedStudy], contract: InputContract,
              aggregation: Aggregation, min_sensitivity: float, split_name: str) -> dict:
    """Fit the map on ``studies`` (split ``split_name``), fold it into ``model`` and choose the threshold again.

    Returns the card's record: the map, the ECE on ``studies`` before and after, the new
    threshold and the AUC of the calibrated model there.
    """
    labels = [int(s.positive) for s in studies]
    probabilities, logits = slice_outputs(model, studies, contract)
    before = aggregated(probabilities, aggregation)
    logit_map = fit_logit_map(logits, labels, aggregation)
    fold_into_cam(model, logit_map)
    # The threshold from the folded model's own float32 outputs, as the app will compute them.
    after = aggregated(slice_outputs(model, studies, contract)[0], aggregation)
    record = {
        **asdict(logit_map),
        "fitted_on": f"{split_name} split, {len(labels)} studies",
        "val_ece_before": round(calibration(labels, before)["ece"], 4),
        "val_ece_after": round(calibration(labels, after)["ece"], 4),
        "threshold": threshold_for_sensitivity(labels, after, min_sensitivity),
        "val_auc": round(float(roc_auc_score(labels, after)), 4),
    }
    log.info("calibrated: slope %.4f, intercept %.4f; validation ECE %.3f -> %.3f; threshold %.4f", logit_map.slope,
             logit_map.intercept, record["val_ece_before"], record["val_ece_after"], record["threshold"])
    return record


def calibrate_card(card: ModelCard, cache_root: Path = DEFAULT_CACHE) -> ModelCard:
    """Calibrate a saved model in its folder; the card's TFLite variants are dropped (made from old weights)."""
    if "calibration" in card.training:
        raise ModelError(f"model {card.name!r} is already calibrated ({card.training['calibration']['fitted_on']})")
    cfg = card.training.get("config")
    if not cfg:
        raise ModelError(f"model {card.name!r} has no training config, so its validation split is unknown")
    model = tf_keras.models.load_model(str(card.verify(card.keras_file)), custom_objects=custom_objects(),
                                       compile=False)
    split = calibration_split(cfg)
    record = calibrate(model, load_scoring_split(split, card.contract, cache_root), card.contract,
                       card.aggregation, float(cfg.get("threshold_min_sensitivity", 0.95)), calibration_name(split))
    card.threshold = record["threshold"]
    card.training["calibration"] = record
    # Test and external metrics belong to the old weights: python -m model_zoo.evaluate --update-card renews them.
    card.metrics = {"validation": {**card.metrics.get("validation", {}), "auc": record["val_auc"]}}
    for variant in card.variants.values():
        card.files.pop(variant.file, None)
    card.variants, card.default_variant_reason = {}, ""
    # The new weights replace the old file in one step, right before the card that hashes them.
    keras_path = card.path_of(card.keras_file)
    partial = keras_path.with_name(f"calibrating.{keras_path.name}")
    model.save(str(partial))
    os.replace(partial, keras_path)
    card.record_hashes()
    card.save()
    return card


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model_zoo.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="registry name or model folder (its float Keras model is rewritten)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="prepared-study cache (default: %(default)s)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        card = calibrate_card(resolve_model(args.model), args.cache)
    except (ModelError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:
        print(f"error: the model's training config has no {exc} entry, so its validation split is unknown",
              file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.filename or 'a model or cache file'}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"calibrated {card.folder}: threshold {card.threshold:.4f}; now run python -m quantize --model {card.folder} "
          f"--recipe RECIPE and python -m model_zoo.evaluate --model {card.folder} --update-card")
    return 0


if __name__ == "__main__":
    sys.exit(main())
