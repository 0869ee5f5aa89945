"""Keras model -> TFLite flatbuffer with the app's signature, for every converter setting.

Every file has one signature, ``serving_default``: input ``image`` (N, H, W, C)
float32 (int8 for ``int8`` I/O) with a resizable batch, outputs ``probability``
(N, 1) and ``cam`` (N, H/32, W/32, 1) - what ``model_zoo.litert.TFLiteModel`` runs.

Converter settings (``CONVERTERS``):

* ``float32``: plain conversion;
* ``float16``: float16 weights, float32 compute;
* ``dynamic_range``: int8 weights, activations quantized on the fly;
* ``int8``: full-integer post-training quantization calibrated on representative
  inputs from phantom studies (every op int8, ``TFLITE_BUILTINS_INT8`` only);
* ``quantization_aware``: a QAT/PQAT model; the activation ranges come from its
  fake-quant nodes, so no calibration data is used.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

from model_zoo.architectures import CAM, PROBABILITY  # noqa: E402
from model_zoo.contract import InputContract  # noqa: E402
from model_zoo.litert import INPUT_NAME, LiteRTError, TFLiteModel  # noqa: E402

log = logging.getLogger(__name__)

CONVERTERS = ("float32", "float16", "dynamic_range", "int8", "quantization_aware")
IO_DTYPES = {"float32": tf.float32, "int8": tf.int8}
Representative = Callable[[], Iterable[np.ndarray]]  # yields single model inputs (H, W, C) float32


class ExportError(Exception):
    """A model could not be converted, or the converted file is not what the app needs."""


def serving_function(model: tf_keras.Model, input_shape: tuple[int, int, int]):
    """The concrete function behind the signature: ``image`` -> {probability, cam}, any batch size."""

    @tf.function(input_signature=[tf.TensorSpec([None, *input_shape], tf.float32, name=INPUT_NAME)])
    def serving(image):
        probability, cam = model(image, training=False)
        return {PROBABILITY: probability, CAM: cam}

    return serving.get_concrete_function()


def _configure(converter, converter_kind: str, io_dtype: str, representative: Representative | None) -> None:
    if converter_kind not in CONVERTERS:
        raise ExportError(f"unknown converter {converter_kind!r}; known: {', '.join(CONVERTERS)}")
    if io_dtype not in IO_DTYPES:
        raise ExportError(f"unknown I/O dtype {io_dtype!r}; known: {', '.join(IO_DTYPES)}")
    if converter_kind != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if converter_kind == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if converter_kind == "int8":
        if representative is None:
            raise ExportError("full-integer quantization needs representative inputs")
        converter.representative_dataset = lambda: ([x[None].astype(np.float32)] for x in representative())
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if io_dtype != "float32":
        if converter_kind not in ("int8", "quantization_aware"):
            raise ExportError(f"{io_dtype} I/O needs an integer model, not {converter_kind!r}")
        converter.inference_input_type = IO_DTYPES[io_dtype]
        converter.inference_output_type = IO_DTYPES[io_dtype]


def convert(
    model: tf_keras.Model,
    input_shape: tuple[int, int, int],
    converter_kind: str,
    io_dtype: str = "float32",
    representative: Representative | None = None,
    sparse_storage: bool = False,
) -> bytes:
    """TFLite flatbuffer of ``model`` with the app's signature.

    ``sparse_storage`` stores mostly-zero weight tensors in TFLite's sparse format
    (a DENSIFY op restores them once at load): fewer bytes for a pruned model,
    same kernels at run time.
    """
    t0 = time.time()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([serving_function(model, input_shape)], model)
    _configure(converter, converter_kind, io_dtype, representative)
    if sparse_storage:
        converter.optimizations = [*converter.optimizations, tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    try:
        flatbuffer = converter.convert()
    except Exception as exc:  # the converter raises many types (ConverterError, ValueError, RuntimeError)
        raise ExportError(f"TFLite conversion ({converter_kind}, {io_dtype} I/O) failed: {exc}") from exc
    log.info("converted %s (%s I/O) in %.0f s: %d bytes", converter_kind, io_dtype, time.time() - t0, len(flatbuffer))
    return flatbuffer


def write_tflite(flatbuffer: bytes, path: Path, contract: InputContract) -> Path:
    """Write a flatbuffer and check that LiteRT loads it with the app's signature and input contract."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(flatbuffer)
    try:
        model = TFLiteModel(tmp, threads=1)
    except LiteRTError as exc:
        tmp.unlink()
        raise ExportError(f"the exported {path.name} does not load in LiteRT: {exc}") from exc
    if model.input_shape[1:] != contract.input_shape:
        tmp.unlink()
        raise ExportError(f"the exported {path.name} takes {model.input_shape[1:]}, the contract says {contract.input_shape}")
    tmp.replace(path)
    return path
