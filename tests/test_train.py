"""A tiny end-to-end training run: phantoms -> contract -> tf.data -> MobileNetV2 -> card."""

import json
import os
import shutil

import numpy as np
import pytest

from model_zoo.card import load_card, sha256_file
from model_zoo.contract import InputContract

pytestmark = pytest.mark.tf


def test_tiny_training_reduces_loss_and_writes_a_card(tiny_run):
    cfg, card, root = tiny_run
    losses = card.training["epoch_losses"]
    assert len(losses) == cfg["training"]["epochs"]
    assert losses[-1] < losses[0]
    loaded = load_card(root / "model")
    assert loaded.contract == InputContract.from_dict(cfg["contract"])
    assert 0.0 <= loaded.threshold <= 1.0
    for rel, digest in loaded.files.items():
        assert sha256_file(root / "model" / rel) == digest
    assert json.loads((root / "model" / "card.json").read_text())["training"]["seed"] == cfg["training"]["seed"]


def test_resume_continues_from_the_checkpoint(tiny_run, tmp_path, monkeypatch):
    import tf_keras

    from model_zoo.train import train

    cfg, card, root = tiny_run
    cfg = dict(cfg, training=dict(cfg["training"], epochs=cfg["training"]["epochs"] + 1))
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)  # the shared run stays as the first training left it
    fit = tf_keras.Model.fit
    started_from_last_weights = []

    def checked_fit(self, *args, **kwargs):  # are the weights training resumes with those the first run ended with?
        resumed_weights = self.get_weights()
        self.load_weights(str(root / "run" / "last.weights.h5"))
        started_from_last_weights.append(all(np.array_equal(a, b) for a, b in zip(
            resumed_weights, self.get_weights(), strict=True)))
        self.set_weights(resumed_weights)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(tf_keras.Model, "fit", checked_fit)
    resumed = train(cfg, tmp_path / "model", run, resume=True, max_minutes=None, cache_root=root / "cache")
    assert started_from_last_weights == [True]
    # Only the one extra epoch ran: the first three came from the checkpoint.
    assert len(resumed.training["epoch_losses"]) == 1
    assert resumed.training["epochs_run"] == cfg["training"]["epochs"]


def test_keep_last_exports_the_last_epoch_without_training_again(tiny_run, tmp_path, monkeypatch):
    import tf_keras

    from model_zoo.architectures import build_model, custom_objects
    from model_zoo.train import train

    cfg, card, root = tiny_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    monkeypatch.setattr(tf_keras.Model, "fit", lambda *a, **k: pytest.fail("the run had ended: nothing to train"))
    kept = train(cfg, tmp_path / "model", run, resume=True, max_minutes=None, cache_root=root / "cache", keep="last")
    assert kept.training["weights"] == "last epoch" and card.training["weights"] == "best validation epoch"
    saved = tf_keras.models.load_model(str(tmp_path / "model" / "model.keras"), custom_objects=custom_objects(),
                                       compile=False)
    last = build_model(cfg["architecture"], saved.input_shape[1:], alpha=float(cfg["alpha"]),
                       dropout=float(cfg.get("dropout", 0.2)), name=cfg["name"])
    last.load_weights(str(run / "last.weights.h5"), by_name=True)
    calibrated = {"cam"}  # calibration folds its map into the 1x1 cam convolution only
    layers = [layer.name for layer in saved.layers if layer.get_weights() and layer.name not in calibrated]
    assert layers
    for name in layers:
        for got, want in zip(saved.get_layer(name).get_weights(), last.get_layer(name).get_weights(), strict=True):
            np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="keep must be one of"):
        train(cfg, tmp_path / "other", run, resume=True, max_minutes=None, cache_root=root / "cache", keep="newest")


def test_a_resumed_run_continues_the_example_stream_where_it_stopped(tiny_run):
    """``first_example`` skips that many examples: a resumed run sees what an unstopped one would."""
    from model_zoo.data import Augmentation, make_train_dataset
    from model_zoo.dataset import load_split, split_specs

    cfg, _card, root = tiny_run
    contract = InputContract.from_dict(cfg["contract"])
    studies = load_split(split_specs(cfg)["val"], contract, root / "cache")
    aug = Augmentation()  # seeded per example, so a skipped stream replays exactly

    def batches(first_example, n):
        ds = make_train_dataset(studies, contract, 3, aug, seed=5, first_example=first_example)
        return [(x.numpy(), y["probability"].numpy()) for x, y in ds.take(n)]

    unstopped, resumed = batches(0, 3), batches(6, 1)
    np.testing.assert_array_equal(resumed[0][0], unstopped[2][0])
    np.testing.assert_array_equal(resumed[0][1], unstopped[2][1])
    assert not np.array_equal(unstopped[0][0], unstopped[2][0])


def test_keras_inference_gives_what_predict_gives_in_any_batch_size(tiny_run):
    """The traced inference function (Model.predict keeps memory on every call) agrees with predict."""
    import tf_keras

    from model_zoo.architectures import custom_objects, inference
    from model_zoo.dataset import load_split, split_specs, study_inputs

    cfg, _card, root = tiny_run
    contract = InputContract.from_dict(cfg["contract"])
    model = tf_keras.models.load_model(str(root / "model" / "model.keras"), custom_objects=custom_objects(), compile=False)
    x = study_inputs(load_split(split_specs(cfg)["val"], contract, root / "cache")[0], contract)[:5]
    expected = model.predict(x, verbose=0)
    for got in (inference(model, batch_size=2)(x), inference(model)(x)):
        assert got[0].shape == (5, 1) and got[1].shape == expected[1].shape
        np.testing.assert_allclose(got[0], expected[0], atol=1e-6)
        np.testing.assert_allclose(got[1], expected[1], atol=1e-5)


def test_training_and_the_app_engine_give_the_same_tensor(tiny_run):
    """One phantom through the training path and through the app's streaming engine: same tensor (<= 1e-5).

    Training: ``prepare_study`` (render, resample the whole volume) -> ``make_training_pair``
    (no augmentation, whole slice) -> the tf.data stream. App: the rendered HU in chunks through
    ``resampled_chunks`` -> ``model_input_batches``, as ``analyze`` runs them. (The training cache
    stores the resampled HU as int16 and the DICOM files the raw HU: each rounds by 0.5 HU at
    most, on purpose; this test compares the two code paths on the same HU.)
    """
    from app.engine import model_input_batches, resampled_chunks
    from model_zoo.data import make_train_dataset, make_training_pair
    from model_zoo.dataset import prepare_study, split_specs
    from model_zoo.phantoms.generator import render_study, sample_study_spec

    cfg, _card, _root = tiny_run
    contract = InputContract.from_dict(cfg["contract"])
    split = split_specs(cfg)["train"]
    for index in range(split.studies):  # the training stream needs lesion and lesion-free slices
        prepared = prepare_study(split.seed, index, split.slices, False, contract)
        if {0, 1} <= set(prepared.slice_labels.tolist()):
            break
    else:
        pytest.fail("no training study of the tiny config has both lesion and lesion-free slices")
    rendered = render_study(sample_study_spec(split.seed, index, n_slices=split.slices))
    spacing = (float(rendered.pixel_spacing_mm),) * 2
    chunks = (rendered.hu[i:i + 5] for i in range(0, len(rendered.hu), 5))
    app = {}
    for indices, batch in model_input_batches(resampled_chunks(chunks, spacing, contract), rendered.z_mm, contract, 3):
        app.update(zip(indices.tolist(), batch, strict=True))
    assert sorted(app) == list(range(split.slices))

    rng = np.random.default_rng(0)
    for k in range(split.slices):
        x, _mask = make_training_pair(prepared, k, contract, None, rng)
        assert np.abs(x - app[k]).max() <= 1e-5, k
    streamed = next(iter(make_train_dataset([prepared], contract, 8, None, seed=5, crop=None)))[0].numpy()
    for x in streamed:
        assert min(np.abs(x - a).max() for a in app.values()) <= 1e-5
    assert len({np.argmin([np.abs(x - a).max() for a in app.values()]) for x in streamed}) > 1  # not one slice 8 times


def test_lesion_cells_weigh_more_in_the_cam_loss():
    from model_zoo.train import cell_loss

    y = np.zeros((1, 2, 2, 1), np.float32)
    y[0, 0, 0] = 1.0
    logits = np.full((1, 2, 2, 1), -3.0, np.float32)  # "no lesion" everywhere
    plain, weighted = float(cell_loss(1.0)(y, logits)[0]), float(cell_loss(20.0)(y, logits)[0])
    missed = np.log1p(np.exp(3.0))  # cross-entropy of the missed lesion cell
    assert plain == pytest.approx((missed + 3 * np.log1p(np.exp(-3.0))) / 4, rel=1e-5)
    assert weighted == pytest.approx((20 * missed + 3 * np.log1p(np.exp(-3.0))) / 4, rel=1e-5)


def test_training_crops_are_cut_from_the_contract_tensor(tiny_run):
    """Without augmentation a training crop is a window of the app's tensor (to float32 rounding), with its lesion mask."""
    from model_zoo.data import make_example, make_training_pair
    from model_zoo.dataset import load_split, split_specs

    cfg, _card, root = tiny_run
    contract = InputContract.from_dict(cfg["contract"])
    study = next(s for s in load_split(split_specs(cfg)["train"], contract, root / "cache") if s.lesion_mask.any())
    k = int(np.flatnonzero(study.lesion_mask.any(axis=(1, 2)))[0])
    crop = tuple(cfg["training"]["crop"])
    x, mask = make_training_pair(study, k, contract, None, np.random.default_rng(0), crop)
    whole = make_example(study, k, contract)
    assert x.shape == (*crop, contract.channels) and mask.shape == crop and mask.any()
    hits = [(r, c) for r in range(contract.height - crop[0] + 1) for c in range(contract.width - crop[1] + 1)
            if np.abs(whole[r:r + crop[0], c:c + crop[1]] - x).max() <= 1e-6]
    assert hits
    r, c = hits[0]
    assert np.array_equal(study.lesion_mask[k][r:r + crop[0], c:c + crop[1]], mask)


def test_a_second_phase_starts_from_the_first_phase_weights(tiny_run, tmp_path):
    import copy

    from model_zoo.train import train

    cfg, _card, root = tiny_run
    phase1 = copy.deepcopy(cfg)
    phase1["training"]["epochs"] = 1
    first = train(phase1, tmp_path / "model1", tmp_path / "run1", resume=False, max_minutes=None,
                  cache_root=root / "cache")
    last = tmp_path / "run1" / "last.weights.h5"
    assert last.is_file()  # written after every epoch, for a next phase
    phase2 = copy.deepcopy(cfg)
    phase2["training"].update({"init_weights": str(last), "epochs": 1, "crop": None})
    card = train(phase2, tmp_path / "model", tmp_path / "run", resume=False, max_minutes=None,
                 cache_root=root / "cache")
    assert card.training["config"]["training"]["init_weights"] == str(last)
    # The second phase starts with the weights the first ended with, and says how good they were.
    assert card.training["start_val_study_auc"] == first.training["epoch_val_study_auc"][-1]
    assert len(card.training["epoch_val_study_auc"]) == 1
    phase2["training"]["init_weights"] = str(tmp_path / "missing.h5")
    with pytest.raises(ValueError, match="run the config's previous phase first"):
        train(phase2, tmp_path / "model2", tmp_path / "run2", resume=False, max_minutes=None, cache_root=root / "cache")


def test_osteoporotic_studies_can_be_over_sampled():
    from model_zoo.data import osteoporosis_groups
    from model_zoo.dataset import PreparedStudy

    def study(osteoporotic):
        return PreparedStudy(key="s", resampled_hu=np.zeros((1, 1, 1), np.float32), z_mm=np.zeros(1),
                             slice_labels=np.zeros(1, np.int8), truth={"osteoporotic": osteoporotic})

    studies = [study(True), study(False), study(False), study(False)]
    pool = np.array([[s, k] for s in range(4) for k in range(3)])
    groups, weights = osteoporosis_groups(pool, studies, 0.5)
    assert [set(g[:, 0]) for g in groups] == [{0}, {1, 2, 3}]
    assert weights.tolist() == [0.5, 0.5]
    same, plain = osteoporosis_groups(pool, studies, None)
    assert len(same) == 1 and np.array_equal(same[0], pool) and plain.tolist() == [1.0]
    only_normal, _ = osteoporosis_groups(pool[3:], studies, 0.5)  # nothing to over-sample: no re-weighting
    assert len(only_normal) == 1
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        osteoporosis_groups(pool, studies, 1.0)


def test_faint_lesion_cross_sections_are_not_trained_as_positives():
    from model_zoo.data import labelled_slices, without_faint_lesions
    from model_zoo.dataset import PreparedStudy

    mask = np.zeros((4, 12, 12), bool)
    mask[0, 1:5, 1:5] = True  # 16 px: kept
    mask[0, 8:10, 8:10] = True  # 4 px beside it on the same slice: dropped, the slice stays positive
    mask[1, 5:7, 5:7] = True  # only a 4 px graze: the slice becomes ambiguous
    labels = np.array([1, 1, 0, -1, 1], np.int8)  # slice 4: a lesion slice without a lesion pixel on the grid
    mask = np.concatenate([mask, np.zeros((1, 12, 12), bool)])
    study = PreparedStudy(key="s", resampled_hu=np.zeros((5, 12, 12), np.float32), z_mm=np.arange(5.0),
                          slice_labels=labels, truth={"positive": True}, lesion_mask=mask)
    seen = without_faint_lesions(study, min_area_px=16)
    assert seen.slice_labels.tolist() == [1, -1, 0, -1, -1]
    assert seen.lesion_mask[0].sum() == 16 and seen.lesion_mask[0, 1:5, 1:5].all()
    assert not seen.lesion_mask[1:].any()
    positives, negatives = labelled_slices([seen])
    assert positives.tolist() == [[0, 0]] and negatives.tolist() == [[0, 2]]
    assert study.slice_labels.tolist() == [1, 1, 0, -1, 1] and study.lesion_mask.sum() == 24  # the loaded study is untouched
    assert without_faint_lesions(study, min_area_px=1).slice_labels.tolist() == [1, 1, 0, -1, -1]


def test_hard_negative_crops_are_centred_on_the_mined_spot():
    from model_zoo.data import crop_window

    rng = np.random.default_rng(0)
    free, hu = np.zeros((256, 320), bool), np.zeros((256, 320), np.float32)
    margin = 24
    for _ in range(50):
        rows, cols = crop_window(free, hu, (128, 160), rng, margin, hot_spot=(48, 272))
        assert rows.start + margin <= 48 < rows.stop - margin and cols.start + margin <= 272 < cols.stop - margin
    lesion = free.copy()
    lesion[200:205, 20:25] = True  # a lesion, when there is one, still decides
    rows, cols = crop_window(lesion, hu, (128, 160), rng, margin, hot_spot=(48, 272))
    assert rows.start <= 200 < rows.stop and cols.start <= 20 < cols.stop


def test_hard_negatives_are_mined_where_the_model_fires_on_lesion_free_slices(tiny_run):
    import tf_keras

    from model_zoo.architectures import custom_objects
    from model_zoo.contract import model_input
    from model_zoo.data import CAM_STRIDE, make_train_dataset
    from model_zoo.dataset import load_split, split_specs
    from model_zoo.train import mine_hard_negatives

    cfg, _card, root = tiny_run
    contract = InputContract.from_dict(cfg["contract"])
    studies = load_split(split_specs(cfg)["val"], contract, root / "cache")
    model = tf_keras.models.load_model(str(root / "model" / "model.keras"), custom_objects=custom_objects(), compile=False)
    hard, summary = mine_hard_negatives(model, studies, contract, top_fraction=0.25)
    n_free = sum(int(np.sum(s.slice_labels == 0)) for s in studies)
    assert summary["of_lesion_free_slices"] == n_free and len(hard) == summary["slices"] == round(0.25 * n_free)
    strongest = []
    for s, k, row, col in hard:
        assert studies[s].slice_labels[k] == 0
        assert row % CAM_STRIDE == col % CAM_STRIDE == CAM_STRIDE // 2
        study = studies[s]
        cam = model.predict(model_input(study.resampled_hu, study.z_mm, study.z_mm[k:k + 1], contract), verbose=0)[1]
        assert cam[0, row // CAM_STRIDE, col // CAM_STRIDE, 0] == pytest.approx(cam.max())
        strongest.append(float(cam.max()))
    assert strongest == sorted(strongest, reverse=True)  # hottest first
    assert min(strongest) == pytest.approx(summary["min_logit"], abs=1e-3)
    with pytest.raises(ValueError, match="needs mined hard negatives"):
        make_train_dataset(studies, contract, 4, None, 0, hard_negative_fraction=0.5)


def test_a_hard_negative_phase_mines_with_its_starting_weights(tiny_run, tmp_path):
    import copy

    from model_zoo.train import train

    cfg, _card, root = tiny_run
    phase = copy.deepcopy(cfg)
    phase["training"].update({"hard_negative_fraction": 0.5, "hard_negative_top": 0.5, "epochs": 1})
    with pytest.raises(ValueError, match="needs init_weights"):
        train(phase, tmp_path / "m0", tmp_path / "r0", resume=False, max_minutes=None, cache_root=root / "cache")
    phase["training"]["init_weights"] = str(root / "run" / "last.weights.h5")
    card = train(phase, tmp_path / "model", tmp_path / "run", resume=False, max_minutes=None, cache_root=root / "cache")
    mined = card.training["hard_negatives"]
    assert 0 < mined["slices"] <= mined["of_lesion_free_slices"] and len(card.training["epoch_losses"]) == 1


# Two logical CPU devices stand in for two GPUs: the same MirroredStrategy and mixed-precision
# code a GPU machine runs. Logical devices must exist before TensorFlow starts, hence a subprocess.
_GPU_PATH_SCRIPT = """
import json, sys
from pathlib import Path
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import tf_keras
import model_zoo.train as train_module
train_module.distribution_strategy = lambda: (tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), "mixed_float16")
cfg = train_module.load_config(Path(sys.argv[1]))
cfg["training"]["epochs"] = 2
out = Path(sys.argv[2])
card = train_module.train(cfg, out / "model", out / "run", resume=False, max_minutes=None, cache_root=Path(sys.argv[3]))
json.dump({"training": card.training, "policy_after": tf_keras.mixed_precision.global_policy().name},
          open(out / "result.json", "w"))
"""


def test_the_gpu_path_trains_on_two_replicas_in_mixed_precision_and_saves_a_float32_model(tiny_run, tmp_path):
    import os
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    from model_zoo.train import KERAS_FILE

    cfg, _card, root = tiny_run
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(repo))
    subprocess.run([sys.executable, "-c", _GPU_PATH_SCRIPT, str(repo / "model_zoo" / "configs" / "tiny.json"),
                    str(tmp_path), str(root / "cache")], cwd=repo, env=env, check=True, timeout=600)
    result = json.loads((tmp_path / "result.json").read_text())
    training = result["training"]
    assert training["replicas"] == 2 and training["dtype_policy"] == "mixed_float16"
    assert len(training["epoch_losses"]) == 2 and all(np.isfinite(training["epoch_losses"]))
    assert result["policy_after"] == "float32"  # training leaves Keras' global policy as it found it
    # The saved model is float32 throughout: what quantize and the app expect.
    with zipfile.ZipFile(tmp_path / "model" / KERAS_FILE) as archive:
        layers = json.loads(archive.read("config.json"))["config"]["layers"]
    policies = {json.dumps(layer["config"].get("dtype")) for layer in layers}
    assert not any("mixed" in p for p in policies), policies
    # ... and carries the trained weights (the best epoch's; calibration rescales only the cam).
    import tf_keras

    from model_zoo.architectures import build_model, custom_objects

    saved = tf_keras.models.load_model(str(tmp_path / "model" / KERAS_FILE), custom_objects=custom_objects(),
                                       compile=False)
    best = build_model(cfg["architecture"], saved.input_shape[1:], alpha=cfg["alpha"], name=cfg["name"])
    best.load_weights(str(tmp_path / "run" / "best.weights.h5"))
    for layer in saved.layers:
        if layer.name != "cam":
            for kept, trained in zip(layer.get_weights(), best.get_layer(layer.name).get_weights(), strict=True):
                np.testing.assert_array_equal(kept, trained)


def test_training_can_hold_a_split_as_integer_hu_with_lesion_free_masks_shared(tmp_path):
    """The cache keeps HU as int16 (no float32 copy); training memory-maps them read-only, and a
    lesion-free study's mask is a read-only view taking no memory; the 2.5D input is the float
    form's. A transform given to load_split sees every study as it is read."""
    from model_zoo.data import make_example, without_faint_lesions
    from model_zoo.dataset import SplitSpec, load_split

    contract = InputContract(pixel_spacing_mm=2.0, height=64, width=80)
    split = SplitSpec("train", seed=11, studies=4, slices=8)
    exact = load_split(split, contract, tmp_path, workers=1)
    seen = []
    compact = load_split(split, contract, tmp_path, workers=1, integer_hu=True,
                         transform=lambda study: seen.append(study.key) or study)
    assert seen == [s.key for s in compact] == [s.key for s in exact]
    assert {s.positive for s in exact} == {True, False}
    assert len(list(tmp_path.rglob("*.hu16.npy"))) == 4 and not list(tmp_path.rglob("*partial*"))
    again = load_split(split, contract, tmp_path, workers=1, integer_hu=True)  # maps the same files
    for a, b, c in zip(exact, compact, again, strict=True):
        assert b.resampled_hu.dtype == np.int16
        assert isinstance(b.resampled_hu, np.memmap) and not b.resampled_hu.flags.writeable
        assert c.resampled_hu.filename == b.resampled_hu.filename and np.array_equal(c.resampled_hu, b.resampled_hu)
        assert np.abs(b.resampled_hu - a.resampled_hu).max() <= 0.5
        assert np.array_equal(a.lesion_mask, b.lesion_mask)
        if not a.lesion_mask.any():
            assert b.lesion_mask.strides[0] == 0 and not b.lesion_mask.flags.writeable
        if not a.positive:
            assert without_faint_lesions(b, 16) is b
        k = len(a.z_mm) // 2
        window_step = 0.5 / min(w.width for w in contract.windows)
        assert np.abs(make_example(a, k, contract) - make_example(b, k, contract)).max() <= window_step + 1e-6
    # The cache holds no float32 copy of the HU: the int16 file is the entry's HU.
    entry = next(tmp_path.rglob("*_i0.npz"))
    side = entry.with_name(entry.stem + ".hu16.npy")
    with np.load(entry) as f:
        fields = {k: f[k] for k in f.files}
    assert "resampled_hu" not in fields and exact[0].resampled_hu.dtype == np.float32
    # An entry from before the int16 file (float32 HU inside) gets one on first use, and a fresh
    # one when the entry is prepared again (newer than its file), not the stale map.
    hu = exact[0].resampled_hu + np.float32(0.3)
    np.savez(entry, resampled_hu=hu, **fields)
    side.unlink()
    legacy = load_split(split, contract, tmp_path, workers=1, integer_hu=True)[0].resampled_hu
    assert np.array_equal(legacy, np.rint(hu)) and side.exists()
    assert np.array_equal(load_split(split, contract, tmp_path, workers=1)[0].resampled_hu, hu)
    stale = side.with_name("stale.npy")
    np.save(stale, np.zeros(hu.shape, np.int16))
    os.replace(stale, side)  # a new file: the arrays mapped above keep theirs
    os.utime(entry, ns=(side.stat().st_mtime_ns + 10**9,) * 2)
    fresh = load_split(split, contract, tmp_path, workers=1, integer_hu=True)[0].resampled_hu
    assert np.array_equal(fresh, np.rint(hu)) and fresh.any()


def test_a_split_can_be_read_one_study_at_a_time(tmp_path):
    """Scoring a large split (evaluate, compare) reads it study by study: the same studies as
    ``load_split``, prepared into the cache on the first read, one in memory at a time."""
    from model_zoo.dataset import SplitSpec, iter_split, load_split

    contract = InputContract(pixel_spacing_mm=2.0, height=64, width=80)
    split = SplitSpec("held", seed=12, studies=3, slices=6)
    lazy = iter_split(split, contract, tmp_path, workers=1)
    assert not list(tmp_path.iterdir())  # nothing prepared before the first study is asked for
    first = next(lazy)
    assert len(list(tmp_path.rglob("*.npz"))) == 3
    rest = list(lazy)
    listed = load_split(split, contract, tmp_path, workers=1)
    assert [s.key for s in [first, *rest]] == [s.key for s in listed]
    for a, b in zip([first, *rest], listed, strict=True):
        assert a.resampled_hu.dtype == np.float32 and np.array_equal(a.resampled_hu, b.resampled_hu)
        assert a.truth == b.truth


def test_phases_of_one_model_keep_their_checkpoints_apart(tmp_path, monkeypatch):
    """The shipped configs' phases: each default run dir is distinct, and each phase's
    init_weights is the run dir its previous phase writes (runs/<run_name or name>)."""
    from pathlib import Path

    import model_zoo.train as train_module

    run_dirs = []
    monkeypatch.setattr(train_module, "train", lambda cfg, out, run_dir, *a: run_dirs.append(run_dir))
    configs = sorted(Path(train_module.REPO_ROOT / "model_zoo" / "configs").glob("mnv2_a035*.json"))
    for path in configs:
        assert train_module.main(["--config", str(path), "--out", str(tmp_path)]) == 0
    assert len(set(run_dirs)) == len(configs) == len(run_dirs)
    inits = [json.loads(p.read_text())["training"].get("init_weights") for p in configs]
    for init in filter(None, inits):
        assert (train_module.REPO_ROOT / init).parent in run_dirs, init
