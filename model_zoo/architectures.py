"""MobileNet 2.5D slice classifiers with a class-activation-map head.

Keras-applications style: one builder per architecture, a registry by name
(``ARCHITECTURES``) and ``build_model`` as the one entry point. Every model is

* flat: one functional graph, no model nested in a model (tfmot QAT refuses those);
* made of layers tfmot can wrap: stock Keras layers plus the serialisable
  ``HardSwish`` / ``HardSigmoid`` layers below (a ``tf.nn`` call in a functional
  model becomes a TFOpLambda, which neither pruning nor QAT accept);
* mixed-precision safe: the head computes in float32.

Head, identical for all architectures::

    last feature map -> Dropout -> Conv2D(1, 1x1, "cam") -> GlobalMaxPooling2D -> sigmoid "probability"

The 1x1 convolution is the classifier's dense layer applied to every 32x32-pixel
cell, so ``cam`` is the class activation map (logits at stride 32) and the slice
logit is its maximum. Max rather than average pooling: a lytic lesion fills one
or two of the 80 cells of a slice, and an average dilutes it with the image size,
so a network trained on crops would not transfer to whole slices; the maximum is
the same on a crop and on the whole slice, and each cell is trained directly on
the lesion mask (``model_zoo.train``).
Outputs, in order: ``[probability (N, 1), cam (N, H/32, W/32, 1)]``; input ``image``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
from tf_keras import layers  # noqa: E402

from model_zoo.litert import INPUT_NAME, OUTPUTS  # noqa: E402

PROBABILITY, CAM = OUTPUTS
OUTPUT_STRIDE = 32
# BatchNorm moving-average momentum. Keras applications use 0.999 and Keras defaults to
# 0.99; with either, a deep MobileNet's inference-mode output stays collapsed (constant,
# AUC 0.5) for the first several hundred steps, because small errors in the not yet
# converged moving statistics compound over ~50 BatchNorm layers (measured: 250 steps,
# train AUC 0.996, validation AUC 0.50 at 0.99 and 0.995 at 0.9). Our runs are a few
# thousand steps at most, so 0.9 (PyTorch's default).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-3
DEFAULT_PRIOR = 0.02  # lesion prevalence per cam cell, where the cam bias starts


# --- custom layers --------------------------------------------------------------


@tf_keras.utils.register_keras_serializable(package="model_zoo")
class HardSigmoid(layers.Layer):
    """``relu6(x + 3) / 6``, the piecewise-linear sigmoid of MobileNetV3 (squeeze-excite gates).

    A real layer, not a lambda, so tfmot can wrap it and a saved model reloads by name.
    """

    def call(self, inputs):
        return tf.nn.relu6(inputs + 3.0) * (1.0 / 6.0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_prunable_weights(self):
        """tfmot pruning hook: the layer has no weights."""
        return []


@tf_keras.utils.register_keras_serializable(package="model_zoo")
class HardSwish(layers.Layer):
    """``x * relu6(x + 3) / 6``, the MobileNetV3 activation; TFLite fuses it to HARD_SWISH."""

    def call(self, inputs):
        return inputs * (tf.nn.relu6(inputs + 3.0) * (1.0 / 6.0))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_prunable_weights(self):
        """tfmot pruning hook: the layer has no weights."""
        return []


def custom_objects() -> dict:
    """Everything ``tf_keras.models.load_model`` needs for a model built here."""
    return {"HardSwish": HardSwish, "HardSigmoid": HardSigmoid}


# --- building blocks ------------------------------------------------------------


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor`` without dropping more than 10% (MobileNet rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _activation(kind: str, name: str) -> layers.Layer:
    if kind == "relu6":
        return layers.ReLU(6.0, name=name)
    if kind == "relu":
        return layers.ReLU(name=name)
    if kind == "hswish":
        return HardSwish(name=name)
    raise ValueError(f"unknown activation {kind!r}")


def _batch_norm(name: str) -> layers.Layer:
    return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)


def _conv_bn(x, filters: int, kernel: int, stride: int, activation: str | None, name: str):
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=name)(x)
    x = _batch_norm(f"{name}_bn")(x)
    return _activation(activation, f"{name}_{activation}")(x) if activation else x


def _squeeze_excite(x, squeezed: int, name: str):
    channels = x.shape[-1]
    s = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_squeeze")(x)
    # ReLU fused into the conv: a Conv2D -> ReLU layer pair makes tfmot QAT skip the conv's
    # weights (its LayerReLUQuantize transform), which also loses PQAT's sparsity mask.
    s = layers.Conv2D(squeezed, 1, activation="relu", name=f"{name}_reduce")(s)
    s = layers.Conv2D(channels, 1, name=f"{name}_expand")(s)
    s = HardSigmoid(name=f"{name}_gate")(s)
    return layers.Multiply(name=f"{name}_excite")([x, s])


def _inverted_residual(x, expanded: int, filters: int, kernel: int, stride: int, activation: str, se_ratio: float, name: str):
    """MobileNetV2/V3 block: 1x1 expand -> depthwise -> (squeeze-excite) -> linear 1x1 project (+ skip)."""
    shortcut = x
    in_channels = x.shape[-1]
    if expanded != in_channels:
        x = _conv_bn(x, expanded, 1, 1, activation, f"{name}_expand")
    x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_depthwise")(x)
    x = _batch_norm(f"{name}_depthwise_bn")(x)
    x = _activation(activation, f"{name}_depthwise_{activation}")(x)
    if se_ratio:
        x = _squeeze_excite(x, _make_divisible(expanded * se_ratio), f"{name}_se")
    x = _conv_bn(x, filters, 1, 1, None, f"{name}_project")
    if stride == 1 and in_channels == filters:
        x = layers.Add(name=f"{name}_add")([shortcut, x])
    return x


# --- backbones: image tensor -> last feature map (stride 32) ---------------------

# MobileNetV2 (Sandler et al. 2018), table 2: (expansion t, channels c, repeats n, stride s).
_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

# MobileNetV3 (Howard et al. 2019), tables 1 and 2 as in Keras applications:
# (expansion, channels, kernel, stride, squeeze-excite, activation).
_V3_SMALL = (
    (1, 16, 3, 2, True, "relu"),
    (72 / 16, 24, 3, 2, False, "relu"),
    (88 / 24, 24, 3, 1, False, "relu"),
    (4, 40, 5, 2, True, "hswish"),
    (6, 40, 5, 1, True, "hswish"),
    (6, 40, 5, 1, True, "hswish"),
    (3, 48, 5, 1, True, "hswish"),
    (3, 48, 5, 1, True, "hswish"),
    (6, 96, 5, 2, True, "hswish"),
    (6, 96, 5, 1, True, "hswish"),
    (6, 96, 5, 1, True, "hswish"),
)
_V3_LARGE = (
    (1, 16, 3, 1, False, "relu"),
    (4, 24, 3, 2, False, "relu"),
    (3, 24, 3, 1, False, "relu"),
    (3, 40, 5, 2, True, "relu"),
    (3, 40, 5, 1, True, "relu"),
    (3, 40, 5, 1, True, "relu"),
    (6, 80, 3, 2, False, "hswish"),
    (2.5, 80, 3, 1, False, "hswish"),
    (2.3, 80, 3, 1, False, "hswish"),
    (2.3, 80, 3, 1, False, "hswish"),
    (6, 112, 3, 1, True, "hswish"),
    (6, 112, 3, 1, True, "hswish"),
    (6, 160, 5, 2, True, "hswish"),
    (6, 160, 5, 1, True, "hswish"),
    (6, 160, 5, 1, True, "hswish"),
)
_V3_SE_RATIO = 0.25


def _mobilenet_v2_features(image, alpha: float):
    x = _conv_bn(image, _make_divisible(32 * alpha), 3, 2, "relu6", "stem")
    block = 0
    for expansion, channels, repeats, stride in _V2_STAGES:
        filters = _make_divisible(channels * alpha)
        for i in range(repeats):
            x = _inverted_residual(
                x, x.shape[-1] * expansion, filters, 3, stride if i == 0 else 1, "relu6", 0.0, f"block{block}"
            )
            block += 1
    last = _make_divisible(1280 * alpha) if alpha > 1.0 else 1280
    return _conv_bn(x, last, 1, 1, "relu6", "head_conv")


def _mobilenet_v3_features(image, alpha: float, stages):
    x = _conv_bn(image, 16, 3, 2, "hswish", "stem")
    for block, (expansion, channels, kernel, stride, se, activation) in enumerate(stages):
        expanded = _make_divisible(x.shape[-1] * expansion)
        se_ratio = _V3_SE_RATIO if se else 0.0
        x = _inverted_residual(
            x, expanded, _make_divisible(channels * alpha), kernel, stride, activation, se_ratio, f"block{block}"
        )
    return _conv_bn(x, _make_divisible(x.shape[-1] * 6), 1, 1, "hswish", "head_conv")


# --- head and builders ----------------------------------------------------------


def _validate(input_shape, alpha: float, dropout: float) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape!r}")
    height, width, channels = (int(v) for v in input_shape)
    if height < OUTPUT_STRIDE or width < OUTPUT_STRIDE or height % OUTPUT_STRIDE or width % OUTPUT_STRIDE:
        raise ValueError(f"input height and width must be positive multiples of {OUTPUT_STRIDE}, got {height}x{width}")
    if channels < 1:
        raise ValueError(f"input needs at least one channel, got {channels}")
    if alpha <= 0:
        raise ValueError(f"alpha (width multiplier) must be positive, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return height, width, channels


def _load_weights(model: tf_keras.Model, weights: str | Path) -> None:
    """Load local weights; HDF5 by layer name so a partly matching model (other channels) still loads."""
    path = Path(weights)
    is_checkpoint = Path(f"{path}.index").is_file()
    if not path.is_file() and not is_checkpoint:
        raise FileNotFoundError(f"weights file {path} not found (weights are never downloaded: pass a local file or None)")
    if path.suffix in (".h5", ".hdf5"):
        model.load_weights(str(path), by_name=True, skip_mismatch=True)
    else:
        model.load_weights(str(path))


def cam_classifier(image, features, dropout: float = 0.2, prior: float = DEFAULT_PRIOR, name: str | None = None) -> tf_keras.Model:
    """Attach the CAM head to a backbone's last feature map: a flat model ``image -> [probability, cam]``."""
    if not 0.0 < prior < 1.0:
        raise ValueError(f"prior must be a probability in (0, 1), got {prior}")
    x = layers.Dropout(dropout, name="head_dropout")(features)
    cam = layers.Conv2D(
        1,
        1,
        name=CAM,
        dtype="float32",
        bias_initializer=tf_keras.initializers.Constant(math.log(prior / (1.0 - prior))),
    )(x)
    pooled = layers.GlobalMaxPooling2D(name="cam_pool", dtype="float32")(cam)
    probability = layers.Activation("sigmoid", name=PROBABILITY, dtype="float32")(pooled)
    return tf_keras.Model(image, [probability, cam], name=name)


def _assemble(
    features_fn: Callable,
    default_name: str,
    input_shape,
    alpha: float,
    dropout: float,
    weights: str | Path | None,
    name: str | None,
    prior: float,
) -> tf_keras.Model:
    shape = _validate(input_shape, alpha, dropout)
    image = layers.Input(shape=shape, name=INPUT_NAME)
    model = cam_classifier(image, features_fn(image, alpha), dropout, prior, name or f"{default_name}_{alpha:g}")
    if weights is not None:
        _load_weights(model, weights)
    return model


def mobilenet_v2(input_shape=(256, 320, 6), alpha=0.35, dropout=0.2, weights=None, name=None, prior=DEFAULT_PRIOR):
    """MobileNetV2 (ReLU6, no squeeze-excite) with the CAM head."""
    return _assemble(_mobilenet_v2_features, "mobilenet_v2", input_shape, alpha, dropout, weights, name, prior)


def mobilenet_v3_small(input_shape=(256, 320, 6), alpha=0.35, dropout=0.2, weights=None, name=None, prior=DEFAULT_PRIOR):
    """MobileNetV3-Small (hard-swish, squeeze-excite with hard-sigmoid gates) with the CAM head."""

    def features(image, a):
        return _mobilenet_v3_features(image, a, _V3_SMALL)

    return _assemble(features, "mobilenet_v3_small", input_shape, alpha, dropout, weights, name, prior)


def mobilenet_v3_large(input_shape=(256, 320, 6), alpha=0.35, dropout=0.2, weights=None, name=None, prior=DEFAULT_PRIOR):
    """MobileNetV3-Large with the CAM head."""

    def features(image, a):
        return _mobilenet_v3_features(image, a, _V3_LARGE)

    return _assemble(features, "mobilenet_v3_large", input_shape, alpha, dropout, weights, name, prior)


ARCHITECTURES: dict[str, Callable[..., tf_keras.Model]] = {
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_small": mobilenet_v3_small,
    "mobilenet_v3_large": mobilenet_v3_large,
}


def build_model(
    architecture: str,
    input_shape: tuple[int, int, int],
    alpha: float = 0.35,
    dropout: float = 0.2,
    weights: str | Path | None = None,
    name: str | None = None,
    prior: float = DEFAULT_PRIOR,
) -> tf_keras.Model:
    """Build a registered architecture: input ``image`` (H, W, C) -> ``[probability, cam]``.

    ``weights``: None (random init) or a local file; HDF5 files load by layer name and
    skip mismatched shapes. ``prior`` sets the cam bias to logit(prior).
    """
    try:
        builder = ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}") from None
    return builder(input_shape=input_shape, alpha=alpha, dropout=dropout, weights=weights, name=name, prior=prior)


def inference(model: tf_keras.Model, batch_size: int = 32) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``x`` (n, H, W, C) -> ``model``'s (probability, cam) as numpy, in batches through one traced function.

    Not ``Model.predict``: it builds a data pipeline per call and keeps about 6 MB of it each
    time (measured here), so scoring a split study by study grew training by 1 GB an epoch.
    """
    traced = tf.function(lambda x: model(x, training=False),
                         input_signature=[tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)])

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batches = [traced(tf.constant(x[i:i + batch_size], tf.float32)) for i in range(0, len(x), batch_size)]
        probability, cam = (np.concatenate([np.asarray(b[j], np.float32) for b in batches]) for j in (0, 1))
        return probability, cam

    return run
