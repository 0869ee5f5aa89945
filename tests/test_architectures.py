"""Architecture registry: shapes, flatness, compressibility (prune / QAT / PQAT), save+load, mixed precision."""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402 - required (requirements.txt): a broken install fails
import tf_keras  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from model_zoo.architectures import ARCHITECTURES, HardSigmoid, HardSwish, build_model, custom_objects  # noqa: E402

pytestmark = pytest.mark.tf

SHAPE = (64, 96, 6)
ALPHA = 0.35


@pytest.fixture(scope="module")
def models() -> dict:
    tf_keras.utils.set_random_seed(0)
    return {name: build_model(name, SHAPE, alpha=ALPHA) for name in ARCHITECTURES}


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return np.random.default_rng(0).random((2, *SHAPE), dtype=np.float32)


def test_registry_names():
    assert set(ARCHITECTURES) == {"mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large"}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_contract_outputs_and_flat(models, batch, name):
    model = models[name]
    assert model.input_names == ["image"]
    assert model.output_names == ["probability", "cam"]
    prob, cam = model(batch, training=False)
    assert prob.shape == (2, 1)
    assert cam.shape == (2, SHAPE[0] // 32, SHAPE[1] // 32, 1)
    assert np.all((prob.numpy() > 0) & (prob.numpy() < 1))
    # probability is exactly sigmoid(mean(cam)): the cam is the classifier's own map.
    expected = 1 / (1 + np.exp(-cam.numpy().mean(axis=(1, 2, 3))))
    np.testing.assert_allclose(prob.numpy()[:, 0], expected, rtol=1e-5)
    assert not [layer.name for layer in model.layers if isinstance(layer, tf_keras.Model)]


def test_v3_uses_real_hard_activation_layers(models):
    for name in ("mobilenet_v3_small", "mobilenet_v3_large"):
        kinds = {type(layer) for layer in models[name].layers}
        assert {HardSwish, HardSigmoid} <= kinds
        assert not [layer for layer in models[name].layers if "Lambda" in type(layer).__name__]


def test_hard_activations_values():
    x = np.array([-4.0, -3.0, -1.0, 0.0, 1.0, 3.0, 4.0], dtype=np.float32)
    np.testing.assert_allclose(HardSigmoid()(x).numpy(), np.clip(x + 3, 0, 6) / 6, atol=1e-7)
    np.testing.assert_allclose(HardSwish()(x).numpy(), x * np.clip(x + 3, 0, 6) / 6, atol=1e-7)


def test_width_multiplier_and_input_size(models):
    wide = build_model("mobilenet_v2", SHAPE, alpha=1.0)
    assert models["mobilenet_v2"].count_params() < wide.count_params()
    assert build_model("mobilenet_v2", (256, 320, 6)).outputs[1].shape[1:] == (8, 10, 1)


def test_inference_mode_follows_a_short_training():
    """After 60 steps the BatchNorm moving statistics already make inference-mode outputs track training.

    With Keras' default momentum (0.99) every prediction here is the same number.
    """
    rng = np.random.default_rng(0)
    x = rng.normal(0.3, 0.05, (64, *SHAPE)).astype(np.float32)
    y = np.zeros((64, 1), np.float32)
    y[::2] = 1.0
    x[::2, 0:32, 32:64, :] += 0.5  # positives carry a bright block, in cam cell (0, 1)
    cells = np.zeros((64, 2, 3, 1), np.float32)
    cells[::2, 0, 1] = 1.0
    tf_keras.utils.set_random_seed(0)
    model = build_model("mobilenet_v2", SHAPE, alpha=ALPHA)
    # As model_zoo.train does: the label on the probability, the lesion cells on the cam logits.
    model.compile(tf_keras.optimizers.Adam(3e-3), loss={"probability": "binary_crossentropy",
                                                        "cam": tf_keras.losses.BinaryCrossentropy(from_logits=True)})
    model.fit(x, {"probability": y, "cam": cells}, batch_size=16, epochs=15, verbose=0)
    prob = model.predict(x, verbose=0)[0][:, 0]
    assert prob.std() > 0.05, prob[:6]
    # The ranking, not a margin: how far apart the probabilities end up after 60 steps depends on
    # the CPU's kernels (0.087 vs 0.000 on an AVX-512 machine, 0.1+ on an AVX2 one).
    assert roc_auc_score(y[:, 0], prob) > 0.95


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"architecture": "resnet50"}, "unknown architecture"),
        ({"input_shape": (60, 96, 6)}, "multiples of 32"),
        ({"alpha": 0.0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"weights": "imagenet"}, "not found"),
    ],
)
def test_invalid_arguments(kwargs, message):
    args = {"architecture": "mobilenet_v2", "input_shape": SHAPE, **kwargs}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        build_model(**args)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_prune_wrap(models, name):
    sparsity = tfmot.sparsity.keras
    pruned = sparsity.prune_low_magnitude(models[name], pruning_schedule=sparsity.ConstantSparsity(0.5, 0))
    prunable = [w.name for layer in pruned.layers for w in getattr(layer, "prunable_weights", [])]
    assert any("head_conv" in w for w in prunable)
    assert not any("depthwise" in w for w in prunable)  # tfmot never prunes DepthwiseConv2D


# mobilenet_v3_small goes through the same annotate + quantize_apply path in the PQAT test below.
@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_large"])
def test_qat_wrap(models, batch, name):
    from quantize.qat import quantize_aware

    qat = quantize_aware(models[name])
    prob, cam = qat(batch, training=False)
    assert prob.shape == (2, 1) and cam.shape[1:] == (2, 3, 1)
    assert qat.get_layer("quant_head_conv").layer.name == "head_conv"


def test_pqat_keeps_zeros(batch):
    import tensorflow as tf

    from quantize.prune import layer_sparsity
    from quantize.qat import quantize_aware

    model = build_model("mobilenet_v3_small", SHAPE, alpha=ALPHA)
    masks = {}
    for layer in model.layers:  # 50% magnitude pruning of every Conv2D kernel, by hand
        if type(layer) is tf_keras.layers.Conv2D:
            k = layer.kernel.numpy()
            k[np.abs(k) < np.median(np.abs(k))] = 0.0
            layer.kernel.assign(k)
            masks[layer.name] = k == 0
    before = model.get_layer("head_conv").kernel.numpy()
    pqat = quantize_aware(model, preserve_sparsity=True)
    optimizer = tf_keras.optimizers.SGD(0.5)
    with tf.GradientTape() as tape:  # one eager step: no graph tracing, keeps the test fast
        prob, _ = pqat(batch, training=True)
        loss = tf_keras.losses.binary_crossentropy(np.array([[0.0], [1.0]]), prob)
    optimizer.apply_gradients(zip(tape.gradient(loss, pqat.trainable_variables), pqat.trainable_variables, strict=True))
    after = {r.layer: r for r in layer_sparsity(pqat)}
    assert set(masks) <= set(after)
    for name, mask in masks.items():  # every zero survives, including the squeeze-excite convs
        assert after[name].zeros >= mask.sum(), name
    kernel = next(w for w in pqat.get_layer("quant_head_conv").weights if w.name.endswith("/kernel:0")).numpy()
    assert np.any(kernel[~masks["head_conv"]] != before[~masks["head_conv"]])  # the step did train


def test_save_load_round_trip(models, batch, tmp_path):
    model = models["mobilenet_v3_small"]
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = tf_keras.models.load_model(path, custom_objects=custom_objects(), compile=False)
    for a, b in zip(model(batch, training=False), loaded(batch, training=False), strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_local_weights_load_by_name(models, batch, tmp_path):
    source = models["mobilenet_v2"]
    path = tmp_path / "weights.h5"
    source.save_weights(path)
    target = build_model("mobilenet_v2", SHAPE, alpha=ALPHA, weights=str(path))
    np.testing.assert_allclose(source(batch)[0].numpy(), target(batch)[0].numpy(), rtol=1e-5)
    # Another channel count: the stem is skipped (shape mismatch), everything else loads.
    other = build_model("mobilenet_v2", (64, 96, 3), alpha=ALPHA, weights=str(path))
    np.testing.assert_array_equal(other.get_layer("head_conv").kernel.numpy(), source.get_layer("head_conv").kernel.numpy())


def test_mixed_precision_head_is_float32(batch):
    from model_zoo.train import dtype_policy

    with dtype_policy("mixed_float16"):
        model = build_model("mobilenet_v3_small", SHAPE, alpha=ALPHA)
    assert tf_keras.mixed_precision.global_policy().name == "float32"
    assert model.get_layer("head_conv").compute_dtype == "float16"
    prob, cam = model(batch, training=False)
    assert prob.dtype == "float32" and cam.dtype == "float32"
    assert np.all(np.isfinite(prob.numpy()))
