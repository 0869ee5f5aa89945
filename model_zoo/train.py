"""Train a 2.5D lytic-lesion classifier on phantom studies.

    python -m model_zoo.train --config model_zoo/configs/mnv2_a035_clean.json [--resume] [--max-minutes M]
                              [--keep best|last]

Writes the calibrated Keras model - the best epoch by validation study AUC, or with
--keep last the last epoch - and a model card to model_zoo/models/<name>/ (or --out).
Checkpoints for --resume live in runs/<name>/ (or the config's run_name).
TFLite variants are added afterwards by ``python -m quantize``.

Exit codes: 0 trained, 2 bad configuration or data.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

from model_zoo.architectures import build_model, inference  # noqa: E402
from model_zoo.calibrate import (  # noqa: E402
    aggregated,
    calibrate,
    calibration_name,
    calibration_split,
    slice_outputs,
)
from model_zoo.card import MODELS_DIR, Aggregation, ModelCard  # noqa: E402
from model_zoo.contract import InputContract, model_input  # noqa: E402
from model_zoo.data import (  # noqa: E402
    CAM,
    CAM_STRIDE,
    LESION_MAP,
    PROBABILITY,
    Augmentation,
    labelled_slices,
    make_train_dataset,
    without_faint_lesions,
)
from model_zoo.dataset import DEFAULT_CACHE, PreparedStudy, load_scoring_split, load_split, split_specs  # noqa: E402
from model_zoo.metrics import auc_with_ci  # noqa: E402

log = logging.getLogger("model_zoo.train")
KEEP_CHOICES = ("best", "last")
LAST_WEIGHTS = "last.weights.h5"  # the trainer's weights after each epoch (a next phase starts from them)
REPO_ROOT = Path(__file__).resolve().parent.parent
KERAS_FILE = "model.keras"


def load_config(path: Path) -> dict:
    cfg = json.loads(Path(path).read_text())
    for key in ("name", "version", "architecture", "data", "training"):
        if key not in cfg:
            raise ValueError(f"config {path} lacks '{key}'")
    return cfg


def contract_of(cfg: dict) -> InputContract:
    return InputContract.from_dict(cfg["contract"]) if "contract" in cfg else InputContract()


def distribution_strategy() -> tuple[tf.distribute.Strategy, str]:
    """(strategy, Keras dtype policy): MirroredStrategy over several GPUs and mixed precision on
    any GPU; the default strategy and float32 on CPU."""
    gpus = tf.config.list_physical_devices("GPU")
    strategy = tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    return strategy, "mixed_float16" if gpus else "float32"


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Keras' global dtype policy is ``name`` inside the block (layers keep the policy they were built with)."""
    previous = tf_keras.mixed_precision.global_policy()
    tf_keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        tf_keras.mixed_precision.set_global_policy(previous)


def predict_study_probabilities(model: tf_keras.Model, studies: list[PreparedStudy], contract: InputContract,
                                aggregation: Aggregation, batch_size: int = 32) -> np.ndarray:
    """Study probabilities from a Keras model, through the same contract and aggregation as the app."""
    return aggregated(slice_outputs(model, studies, contract, batch_size)[0], aggregation)


def mine_hard_negatives(model: tf_keras.Model, studies: list[PreparedStudy], contract: InputContract,
                        top_fraction: float, batch_size: int = 32) -> tuple[np.ndarray, dict]:
    """Where ``model`` fires on lesion-free slices, for hard-negative training.

    Returns rows of (study, slice, row, col) - the strongest cam cell's centre in contract
    pixels - for the ``top_fraction`` of lesion-free slices whose strongest cell is highest,
    and a summary for the card. Whole slices, as the app sees them.
    """
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"hard_negative_top must lie in (0, 1], got {top_fraction}")
    t0 = time.time()
    rows, logits = [], []
    run = inference(model, batch_size)
    for s, study in enumerate(studies):
        negative = np.flatnonzero(study.slice_labels == 0)
        if len(negative):
            inputs = model_input(study.resampled_hu, study.z_mm, study.z_mm[negative], contract)
            cam = run(inputs)[1][..., 0]
            flat = cam.reshape(len(negative), -1)
            cells = np.argmax(flat, axis=1)
            r, c = np.unravel_index(cells, cam.shape[1:])
            rows += [(s, k, CAM_STRIDE * i + CAM_STRIDE // 2, CAM_STRIDE * j + CAM_STRIDE // 2)
                     for k, i, j in zip(negative, r, c, strict=True)]
            logits.append(flat[np.arange(len(negative)), cells])
        if (s + 1) % 50 == 0 or s + 1 == len(studies):
            log.info("mined hard negatives: %d/%d studies", s + 1, len(studies))
    if not rows:
        raise ValueError("no lesion-free slices to mine hard negatives from")
    logits = np.concatenate(logits)
    keep = np.argsort(-logits, kind="stable")[:max(1, int(round(top_fraction * len(logits))))]
    summary = {"slices": int(len(keep)), "of_lesion_free_slices": int(len(logits)),
               "min_logit": round(float(logits[keep].min()), 3), "median_logit_all": round(float(np.median(logits)), 3),
               "seconds": round(time.time() - t0, 1)}
    log.info("hard negatives: %s", summary)
    return np.asarray(rows, dtype=np.int64)[keep], summary


def with_fine_lesion_head(model: tf_keras.Model, stride: int) -> tf_keras.Model:
    """The training view of ``model``: the same layers plus a lesion-map head at ``stride``.

    Deep supervision: the thin early layers of a from-scratch MobileNet learn lesion
    features much sooner from a per-cell target next to them than from the stride-32
    cam alone. The head reads the last feature map at that stride; it is used only in
    training (the saved and exported model is ``model``).
    """
    height, width = model.input_shape[1:3]
    want = (height // stride, width // stride)
    source = [layer for layer in model.layers if tuple(layer.output_shape[1:3]) == want][-1]
    x = tf_keras.layers.Conv2D(32, 3, padding="same", activation="relu", name=f"{LESION_MAP}_conv")(source.output)
    fine = tf_keras.layers.Conv2D(1, 1, name=LESION_MAP, dtype="float32",
                                  bias_initializer=tf_keras.initializers.Constant(-4.0))(x)
    return tf_keras.Model(model.input, [*model.outputs, fine], name=f"{model.name}_training")


def cell_loss(lesion_cell_weight: float):
    """Binary cross-entropy per cam cell (logits), lesion cells weighted ``lesion_cell_weight``.

    About 3% of the cells of a training crop hold a lesion; unweighted, predicting "no lesion"
    everywhere is nearly optimal and the backbone learns little from the few lesion cells.
    """
    def loss(y_true, y_pred):
        per_cell = tf.nn.weighted_cross_entropy_with_logits(y_true, y_pred, lesion_cell_weight)
        return tf.reduce_mean(per_cell, axis=[1, 2, 3])

    return loss


class StudyAUCCheckpoint(tf_keras.callbacks.Callback):
    """Validation study AUC each epoch; keeps the best weights, stops early, saves resumable state."""

    def __init__(self, model: tf_keras.Model, trained: tf_keras.Model, val: list[PreparedStudy],
                 contract: InputContract, aggregation: Aggregation, manager: tf.train.CheckpointManager,
                 state: dict, best_path: Path, patience: int, deadline: float):
        super().__init__()
        self.full, self.trained = model, trained
        self.val, self.contract, self.aggregation = val, contract, aggregation
        self.manager, self.state, self.best_path = manager, state, best_path
        self.patience, self.deadline = patience, deadline
        self.y = np.array([int(s.positive) for s in val])
        self.aucs: list[float] = []  # per epoch of this run

    def validation_auc(self) -> float:
        """Study AUC on the validation split of the weights being trained, as the app would score them."""
        if self.trained is not self.full:
            self.full.set_weights(self.trained.get_weights())
        probs = predict_study_probabilities(self.full, self.val, self.contract, self.aggregation)
        return auc_with_ci(self.y, probs, n_boot=200).value

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        auc = self.validation_auc()
        self.aucs.append(round(auc, 4))
        if logs is not None:
            logs["val_study_auc"] = auc
        self.state["epoch"].assign(epoch + 1)
        improved = auc > float(self.state["best_auc"].numpy()) + 1e-4
        if improved:
            self.state["best_auc"].assign(auc)
            self.state["stale"].assign(0)
            self.full.save_weights(str(self.best_path))
        else:
            self.state["stale"].assign_add(1)
        self.manager.save()
        self.model.save_weights(str(self.best_path.with_name(LAST_WEIGHTS)))  # what a next phase starts from
        log.info("epoch %d: val study AUC %.4f (best %.4f)%s", epoch + 1, auc,
                 float(self.state["best_auc"].numpy()), " *" if improved else "")
        if int(self.state["stale"].numpy()) >= self.patience:
            log.info("early stopping: no AUC gain for %d epochs", self.patience)
            self.model.stop_training = True
        if time.time() > self.deadline:
            log.info("time budget reached; stopping")
            self.model.stop_training = True


def train(cfg: dict, out_dir: Path, run_dir: Path, resume: bool, max_minutes: float | None,
          cache_root: Path = DEFAULT_CACHE, keep: str = "best") -> ModelCard:
    """Train (or continue) a config's run and save its calibrated model and card in ``out_dir``.

    ``keep``: the weights the model gets, "best" (the epoch with the best validation AUC) or
    "last" (the last epoch run).
    """
    if keep not in KEEP_CHOICES:
        raise ValueError(f"keep must be one of {', '.join(KEEP_CHOICES)}, got {keep!r}")
    t0 = time.time()
    tcfg = cfg["training"]
    seed = int(tcfg.get("seed", 0))
    tf_keras.utils.set_random_seed(seed)
    contract = contract_of(cfg)
    aggregation = Aggregation(**cfg.get("aggregation", {}))
    splits = split_specs(cfg, ["train", "val"])

    def progress(name):
        return lambda done, total: log.info("prepared %s studies: %d/%d", name, done, total)

    min_area = float(tcfg.get("min_lesion_area_mm2", 0.0))
    min_px = int(np.ceil(min_area / contract.pixel_spacing_mm ** 2))
    lesion_slices = 0

    def training_view(study: PreparedStudy) -> PreparedStudy:
        nonlocal lesion_slices
        lesion_slices += int((study.slice_labels == 1).sum())
        return without_faint_lesions(study, min_px) if min_area else study

    train_studies = load_split(splits["train"], contract, cache_root, progress=progress("train"), integer_hu=True,
                               transform=training_view)
    val_studies = load_split(splits["val"], contract, cache_root, progress=progress("val"))
    log.info("data ready in %.0f s: %d train / %d val studies", time.time() - t0, len(train_studies), len(val_studies))
    if min_area:
        log.info("lesion cross-sections under %g mm2 dropped: %d of %d lesion slices left as positives",
                 min_area, len(labelled_slices(train_studies)[0]), lesion_slices)

    strategy, policy = distribution_strategy()
    batch = int(tcfg.get("batch_size", 32)) * strategy.num_replicas_in_sync
    steps = int(tcfg.get("steps_per_epoch", 200))
    epochs = int(tcfg.get("epochs", 10))
    crop = tuple(tcfg["crop"]) if tcfg.get("crop") else None
    fine_stride = int(tcfg.get("fine_lesion_map_stride", 0)) or None
    with dtype_policy(policy), strategy.scope():
        def build(shape):
            return build_model(cfg["architecture"], shape, alpha=float(cfg.get("alpha", 0.35)),
                               dropout=float(cfg.get("dropout", 0.2)), name=cfg["name"])

        # The same layers at the contract size (validation, export) and at the crop size (training).
        model = build(contract.input_shape)
        trained = build((*crop, contract.channels)) if crop else model
        trainer = with_fine_lesion_head(trained, fine_stride) if fine_stride else trained
        schedule = tf_keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=float(tcfg.get("learning_rate", 2e-3)) * 0.05,
            decay_steps=max(1, steps * epochs - int(tcfg.get("warmup_steps", 100))),
            warmup_target=float(tcfg.get("learning_rate", 2e-3)),
            warmup_steps=int(tcfg.get("warmup_steps", 100)), alpha=0.02)
        optimizer = tf_keras.optimizers.AdamW(learning_rate=schedule, weight_decay=float(tcfg.get("weight_decay", 1e-4)))
        # Slice labels alone are too weak a signal for a from-scratch network and lesions of a
        # few pixels: every cam cell is also trained on the lesion mask at 1/32 resolution.
        cells = cell_loss(float(tcfg.get("lesion_cell_weight", 1.0)))
        loss_fns = {PROBABILITY: tf_keras.losses.BinaryCrossentropy(), CAM: cells}
        weights = {PROBABILITY: 1.0, CAM: float(tcfg.get("lesion_map_weight", 1.0))}
        if fine_stride:
            loss_fns[LESION_MAP], weights[LESION_MAP] = cells, weights[CAM]
        trainer.compile(optimizer=optimizer, loss=loss_fns, loss_weights=weights,
                        metrics={PROBABILITY: [tf_keras.metrics.AUC(name="auc")]})
        if tcfg.get("init_weights"):  # a previous phase (e.g. crop training) this run continues from
            init = Path(tcfg["init_weights"])
            init = init if init.is_absolute() else REPO_ROOT / init
            if not init.is_file():
                raise ValueError(f"init_weights {init} not found (run the config's previous phase first)")
            trainer.load_weights(str(init), by_name=True)
            log.info("initialised from %s", init)
        hard_fraction = float(tcfg.get("hard_negative_fraction", 0.0))
        hard_negatives, mining = None, None
        if hard_fraction:
            # Mined once, from the starting weights (also on --resume), so a resumed run sees the same data.
            if not tcfg.get("init_weights"):
                raise ValueError("hard_negative_fraction needs init_weights: hard negatives are mined with a trained model")
            model.set_weights(trained.get_weights())
            hard_negatives, mining = mine_hard_negatives(model, train_studies, contract,
                                                         float(tcfg.get("hard_negative_top", 0.2)))
        state = {"epoch": tf.Variable(0, dtype=tf.int64), "best_auc": tf.Variable(-1.0, dtype=tf.float64),
                 "stale": tf.Variable(0, dtype=tf.int64)}
        ckpt = tf.train.Checkpoint(model=trainer, optimizer=optimizer, **state)
    run_dir.mkdir(parents=True, exist_ok=True)
    manager = tf.train.CheckpointManager(ckpt, str(run_dir / "ckpt"), max_to_keep=2)
    best_path = run_dir / "best.weights.h5"
    if resume and manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint).expect_partial()
        log.info("resumed from %s at epoch %d", manager.latest_checkpoint, int(state["epoch"].numpy()))
    elif resume:
        log.info("nothing to resume in %s; starting fresh", run_dir)
    deadline = t0 + 60 * max_minutes if max_minutes else float("inf")
    callback = StudyAUCCheckpoint(model, trained, val_studies, contract, aggregation, manager, state, best_path,
                                  int(tcfg.get("patience", 4)), deadline)
    start_epoch = int(state["epoch"].numpy())
    # A resumed run continues the example stream where it stopped instead of replaying it.
    ds = make_train_dataset(train_studies, contract, batch, Augmentation.from_dict(cfg.get("augmentation", {})),
                            seed=seed, positive_fraction=float(tcfg.get("positive_fraction", 0.35)), crop=crop,
                            fine_stride=fine_stride, osteoporotic_fraction=tcfg.get("osteoporotic_fraction"),
                            hard_negatives=hard_negatives, hard_negative_fraction=hard_fraction,
                            first_example=start_epoch * steps * batch)
    start_auc = None
    if tcfg.get("init_weights") and start_epoch == 0:
        # A phase must start where the previous one ended: a wrong or stale init_weights file shows here.
        start_auc = round(callback.validation_auc(), 4)
        log.info("starting weights: val study AUC %.4f", start_auc)
    losses: list[float] = []
    if start_epoch < epochs:
        history = trainer.fit(ds, epochs=epochs, initial_epoch=start_epoch, steps_per_epoch=steps,
                            callbacks=[callback], verbose=1 if sys.stderr.isatty() else 2)
        losses = [round(float(v), 5) for v in history.history["loss"]]
    if keep == "last":  # the trainer's file: it may hold training-only heads and crop-sized inputs, hence by name
        model.load_weights(str(best_path.with_name(LAST_WEIGHTS)), by_name=True)
    else:
        model.load_weights(str(best_path))
    if policy != "float32":
        # The app and the compression tools take float32 models. Mixed precision keeps its
        # variables in float32, so a float32 copy (built outside the strategy) loses nothing.
        mixed, model = model, build(contract.input_shape)
        model.set_weights(mixed.get_weights())
    train_seconds = time.time() - t0

    # Over-confident raw probabilities are rescaled in the weights (see model_zoo.calibrate);
    # the threshold is chosen on the calibrated probabilities of the calibration split (default: validation).
    calibration_spec = calibration_split(cfg)
    calibration_studies = val_studies if calibration_spec.name == "val" else (  # loaded only now: training does not hold it
        load_scoring_split(calibration_spec, contract, cache_root))
    calibration = calibrate(model, calibration_studies, contract, aggregation,
                            float(cfg.get("threshold_min_sensitivity", 0.95)), calibration_name(calibration_spec))
    threshold = calibration["threshold"]
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(str(out_dir / KERAS_FILE))
    card = ModelCard(
        name=cfg["name"], version=cfg["version"], architecture=cfg["architecture"], contract=contract,
        threshold=threshold, aggregation=aggregation, description=cfg.get("description", ""),
        keras_file=KERAS_FILE,
        metrics={"validation": {"auc": calibration["val_auc"],
                                "threshold_rule": f"highest threshold with validation sensitivity >= "
                                                  f"{cfg.get('threshold_min_sensitivity', 0.95)}"}},
        training={"config": cfg, "seed": seed, "epochs_run": int(state["epoch"].numpy()),
                  "best_val_study_auc": round(float(state["best_auc"].numpy()), 4), "epoch_losses": losses,
                  "weights": "last epoch" if keep == "last" else "best validation epoch",
                  "epoch_val_study_auc": callback.aucs, "calibration": calibration,
                  **({"start_val_study_auc": start_auc} if start_auc is not None else {}),
                  **({"hard_negatives": mining} if mining else {}),
                  "train_seconds": round(train_seconds, 1), "device": "GPU" if tf.config.list_physical_devices("GPU") else "CPU",
                  "replicas": strategy.num_replicas_in_sync, "dtype_policy": policy,
                  "tensorflow": tf.__version__},
    )
    card.folder = out_dir
    card.record_hashes()
    card.save(out_dir)
    log.info("saved %s (threshold %.4f, val AUC %.4f) in %.0f s", out_dir, threshold,
             card.metrics["validation"]["auc"], train_seconds)
    return card


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model_zoo.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path, help="training config JSON (model_zoo/configs/)")
    p.add_argument("--out", type=Path, default=None, help="model folder (default: model_zoo/models/<name>)")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="checkpoints for --resume (default: runs/<run_name>, else runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the run dir")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this wall time (data prep included)")
    p.add_argument("--keep", choices=KEEP_CHOICES, default="best",
                   help="the weights the model gets: the epoch with the best validation AUC (default) or the last "
                        "epoch (when the validation split is too small to pick an epoch). With --resume after the "
                        "run has ended, nothing trains: the model is exported and calibrated again")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="prepared-study cache (default: %(default)s)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.out or MODELS_DIR / cfg["name"]
    # Phases that ship under one model name keep their checkpoints apart through "run_name".
    run_dir = args.run_dir or REPO_ROOT / "runs" / cfg.get("run_name", cfg["name"])
    try:
        train(cfg, out, run_dir, args.resume, args.max_minutes, args.cache, args.keep)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
