"""Measure TFLite variants the way the app runs them: LiteRT (``model_zoo.litert``), never Keras.

Accuracy on held-out studies (study-level AUC, sensitivity/specificity at the card's
threshold), agreement with the float32 file (slice and study probabilities, decision
flips at the threshold), file size (raw and gzip), zeros in the stored conv
weights, latency per slice with XNNPACK, and peak memory in a fresh process.
numpy + LiteRT only: no TensorFlow here.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_zoo.aggregation import study_probability
from model_zoo.card import Aggregation
from model_zoo.contract import InputContract
from model_zoo.dataset import PreparedStudy, study_inputs
from model_zoo.litert import TFLiteModel
from model_zoo.metrics import auc_with_ci, sensitivity_specificity

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent
EVAL_BATCH = 16  # slices per call when scoring accuracy (outputs do not depend on it)


@dataclass
class Predictions:
    slice_probs: np.ndarray  # every evaluation slice, study after study
    study_probs: np.ndarray  # one per study, aggregated as the card says


def predict_studies(
    paths: dict[str, Path],
    studies: Sequence[PreparedStudy],
    contract: InputContract,
    aggregation: Aggregation,
    threads: int = 2,
) -> dict[str, Predictions]:
    """Slice and study probabilities of every variant on the same studies (inputs built once per study)."""
    models = {name: TFLiteModel(path, threads=threads) for name, path in paths.items()}
    slices: dict[str, list[np.ndarray]] = {name: [] for name in paths}
    per_study: dict[str, list[float]] = {name: [] for name in paths}
    for i, study in enumerate(studies):
        x = study_inputs(study, contract)
        for name, model in models.items():
            p = np.concatenate([model.predict(x[j:j + EVAL_BATCH])[0] for j in range(0, len(x), EVAL_BATCH)])
            slices[name].append(p)
            per_study[name].append(study_probability(p, aggregation.method, aggregation.k))
        if (i + 1) % 20 == 0:
            log.info("evaluated %d/%d studies", i + 1, len(studies))
    return {n: Predictions(np.concatenate(slices[n]), np.asarray(per_study[n])) for n in paths}


def accuracy(labels: Sequence[int], study_probs: np.ndarray, threshold: float, seed: int = 0) -> dict:
    """Study-level AUC (bootstrap 95% CI) and sensitivity/specificity at ``threshold``."""
    y = np.asarray(labels, dtype=int)
    out: dict = {"auc": None, "auc_ci95": None}
    if len(np.unique(y)) == 2:
        auc = auc_with_ci(y, study_probs, n_boot=1000, seed=seed)
        out = {"auc": round(auc.value, 4), "auc_ci95": [round(auc.low, 4), round(auc.high, 4)]}
    sens, spec = sensitivity_specificity(y, study_probs, threshold)
    return {**out, "sensitivity": _rounded(sens.value), "specificity": _rounded(spec.value)}


def _rounded(v: float) -> float | None:
    return None if np.isnan(v) else round(float(v), 4)


def agreement(pred: Predictions, ref: Predictions, threshold: float) -> dict:
    """How far a variant is from the float32 file: |dp| and decisions that flip at the threshold."""
    dp = np.abs(pred.slice_probs - ref.slice_probs)
    study_dp = np.abs(pred.study_probs - ref.study_probs)
    return {
        "max_abs_dp": round(float(dp.max()), 5),
        "mean_abs_dp": round(float(dp.mean()), 5),
        "study_max_abs_dp": round(float(study_dp.max()), 5),
        "study_flips": int(np.sum((pred.study_probs >= threshold) != (ref.study_probs >= threshold))),
        "slice_flips": int(np.sum((pred.slice_probs >= threshold) != (ref.slice_probs >= threshold))),
        "slices": int(len(dp)),
    }


def file_sizes(path: Path) -> dict:
    data = Path(path).read_bytes()
    return {"bytes": len(data), "gzip_bytes": len(gzip.compress(data, compresslevel=9, mtime=0))}


def stored_conv_sparsity(path: Path) -> float | None:
    """Fraction of exact zeros in the CONV_2D / FULLY_CONNECTED weights stored in a TFLite file.

    Depthwise kernels are left out, as tfmot leaves them unpruned. float16 weights
    sit behind a DEQUANTIZE op and are followed to their stored tensor; weights in
    sparse storage are read after one inference has run their DENSIFY op. Returns
    None when this LiteRT build lacks the op listing (a private API).
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    ops_details = getattr(interp, "_get_ops_details", None)
    if ops_details is None:
        return None
    interp.allocate_tensors()
    ops = ops_details()
    if any(op["op_name"] == "DENSIFY" for op in ops):
        image = interp.get_input_details()[0]
        interp.set_tensor(image["index"], np.zeros(image["shape"], image["dtype"]))
        interp.invoke()
    dequantized_from = {op["outputs"][0]: op["inputs"][0] for op in ops if op["op_name"] == "DEQUANTIZE"}
    zeros = total = 0
    for op in ops:
        if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED"):
            index = op["inputs"][1]
            weights = interp.get_tensor(dequantized_from.get(index, index))
            zeros += int(np.count_nonzero(weights == 0))
            total += int(weights.size)
    return zeros / total if total else None


def latencies_ms_per_slice(paths: dict[str, Path], sample: np.ndarray, threads: int, warmup: int,
                           runs: int) -> dict[str, float]:
    """Per-slice median latency of several files, timed round-robin (one call of each in turn).

    Interleaving spreads the machine's other load over every variant alike, so their
    ratios stay meaningful on a busy machine even when the absolute times drift.
    """
    models = {name: TFLiteModel(path, threads=threads) for name, path in paths.items()}
    for model in models.values():
        for _ in range(warmup):
            model.predict(sample)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(runs):
        for name, model in models.items():
            t0 = time.perf_counter()
            model.predict(sample)
            times[name].append(time.perf_counter() - t0)
    return {name: 1000.0 * statistics.median(t) / len(sample) for name, t in times.items()}


def peak_memory_mb(path: Path, threads: int, batch: int) -> dict:
    """Peak resident memory of a fresh process that loads the file and runs one batch (see memory_probe)."""
    cmd = [sys.executable, "-m", "quantize.memory_probe", str(path), "--threads", str(threads), "--batch", str(batch)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    if done.returncode != 0:
        log.warning("memory probe failed for %s: %s", Path(path).name, done.stderr.strip()[-300:])
        return {}
    return json.loads(done.stdout.strip().splitlines()[-1])
