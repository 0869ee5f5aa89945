"""A micro model folder for compression tests: real layers, real phantom data, seconds to convert.

MobileNets take minutes to trace and convert; this 7-conv model has every layer kind
the real ones have (Conv2D + BatchNorm, DepthwiseConv2D, ReLU/ReLU6, HardSwish,
squeeze-excite with HardSigmoid and Multiply, Add) and the shared CAM head, so
prune -> PQAT -> int8 -> LiteRT exercises the same code paths. It is trained briefly
on tiny phantom studies (4 mm grid, 64 x 96) so its predictions vary and
agreement checks mean something.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from model_zoo.card import Aggregation, ModelCard
from model_zoo.contract import InputContract

MICRO_CONTRACT = InputContract(pixel_spacing_mm=4.0, height=64, width=96)
MICRO_DATA = {
    "train": {"seed": 11, "studies": 6, "slices": 12},
    "test": {"seed": 13, "studies": 8, "slices": 12},
}
KERAS_FILE = "model.keras"
TRAIN_STEPS = 60


def build_micro_model(contract: InputContract = MICRO_CONTRACT):
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    from tf_keras import layers

    from model_zoo.architectures import HardSigmoid, HardSwish, cam_classifier

    def conv_bn(x, filters, kernel, stride, act, name, depthwise=False):
        conv = (layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=name) if depthwise
                else layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=name))
        x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(conv(x))
        return act(name=f"{name}_act")(x)

    image = layers.Input(shape=contract.input_shape, name="image")
    x = conv_bn(image, 8, 3, 2, HardSwish, "stem")
    x = conv_bn(x, None, 3, 2, layers.ReLU, "dw1", depthwise=True)
    x = conv_bn(x, 16, 1, 1, lambda name: layers.ReLU(6.0, name=name), "pw1")
    s = layers.GlobalAveragePooling2D(keepdims=True, name="se_squeeze")(x)
    s = layers.Conv2D(4, 1, activation="relu", name="se_reduce")(s)
    s = layers.Conv2D(16, 1, name="se_expand")(s)
    x = layers.Multiply(name="se_excite")([x, HardSigmoid(name="se_gate")(s)])
    x = conv_bn(x, 24, 3, 2, layers.ReLU, "conv2")
    y = conv_bn(x, None, 3, 1, HardSwish, "dw2", depthwise=True)
    y = layers.BatchNormalization(momentum=0.9, name="pw2_bn")(layers.Conv2D(24, 1, use_bias=False, name="pw2")(y))
    x = layers.Add(name="residual")([x, y])
    x = conv_bn(x, 32, 3, 2, layers.ReLU, "conv3")
    x = conv_bn(x, 48, 3, 2, HardSwish, "head_conv")
    return cam_classifier(image, x, dropout=0.0, name="micro")


def make_micro_model_folder(folder: Path, cache_root: Path, steps: int = TRAIN_STEPS, seed: int = 0) -> Path:
    """Train the micro model on tiny phantoms; write model.keras + card.json; return the folder."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tf_keras

    from model_zoo.aggregation import study_probability
    from model_zoo.data import make_train_dataset
    from model_zoo.dataset import load_split, split_specs, study_inputs
    from model_zoo.metrics import threshold_for_sensitivity

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tf_keras.utils.set_random_seed(seed)
    config = {"data": MICRO_DATA, "training": {"seed": seed}}
    train = load_split(split_specs(config)["train"], MICRO_CONTRACT, cache_root, workers=1)
    model = build_micro_model()
    model.compile(optimizer=tf_keras.optimizers.Adam(3e-3), loss={"probability": "binary_crossentropy"})
    model.fit(make_train_dataset(train, MICRO_CONTRACT, 16, None, seed=seed, positive_fraction=0.5, lesion_map=False),
              steps_per_epoch=steps, epochs=1, verbose=0)
    aggregation = Aggregation()
    probs = [study_probability(model.predict(study_inputs(s, MICRO_CONTRACT), verbose=0)[0][:, 0], aggregation.method,
                               aggregation.k) for s in train]
    threshold = threshold_for_sensitivity([int(s.positive) for s in train], probs, 0.95)
    model.save(folder / KERAS_FILE)
    card = ModelCard(name="micro-test", version="0.0.1", architecture="micro", contract=MICRO_CONTRACT,
                     threshold=float(threshold), aggregation=aggregation, keras_file=KERAS_FILE,
                     training={"config": config, "seed": seed}, folder=folder)
    card.record_hashes()
    card.save()
    return folder


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def random_inputs(n: int, contract: InputContract = MICRO_CONTRACT, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *contract.input_shape), dtype=np.float32)
