"""Calibration folded into the cam layer: the fit, the fold, training and the CLI on a saved model."""

import json
import shutil

import numpy as np
import pytest
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from model_zoo.card import Aggregation, load_card, sha256_file

pytestmark = pytest.mark.tf


def synthetic_studies(n: int, slope: float, intercept: float, seed: int = 0):
    """Studies of 12 slice logits whose label is drawn with probability sigmoid(slope * max + intercept)."""
    rng = np.random.default_rng(seed)
    logits = [rng.normal(rng.normal(2.0, 2.0), 1.0, size=12) for _ in range(n)]
    labels = [int(rng.random() < expit(slope * z.max() + intercept)) for z in logits]
    return logits, labels


def test_the_fit_recovers_the_map_that_generated_the_labels():
    from model_zoo.calibrate import LogitMap, fit_logit_map, study_probabilities

    logits, labels = synthetic_studies(4000, slope=0.5, intercept=-2.0)
    fitted = fit_logit_map(logits, labels, Aggregation("max", 1))
    assert fitted.slope == pytest.approx(0.5, abs=0.08) and fitted.intercept == pytest.approx(-2.0, abs=0.4)
    raw = study_probabilities(logits, Aggregation("max", 1))
    calibrated = study_probabilities(logits, Aggregation("max", 1), fitted)
    assert roc_auc_score(labels, calibrated) == pytest.approx(roc_auc_score(labels, raw))  # ranking kept
    assert abs(calibrated.mean() - np.mean(labels)) < 0.02 < abs(raw.mean() - np.mean(labels))
    assert LogitMap(2.0, 1.0)(np.array([0.0, 1.0])).tolist() == [1.0, 3.0]


def test_with_a_top_k_mean_the_fit_calibrates_and_nearly_keeps_the_ranking():
    from model_zoo.calibrate import fit_logit_map, study_probabilities

    logits, labels = synthetic_studies(3000, slope=0.4, intercept=-1.5, seed=3)
    top2 = Aggregation("top_k_mean", 2)
    fitted = fit_logit_map(logits, labels, top2)
    raw, calibrated = study_probabilities(logits, top2), study_probabilities(logits, top2, fitted)
    assert abs(calibrated.mean() - np.mean(labels)) < 0.02 < abs(raw.mean() - np.mean(labels))
    assert roc_auc_score(labels, calibrated) == pytest.approx(roc_auc_score(labels, raw), abs=0.01)


def test_the_fit_needs_both_classes_and_stays_finite_when_they_separate():
    from model_zoo.calibrate import fit_logit_map

    logits, _ = synthetic_studies(20, 1.0, 0.0)
    with pytest.raises(ValueError, match="positive and negative"):
        fit_logit_map(logits, [1] * 20, Aggregation())
    separable = [np.full(5, -3.0), np.full(5, -2.0), np.full(5, 2.0), np.full(5, 3.0)]
    fitted = fit_logit_map(separable, [0, 0, 1, 1], Aggregation())
    assert 0.1 < fitted.slope < 10 and abs(fitted.intercept) < 5  # unsmoothed 0/1 targets: slope -> infinity


def test_folding_maps_every_cam_logit_and_the_probability():
    from model_zoo.architectures import build_model
    from model_zoo.calibrate import LogitMap, fold_into_cam

    model = build_model("mobilenet_v2", (64, 96, 6))
    x = np.random.default_rng(1).random((3, 64, 96, 6), dtype=np.float32)
    _, cam = model.predict(x, verbose=0)
    fold_into_cam(model, LogitMap(0.4, -1.5))
    probability, folded = model.predict(x, verbose=0)
    np.testing.assert_allclose(folded, 0.4 * cam - 1.5, atol=1e-4)
    np.testing.assert_allclose(probability[:, 0], expit(0.4 * cam.reshape(3, -1).max(axis=1) - 1.5), atol=1e-5)


def test_training_saves_its_best_weights_with_the_calibration_folded_in(tiny_run):
    import tf_keras

    from model_zoo.architectures import CAM, build_model, custom_objects

    cfg, card, root = tiny_run
    record = card.training["calibration"]
    assert card.threshold == record["threshold"] and card.metrics["validation"]["auc"] == record["val_auc"]
    # The tiny config fits on its calibration split (the 4 validation studies and 2 more), not on validation.
    assert record["fitted_on"] == "calibration (seed 12) split, 6 studies"
    saved = load_card(root / "model")
    model = tf_keras.models.load_model(str(saved.verify(saved.keras_file)), custom_objects=custom_objects(),
                                       compile=False)
    best = build_model(cfg["architecture"], saved.contract.input_shape, alpha=cfg["alpha"], name=cfg["name"])
    best.load_weights(str(root / "run" / "best.weights.h5"))
    kernel, bias = best.get_layer(CAM).get_weights()
    folded_kernel, folded_bias = model.get_layer(CAM).get_weights()
    np.testing.assert_allclose(folded_kernel, kernel * record["slope"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(folded_bias, bias * record["slope"] + record["intercept"], rtol=1e-5, atol=1e-6)


def test_the_cli_calibrates_a_saved_model_once_and_drops_its_old_variants(tiny_run, tmp_path, capsys):
    from model_zoo.calibrate import main
    from model_zoo.evaluate import keras_predictor

    _, _, root = tiny_run
    folder = tmp_path / "model"
    shutil.copytree(root / "model", folder)
    card_path = folder / "card.json"
    saved = json.loads(card_path.read_text())
    del saved["training"]["calibration"]  # a model from before calibration existed
    (folder / "old.tflite").write_bytes(b"stale")
    saved["variants"] = {"float32": {"file": "old.tflite", "kind": "float32"}}
    saved["files"]["old.tflite"] = sha256_file(folder / "old.tflite")
    saved["metrics"]["test"] = {"auc": {"value": 0.5}}
    card_path.write_text(json.dumps(saved))
    before = keras_predictor(load_card(folder))

    assert main(["--model", str(folder), "--cache", str(root / "cache")]) == 0
    assert "python -m quantize" in capsys.readouterr().out
    card = load_card(folder)
    record = card.training["calibration"]
    assert card.variants == {} and "old.tflite" not in card.files and "test" not in card.metrics
    assert card.files[card.keras_file] == sha256_file(folder / card.keras_file)
    x = np.random.default_rng(2).random((2, *card.contract.input_shape), dtype=np.float32)
    p_before, p_after = before(x), keras_predictor(card)(x)
    z_before = np.log(p_before) - np.log1p(-p_before)
    np.testing.assert_allclose(p_after, expit(record["slope"] * z_before + record["intercept"]), atol=1e-4)
    assert main(["--model", str(folder), "--cache", str(root / "cache")]) == 2
    assert "already calibrated" in capsys.readouterr().err


def test_the_calibration_split_is_the_configs_own_else_validation():
    from model_zoo.calibrate import calibration_name, calibration_split

    val = {"seed": 2000, "studies": 160, "slices": 48}
    split = calibration_split({"data": {"train": {"seed": 1, "studies": 9}, "val": val}})
    assert (split.name, split.seed, split.studies) == ("val", 2000, 160)
    assert calibration_name(split) == "validation"
    split = calibration_split({"data": {"val": val, "calibration": {**val, "studies": 480}}})
    assert (split.name, split.seed, split.studies) == ("calibration", 2000, 480)
    assert calibration_name(split) == "calibration (seed 2000)"
