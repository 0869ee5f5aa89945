"""Run a TFLite model with LiteRT (``ai_edge_litert``), never TensorFlow unless LiteRT is absent.

Used by the clinic runtime and by the compression report, so both measure the same thing.
Every exported model has one signature, ``serving_default``, with input ``image``
(N, H, W, C) and outputs ``probability`` (N, 1) and ``cam`` (N, h, w, 1).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SIGNATURE = "serving_default"
INPUT_NAME = "image"
OUTPUTS = ("probability", "cam")


class LiteRTError(Exception):
    """The TFLite file cannot be loaded or run. The message is for the user."""


@contextmanager
def _native_stderr_to_log() -> Iterator[None]:
    """Send what LiteRT's C++ code prints on file descriptor 2 to the log (DEBUG) instead.

    Loading prints e.g. "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.", which
    would break a CLI's promise of a clean stderr. Process-wide while active: call it
    only around model loading, not while other threads may report errors.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines():
                if line.strip():
                    log.debug("LiteRT: %s", line.strip())


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError as exc:  # only when LiteRT is not installed, not when its install is broken
        if not isinstance(exc, ModuleNotFoundError) or exc.name not in ("ai_edge_litert", "ai_edge_litert.interpreter"):
            raise LiteRTError(f"the LiteRT runtime (ai_edge_litert) is installed but broken: {exc}; "
                              "reinstall it (pip install --force-reinstall ai-edge-litert)") from exc
        log.warning("ai_edge_litert is not installed; falling back to tensorflow.lite")
        import tensorflow as tf  # noqa: PLC0415

        return tf.lite.Interpreter


class TFLiteModel:
    """One interpreter with a fixed thread count; ``predict`` is serialised by a lock."""

    def __init__(self, path: Path, threads: int = 2):
        self.path = Path(path)
        try:
            with _native_stderr_to_log():
                self._interp = _interpreter_class()(model_path=str(self.path), num_threads=max(1, int(threads)))
                self._interp.allocate_tensors()  # creates the XNNPACK delegate now, while its banner is captured
        except (ValueError, RuntimeError) as exc:
            raise LiteRTError(f"cannot load TFLite model {self.path.name}: it is corrupt or not a TFLite file") from exc
        if SIGNATURE not in self._interp.get_signature_list():
            raise LiteRTError(f"TFLite model {self.path.name} has no '{SIGNATURE}' signature; re-export it")
        self._runner = self._interp.get_signature_runner(SIGNATURE)
        details = self._runner.get_input_details()
        if INPUT_NAME not in details:
            raise LiteRTError(f"TFLite model {self.path.name} has no '{INPUT_NAME}' input in its signature")
        self._input = details[INPUT_NAME]
        out = self._runner.get_output_details()
        missing = [o for o in OUTPUTS if o not in out]
        if missing:
            raise LiteRTError(f"TFLite model {self.path.name} lacks outputs {missing}")
        self._outputs = out
        self.threads = threads
        self._lock = threading.Lock()

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(self._input["dtype"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self._input["shape"])

    def _quantize(self, x: np.ndarray) -> np.ndarray:
        if self.input_dtype == np.float32:
            return x.astype(np.float32, copy=False)
        scale, zero = self._input["quantization"]
        info = np.iinfo(self.input_dtype)
        return np.clip(np.round(x / scale + zero), info.min, info.max).astype(self.input_dtype)

    def _dequantize(self, name: str, y: np.ndarray) -> np.ndarray:
        if y.dtype == np.float32:
            return y
        scale, zero = self._outputs[name]["quantization"]
        return (y.astype(np.float32) - zero) * scale

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (N,) and CAM logit maps (N, h, w) for a float32 batch from the contract."""
        x = np.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape[1:]:
            raise LiteRTError(f"input shape {x.shape} does not match the model's {self.input_shape}")
        with self._lock:
            # The signature runner resizes the batch dimension itself when it changes
            # (resize_tensor_input on the interpreter would fail: the runner holds its tensors).
            out = self._runner(**{INPUT_NAME: self._quantize(x)})
        prob = self._dequantize("probability", out["probability"]).reshape(len(x), -1)[:, 0]
        cam = self._dequantize("cam", out["cam"])[..., 0]
        return prob.astype(np.float32), cam.astype(np.float32)
