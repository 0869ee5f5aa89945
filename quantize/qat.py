"""Quantization-aware training: plain QAT and pruning-preserving QAT (PQAT) with tfmot.

tfmot's default 8-bit registry does not know our weightless custom layers
(``HardSwish``, ``HardSigmoid``) nor ``Multiply`` (squeeze-excite), so ``quantize_model``
alone refuses MobileNetV3. ``quantize_aware`` annotates those layers with
``OutputOnlyQuantizeConfig`` (quantize the output, nothing else; the int8 kernels
in TFLite do the same) and every other layer with the default, then applies
the 8-bit scheme, or the prune-preserving scheme so zeros stay zeros.
"""

from __future__ import annotations

import contextlib
import logging
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras  # noqa: E402

# Not public API: the op behind tfmot's moving-average quantizers, whose EMA decay is fixed (see
# calibrate_activation_ranges); tfmot is pinned in requirements.txt.
from tensorflow_model_optimization.python.core.quantization.keras import quant_ops  # noqa: E402

from model_zoo.architectures import HardSigmoid, HardSwish, custom_objects  # noqa: E402
from model_zoo.card import ModelError  # noqa: E402
from quantize.finetune import run_as_at_inference  # noqa: E402

log = logging.getLogger(__name__)

_quant = tfmot.quantization.keras


class OutputOnlyQuantizeConfig(_quant.QuantizeConfig):
    """Quantize a weightless layer's output with an 8-bit moving-average range."""

    def get_weights_and_quantizers(self, layer):
        return []

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        pass

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return [_quant.quantizers.MovingAverageQuantizer(num_bits=8, per_axis=False, symmetric=False, narrow_range=False)]

    def get_config(self):
        return {}


# Layers the default 8-bit registry lacks; all are weightless, so output quantization is all they need.
OUTPUT_QUANTIZED_LAYERS = (HardSwish, HardSigmoid, tf_keras.layers.Multiply)


def quantize_scope() -> contextlib.AbstractContextManager:
    """Scope in which QAT / PQAT models (and our custom layers) can be cloned, saved and loaded."""
    return _quant.quantize_scope({**custom_objects(), "OutputOnlyQuantizeConfig": OutputOnlyQuantizeConfig})


def annotate(model: tf_keras.Model) -> tf_keras.Model:
    """Mark every layer for quantization, our custom ones with ``OutputOnlyQuantizeConfig``."""

    def annotate_layer(layer):
        if isinstance(layer, tf_keras.Model):
            raise ModelError(f"layer {layer.name!r} is a nested model; QAT needs a flat model (see model_zoo.architectures)")
        if isinstance(layer, OUTPUT_QUANTIZED_LAYERS):
            return _quant.quantize_annotate_layer(layer, OutputOnlyQuantizeConfig())
        return _quant.quantize_annotate_layer(layer)

    with quantize_scope():
        return tf_keras.models.clone_model(model, clone_function=annotate_layer)


def quantize_aware(model: tf_keras.Model, preserve_sparsity: bool = False) -> tf_keras.Model:
    """A QAT copy of a float model (weights copied); PQAT with ``preserve_sparsity``.

    For PQAT pass a pruned model after ``strip_pruning``: the scheme keeps each
    kernel's zero mask fixed while the remaining weights train.
    """
    annotated = annotate(model)  # wraps the original layers: weights are shared, then copied by quantize_apply
    scheme = (
        _quant.collab_opts.Default8BitPrunePreserveQuantizeScheme()
        if preserve_sparsity
        else _quant.default_8bit.Default8BitQuantizeScheme()
    )
    with quantize_scope():
        return _quant.quantize_apply(annotated, scheme)


@contextlib.contextmanager
def _range_ema_decay(decay: float):
    """Within the block, tfmot's moving-average quantizers use ``decay`` instead of their fixed 0.999."""
    original = quant_ops.MovingAvgQuantize

    def moving_avg_quantize(*args, **kwargs):
        return original(*args, **{**kwargs, "ema_decay": decay})

    quant_ops.MovingAvgQuantize = moving_avg_quantize
    try:
        yield
    finally:
        quant_ops.MovingAvgQuantize = original


def calibrate_activation_ranges(model: tf_keras.Model, dataset: tf.data.Dataset, batches: int,
                                decay: float = 0.9) -> None:
    """Move a fresh QAT model's activation ranges to what it sees on ``batches`` batches of ``dataset``.

    tfmot starts every activation range at [-6, 6] and moves it 0.1% per training step, so
    after a few hundred fine-tuning steps the ranges are still mostly [-6, 6]: cam logits
    clipped at 6 (every strong slice tied), wider activations clipped. Forward passes in
    training mode with a fast moving average (eager, so the patched op is the one run)
    calibrate them first; weights do not change. BatchNorm and dropout are set to their
    inference behaviour first (``run_as_at_inference``), so the ranges are those of the
    function the app runs.
    """
    run_as_at_inference(model)
    with _range_ema_decay(decay):
        for image, _targets in dataset.take(batches):
            model(image, training=True)
