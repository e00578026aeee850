"""Keras callbacks for TENGraD and K-FAC.

`StepCounters` puts the optimizer's robustness counters into the training logs, so that `fit`'s
History, the progress bar, CSVLogger and TensorBoard show them next to the loss:

    model.fit(x, y, callbacks=[tengrad_tf.callbacks.StepCounters()])
    history.history["skipped_steps"]     # cumulative, one value per epoch

  skipped_steps     steps whose gradient, direction or curvature was not finite (nothing changed)
  damping_retries   Cholesky factorizations that had to be retried with more damping

Without the callback, the same numbers are `int(optimizer.skipped_steps)` and
`int(optimizer.damping_retries)` at any time.

`Diagnostics` writes what the step rule did to TensorBoard, every `every` steps: the damping λ
(adapted or not), the step's coefficients of the natural-gradient direction and of the previous
step (learning_rate="auto"), the reduction ratio ρ of the damping adaptation, the KL clip's factor,
the direction's norm, the skipped and rejected steps, and each block's condition number of its
damped Gram (per curvature update):

    model.fit(x, y, callbacks=[tengrad_tf.callbacks.Diagnostics("logs/diagnostics")])
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tengrad_tf.preconditioned import PreconditionedOptimizer

COUNTERS = ("skipped_steps", "damping_retries")


class StepCounters(keras.callbacks.Callback):
    """Adds `skipped_steps` and `damping_retries` (cumulative) to the logs at the end of each epoch,
    and of each batch with `every_batch=True` (one small read of two variables per batch)."""

    def __init__(self, every_batch: bool = False):
        super().__init__()
        self.every_batch = bool(every_batch)

    def _optimizer(self):
        return _preconditioned_optimizer(self.model, type(self).__name__)

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


def _preconditioned_optimizer(model, callback: str) -> PreconditionedOptimizer:
    opt = model.optimizer
    opt = getattr(opt, "inner_optimizer", opt)  # LossScaleOptimizer under mixed precision
    if not isinstance(opt, PreconditionedOptimizer):
        raise TypeError(
            f"{callback} reports what TENGraD and KFAC do; the model's optimizer is "
            f"{type(opt).__name__}. Remove the callback or compile with TENGraD()/KFAC().")
    return opt


class Diagnostics(keras.callbacks.Callback):
    """TensorBoard scalars of the step rule (see the module docstring), under `log_dir`, every
    `every` training steps, also added to the batch logs. The per-step extras (KL factor,
    direction norm, condition numbers) cost a few ops per step and are only built while this
    callback is attached: the train step is retraced when it was traced without them."""

    def __init__(self, log_dir: str | None = None, every: int = 1):
        super().__init__()
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"invalid every={every!r}; expected an int >= 1.")
        self.log_dir = log_dir
        self.every = every
        self._writer = None

    def on_train_begin(self, logs=None):
        opt = _preconditioned_optimizer(self.model, type(self).__name__)
        if not opt._diagnostics:
            opt._diagnostics = True
            for block in opt._blocks.values():  # blocks made later take it from the optimizer
                block.diagnostics = True
            if self.model.train_function is not None:
                self.model.make_train_function(force=True)
        if self.log_dir and self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_train_batch_end(self, batch, logs=None):
        opt = _preconditioned_optimizer(self.model, type(self).__name__)
        step = int(opt.iterations.numpy())
        if step % self.every:
            return
        values = opt.diagnostics()
        if logs is not None:
            logs.update(values)
        if self._writer is not None:
            with self._writer.as_default(step=step):
                for name, value in values.items():
                    tf.summary.scalar(f"tengrad/{name}", value)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()
