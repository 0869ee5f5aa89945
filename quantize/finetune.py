"""Fine-tuning shared by pruning, QAT and PQAT: distillation from the float model.

The compressed model learns to reproduce the float model's class-activation map
(mean squared error on the ``cam`` logits above a background floor, and on the map's
maximum) on augmented training slices, rather than the labels again. That pins
exactly what the app uses - the probability is the sigmoid of the cam's maximum,
and the cam itself is the heatmap - so the card's
threshold (chosen for the float model) stays valid and decisions rarely flip. It
also does not depend on how the float model was trained (crops, auxiliary heads).

The student trains with its BatchNorm layers on their moving statistics and dropout
off (``run_as_at_inference``): it must learn the function the app runs, not a
training-mode variant of it.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

from model_zoo.architectures import CAM  # noqa: E402

log = logging.getLogger(__name__)
LOG_EVERY = 50


class _LossLog(tf_keras.callbacks.Callback):
    """Running mean of the loss, logged every ``LOG_EVERY`` steps and kept for the report."""

    def __init__(self, label: str, steps: int):
        super().__init__()
        self.label, self.steps, self.losses = label, steps, []

    def on_train_batch_end(self, batch, logs=None):
        # Keras reports the running mean over the epoch so far.
        if (batch + 1) % LOG_EVERY == 0 or batch + 1 == self.steps:
            self.losses.append(round(float(logs["loss"]), 6))
            log.info("%s: step %d/%d, mean loss %.5f", self.label, batch + 1, self.steps, logs["loss"])


# Cells below this logit (probability < 0.25%) are background for every use of the cam: the
# max pooling, the heatmap and the findings. The float model spreads them over about -20..-5
# (model 1.2.0 before its calibration z -> 0.69 z - 2.0: -25..-5), and an unfloored MSE spent
# the compressed model's capacity on matching those exact values.
CAM_LOGIT_FLOOR = -6.0


def floored_mse(floor: float):
    """Mean squared error between logits (per example, over all other axes), both raised to ``floor``
    first: a student cell below the floor where the teacher's is too costs nothing, whatever the exact values."""
    def loss(y_true, y_pred):
        squared = tf.square(tf.maximum(y_true, floor) - tf.maximum(y_pred, floor))
        return tf.reduce_mean(tf.reshape(squared, (tf.shape(squared)[0], -1)), axis=1)

    return loss


# The slice probability is the sigmoid of the cam's strongest cell: matching that one logit is
# what keeps study rankings (AUC) and decisions, so it is a second target beside the whole map.
CAM_MAX = "cam_max"


def run_as_at_inference(model: tf_keras.Model) -> tf_keras.Model:
    """Make ``model`` compute in training the same function as at inference: BatchNorm on its
    moving statistics (and not updating them), dropout off. Works through pruning and QAT wrappers.

    In training mode BatchNorm would normalise by the statistics of each batch of full slices
    (mostly air, table and soft tissue), not those the float model was trained and is used with:
    the float model in training mode is already a floored MSE of 2-3.5 away from itself at
    inference, and the compressed students learnt that distorted function, then collapsed at
    inference (constant "no lesion" after 85% pruning).
    """
    for layer in model.layers:
        inner = getattr(layer, "layer", layer)
        if isinstance(inner, tf_keras.layers.BatchNormalization):
            inner.trainable = False  # Keras 2: a frozen BatchNorm runs in inference mode
        elif isinstance(inner, tf_keras.layers.Dropout):
            inner.rate = 0.0
    return model


def fine_tune(
    model: tf_keras.Model,
    teacher: tf_keras.Model,
    dataset: tf.data.Dataset,
    steps: int,
    learning_rate: float,
    label: str,
    callbacks: tuple = (),
) -> list[float]:
    """Train ``model`` in place for ``steps`` batches towards ``teacher``'s cam logits.

    ``dataset`` yields ``(image, targets)`` (the training pipeline's batches; its label
    targets are replaced by the teacher's cam). Returns the running mean loss every
    LOG_EVERY steps. The teacher runs in inference mode and is never updated; the student's
    BatchNorm and dropout are set to inference behaviour first (``run_as_at_inference``).
    """
    run_as_at_inference(model)

    def distill(image, _targets):
        cam = teacher(image, training=False)[1]
        return image, {CAM: cam, CAM_MAX: tf.reduce_max(cam, axis=[1, 2, 3])[:, None]}

    # A cam-only view of the student (tfmot may have renamed its output layers, e.g. quant_cam),
    # plus the cam's maximum; the extra pooling layer is the trainer's, not the exported model's.
    cam = model.outputs[1]
    cam_max = tf_keras.layers.GlobalMaxPooling2D(name=f"{label}_{CAM_MAX}")(cam)
    trainer = tf_keras.Model(model.inputs, {CAM: cam, CAM_MAX: cam_max}, name=f"{model.name}_trainer")
    loss = floored_mse(CAM_LOGIT_FLOOR)
    trainer.compile(optimizer=tf_keras.optimizers.Adam(learning_rate), loss={CAM: loss, CAM_MAX: loss})
    history = _LossLog(label, steps)
    trainer.fit(dataset.map(distill), steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[*callbacks, history])
    return history.losses
