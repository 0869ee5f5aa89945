"""A tiny TFLite model with the real model's I/O, plus its model folder, for runtime tests.

The model is deterministic and *means* something, so tests can check results, not
just shapes: the class-activation map is a linear function of the mean windowed
intensity of each 32x32 cell of the input, so bright (bone-dense) regions are "hot".

    cam[cell] = GAIN * (mean over the cell and the channels of the input - MIDPOINT)
    probability = sigmoid(mean over cells of cam)

With the default tiny contract (64 x 96 -> a 2 x 3 CAM), water (0 HU) everywhere
gives a probability of about 0.04, and one cell filled with dense bone (>= 1300 HU)
about 0.96.

Building needs TensorFlow (tests only; the app never imports it) and goes through
``quantize.export``, like the shipped models. Build once per test session:
``shared_tiny_model(tmp_path_factory)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from model_zoo.card import CARD_FILE, ModelCard, Variant
from model_zoo.contract import InputContract

TINY_CONTRACT = InputContract(height=64, width=96)
TINY_NAME = "tiny-test"
TINY_VERSION = "0.0.1"
TINY_THRESHOLD = 0.5
MODEL_FILE = "model_float32.tflite"
STRIDE = 32
GAIN = 50.0
MIDPOINT = 0.316  # between water-only slices (~0.254) and slices with one bone-filled cell (~0.378)

def build_tiny_keras(contract: InputContract = TINY_CONTRACT):
    """The Keras model: input 'image' -> outputs [probability (N, 1), cam (N, H/32, W/32, 1)]."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tf_keras as keras

    image = keras.Input(shape=contract.input_shape, name="image")
    pooled = keras.layers.AveragePooling2D(pool_size=STRIDE, name="cell_mean")(image)
    cam = keras.layers.Conv2D(1, 1, name="cam", dtype="float32")(pooled)
    logit = keras.layers.GlobalAveragePooling2D(name="gap")(cam)
    probability = keras.layers.Activation("sigmoid", name="probability", dtype="float32")(logit)
    model = keras.Model(image, [probability, cam], name="tiny_test")
    c = contract.channels
    model.get_layer("cam").set_weights([np.full((1, 1, c, 1), GAIN / c, np.float32),
                                        np.array([-GAIN * MIDPOINT], np.float32)])
    return model


def make_tiny_model(folder: Path, contract: InputContract = TINY_CONTRACT) -> Path:
    """Write a model folder (card.json + model_float32.tflite with recorded hashes); return the folder."""
    from quantize.export import convert, write_tflite  # the exporter the real models go through

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_tflite(convert(build_tiny_keras(contract), contract.input_shape, "float32"), folder / MODEL_FILE, contract)
    card = ModelCard(
        name=TINY_NAME, version=TINY_VERSION, architecture="tiny_cell_mean", contract=contract,
        threshold=TINY_THRESHOLD, description="Test-only model: hot where the input is bright.",
        variants={"float32": Variant(file=MODEL_FILE, kind="float32", recipe="none")},
        default_variant="float32", folder=folder,
    )
    card.record_hashes()
    card.save()
    return folder


def shared_tiny_model(tmp_path_factory) -> Path:
    """One tiny model folder per test session, shared by every test module that asks for it.

    Kept in the session's base temp dir (card.json is written last), so it is built once
    even when this module is imported under two names (``model_helpers``, ``tests.model_helpers``).
    """
    folder = tmp_path_factory.getbasetemp() / "tiny_model"
    if not (folder / CARD_FILE).is_file():
        make_tiny_model(folder)
    return folder


def copy_model_folder(src: Path, dst: Path) -> Path:
    """A private copy of a model folder, for tests that damage it."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def bone_block_volume(n_slices: int = 24, rows: int = 128, cols: int = 128, hot_slices: range = range(10, 15),
                      block_rc: tuple[slice, slice] = (slice(62, 108), slice(83, 128))) -> np.ndarray:
    """An int16 HU volume of water with a dense-bone block (1500 HU) on ``hot_slices``.

    At 0.75 mm pixels the default block covers the tiny contract's cam cell (1, 2)
    (rows 0..32 mm, cols 16..48 mm from the image centre), so the tiny model calls
    exactly ``hot_slices`` positive when the slices are 2 mm apart.
    """
    hu = np.zeros((n_slices, rows, cols), np.int16)
    for k in hot_slices:
        hu[k][block_rc] = 1500
    return hu


def synthetic_series(hu: np.ndarray, pixel_spacing_mm=(0.75, 0.75), slice_spacing_mm: float = 2.0):
    """An in-memory app.domain.Series around ``hu`` (no files), with deterministic UIDs."""
    from app.domain import Series

    n = len(hu)
    return Series(
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        series_instance_uid="1.2.826.0.1.3680043.8.498.2",
        sop_instance_uids=[f"1.2.826.0.1.3680043.8.498.3.{i + 1}" for i in range(n)],
        z_mm=np.arange(n, dtype=np.float64) * slice_spacing_mm - 100.0,
        hu=hu,
        pixel_spacing_mm=tuple(pixel_spacing_mm),
        slice_thickness_mm=slice_spacing_mm,
    )
