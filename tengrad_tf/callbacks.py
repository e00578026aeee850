"""Keras callbacks for TENGraD and K-FAC.

`StepCounters` puts the optimizer's robustness counters into the training logs, so that `fit`'s
History, the progress bar, CSVLogger and TensorBoard show them next to the loss:

    model.fit(x, y, callbacks=[tengrad_tf.callbacks.StepCounters()])
    history.history["skipped_steps"]     # cumulative, one value per epoch

  skipped_steps     steps whose gradient, direction or curvature was not finite (nothing changed)
  damping_retries   Cholesky factorizations that had to be retried with more damping

Without the callback, the same numbers are `int(optimizer.skipped_steps)` and
`int(optimizer.damping_retries)` at any time.
"""

from __future__ import annotations

import keras

from tengrad_tf.preconditioned import PreconditionedOptimizer

COUNTERS = ("skipped_steps", "damping_retries")


class StepCounters(keras.callbacks.Callback):
    """Adds `skipped_steps` and `damping_retries` (cumulative) to the logs at the end of each epoch,
    and of each batch with `every_batch=True` (one small read of two variables per batch)."""

    def __init__(self, every_batch: bool = False):
        super().__init__()
        self.every_batch = bool(every_batch)

    def _optimizer(self):
        opt = self.model.optimizer
        opt = getattr(opt, "inner_optimizer", opt)  # LossScaleOptimizer under mixed precision
        if not isinstance(opt, PreconditionedOptimizer):
            raise TypeError(
                f"StepCounters reports the counters of TENGraD and KFAC; the model's optimizer is "
                f"{type(opt).__name__}. Remove the callback or compile with TENGraD()/KFAC().")
        return opt

    def on_train_begin(self, logs=None):
        self._optimizer()

    def _add(self, logs):
        if logs is None:
            return
        opt = self._optimizer()
        if not opt.built:  # the counters are created with the optimizer's state
            return
        for name in COUNTERS:
            logs[name] = int(getattr(opt, name).numpy())

    def on_train_batch_end(self, batch, logs=None):
        if self.every_batch:
            self._add(logs)

    def on_epoch_end(self, epoch, logs=None):
        self._add(logs)
