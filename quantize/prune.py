"""Magnitude pruning with tfmot (PolynomialDecay to a target sparsity) and sparsity accounting.

tfmot prunes Conv2D and Dense kernels. It never prunes DepthwiseConv2D (each
filter has only k*k weights), biases or BatchNorm, so the per-layer table says so
instead of hiding them. Pruning buys compressed size (gzip), not speed: XNNPACK
runs the zeros like any other weight on x86.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras  # noqa: E402

from quantize.finetune import fine_tune  # noqa: E402
from quantize.recipe import PruningConfig  # noqa: E402

log = logging.getLogger(__name__)
_sparsity = tfmot.sparsity.keras


@dataclass(frozen=True)
class LayerSparsity:
    layer: str
    kind: str  # Conv2D | Dense | DepthwiseConv2D
    weights: int
    zeros: int
    prunable: bool

    @property
    def sparsity(self) -> float:
        return self.zeros / self.weights if self.weights else 0.0

    def to_json(self) -> dict:
        return {"layer": self.layer, "kind": self.kind, "weights": self.weights, "zeros": self.zeros,
                "sparsity": round(self.sparsity, 4), "prunable": self.prunable}


@dataclass
class PruneResult:
    model: tf_keras.Model  # pruning wrappers stripped: a plain float model with zeros in its kernels
    layers: list[LayerSparsity]
    losses: list[float]

    @property
    def sparsity(self) -> float:
        return prunable_sparsity(self.layers)


def prune(model: tf_keras.Model, dataset: tf.data.Dataset, config: PruningConfig) -> PruneResult:
    """Prune a copy of a float model while it learns to reproduce the original on ``dataset``; the input model is not changed."""

    def wrap(layer):
        found = _kernel(layer)
        target = config.layer_target(found[1].size) if found and found[0] != "DepthwiseConv2D" else None
        if target is None:
            return layer
        schedule = _sparsity.PolynomialDecay(initial_sparsity=config.initial_sparsity, final_sparsity=target,
                                             begin_step=config.begin_step, end_step=config.end_step,
                                             frequency=config.frequency)
        return _sparsity.prune_low_magnitude(layer, pruning_schedule=schedule)

    # prune_low_magnitude wraps the layers it is given, so training would change the
    # caller's float model: prune a copy.
    copy = tf_keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    wrapped = tf_keras.models.clone_model(copy, clone_function=wrap)
    losses = fine_tune(wrapped, model, dataset, config.steps, config.learning_rate, "pruning",
                       callbacks=(_sparsity.UpdatePruningStep(),))
    stripped = _sparsity.strip_pruning(wrapped)
    layers = layer_sparsity(stripped)
    log.info("pruned to %.1f%% of prunable weights (%s)", 100 * prunable_sparsity(layers),
             f"size tiers {list(config.size_tiers)}" if config.size_tiers else f"target {100 * config.target_sparsity:.0f}%")
    return PruneResult(stripped, layers, losses)


_KERNELS = (  # checked in order: DepthwiseConv2D is a Conv2D subclass
    (tf_keras.layers.DepthwiseConv2D, "DepthwiseConv2D", "depthwise_kernel"),
    (tf_keras.layers.Conv2D, "Conv2D", "kernel"),
    (tf_keras.layers.Dense, "Dense", "kernel"),
)


def _kernel(layer) -> tuple[str, np.ndarray] | None:
    # QAT wrappers keep the original layer inside, but swap its kernel attribute for the
    # fake-quantized tensor while tracing: read the variable from the weights instead.
    inner = getattr(layer, "layer", layer)
    for cls, kind, attr in _KERNELS:
        if isinstance(inner, cls):
            variable = next(w for w in layer.weights if w.name.split("/")[-1].startswith(f"{attr}:"))
            return kind, variable.numpy()
    return None


def layer_sparsity(model: tf_keras.Model) -> list[LayerSparsity]:
    """Zeros per weight kernel of a float, stripped-pruned, QAT or PQAT model."""
    rows = []
    for layer in model.layers:
        found = _kernel(layer)
        if found is None:
            continue
        kind, kernel = found
        rows.append(LayerSparsity(getattr(layer, "layer", layer).name, kind, int(kernel.size),
                                  int(np.count_nonzero(kernel == 0)), kind != "DepthwiseConv2D"))
    return rows


def prunable_sparsity(rows: list[LayerSparsity]) -> float:
    """Fraction of zeros among the weights tfmot can prune (Conv2D and Dense kernels)."""
    total = sum(r.weights for r in rows if r.prunable)
    return sum(r.zeros for r in rows if r.prunable) / total if total else 0.0
