"""Load a shipped model for the clinic: find its card, verify the file, open a LiteRT interpreter.

TensorFlow is never imported here: ``model_zoo.litert`` runs the TFLite file with
``ai_edge_litert`` (XNNPACK on the CPU).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from app.domain import AppError, ModelRef
from model_zoo.card import ModelCard, ModelError, resolve_model
from model_zoo.litert import LiteRTError, TFLiteModel

log = logging.getLogger(__name__)

MAX_DEFAULT_THREADS = 4  # XNNPACK gains little beyond 4 threads for one slice batch
MAX_THREADS = 64  # more is a typo, not a machine: each thread is an OS thread


class ModelLoadError(AppError):
    """The model cannot be found, verified or opened. The message says which and what to do."""


@dataclass
class LoadedModel:
    """A verified model file opened for inference, with the card that explains how to feed it."""

    card: ModelCard
    variant: str
    ref: ModelRef
    tflite: TFLiteModel
    threads: int


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, MAX_DEFAULT_THREADS))


def load_model(model: str | None = None, variant: str | None = None, threads: int | None = None) -> LoadedModel:
    """Resolve ``model`` (registry name, folder, card or .tflite path; None = default) and open it.

    The file must be listed in the card with a sha256 and match it: an unverifiable
    model is refused rather than run.
    """
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise ModelLoadError(f"--threads must be between 1 and {MAX_THREADS}, got {threads}")
    threads = threads or default_threads()
    try:
        card = resolve_model(model)
        key, chosen = card.variant(variant)
        if not card.files.get(chosen.file):
            raise ModelError(f"model card of {card.name!r} lists no sha256 for {chosen.file}; "
                             "refusing to run an unverified model file")
        path = card.verify(chosen.file)
        tflite = TFLiteModel(path, threads=threads)
    except (ModelError, LiteRTError) as exc:
        raise ModelLoadError(str(exc)) from exc
    expected = (1, *card.contract.input_shape)
    if tflite.input_shape[1:] != expected[1:]:
        raise ModelLoadError(f"model file {chosen.file} takes input {tflite.input_shape[1:]}, but its card's "
                             f"contract says {expected[1:]}; the model folder is inconsistent")
    ref = ModelRef(name=card.name, version=card.version, sha256=card.files[chosen.file], variant=key)
    log.info("model %s %s (%s) loaded with %d threads", card.name, card.version, key, threads)
    return LoadedModel(card=card, variant=key, ref=ref, tflite=tflite, threads=threads)
