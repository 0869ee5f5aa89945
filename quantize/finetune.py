"""Fine-tuning shared by pruning, QAT and PQAT: distillation from the float model.

The compressed model learns to reproduce the float model's class-activation map
(mean squared error on the ``cam`` logits above a background floor) on augmented training slices, rather
than the labels again. That pins exactly what the app uses - the probability is
the sigmoid of the cam's maximum, and the cam itself is the heatmap - so the card's
threshold (chosen for the float model) stays valid and decisions rarely flip. It
also does not depend on how the float model was trained (crops, auxiliary heads).
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
# max pooling, the heatmap and the findings. The float model spreads them over -25..-5, and an
# unfloored MSE spent the compressed model's capacity on matching those exact values.
CAM_LOGIT_FLOOR = -6.0


def floored_mse(floor: float):
    """Mean squared error between cam logits, both raised to ``floor`` first: a student cell below
    the floor where the teacher's is too costs nothing, whatever the exact values."""
    def loss(y_true, y_pred):
        return tf.reduce_mean(tf.square(tf.maximum(y_true, floor) - tf.maximum(y_pred, floor)), axis=[1, 2, 3])

    return loss


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
    LOG_EVERY steps. The teacher runs in inference mode and is never updated.
    """

    def distill(image, _targets):
        return image, {CAM: teacher(image, training=False)[1]}

    # One-output view of the student: tfmot may have renamed its output layers (quant_cam).
    trainer = tf_keras.Model(model.inputs, {CAM: model.outputs[1]}, name=f"{model.name}_trainer")
    trainer.compile(optimizer=tf_keras.optimizers.Adam(learning_rate), loss={CAM: floored_mse(CAM_LOGIT_FLOOR)})
    history = _LossLog(label, steps)
    trainer.fit(dataset.map(distill), steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[*callbacks, history])
    return history.losses
