"""The layer-agnostic core of a preconditioned Keras optimizer: binding, the step rule, state.

TENGraD and the K-FAC baseline differ only in their curvature blocks; everything else is here once.
One step (see docs/DESIGN.md):
  1. dₗ = (Fₗ + λI)⁻¹ gₗ for each preconditioned block ℓ (kernel and bias together); every other
     variable gets d = g, and `summary()` says which and why.
  2. KL clipping: ν = min(1, sqrt(κ / (lr² Σₗ ⟨dₗ, gₗ⟩))), d ← ν d.
  3. Momentum and decoupled weight decay, as Keras's SGD does them: buf ← μ buf + d,
     θ ← θ − lr·wd·θ, θ ← θ − lr·buf.
When a block refreshes its curvature is the block's business (its schedule): the core hands it the
step number and this step's captured inputs and output gradients, and asks for directions.

A step whose direction or curvature is not finite changes nothing (weights, momentum, cached
curvature and the iteration counter stay as they were) and is counted in `skipped_steps`.

The block interface (duck-typed; `tengrad_tf.blocks.FisherBlock` is the reference implementation):
  variables                          the layer's [kernel, bias?], in this order
  describe(input_shape) -> str       one line for `summary()`
  curvature(step, inputs, output_grads) -> (state: dict of tensors, retries: int32 tensor)
                                     fresh or cached curvature, by the block's own schedule
  precondition(grads, state) -> directions
  needs_output_grads(step, inputs) -> bool tensor
                                     whether `curvature` will use this step's output gradients
  commit(step, state)                keep `state` (called only when the whole step is finite)

What this module does not do: capture (capture.py), curvature math (blocks/, kfac.py), the solve
(woodbury.py), label sampling (fisher.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import keras
import tensorflow as tf
from keras import ops

from tengrad_tf import _tf_private, capture, fisher

logger = logging.getLogger("tengrad_tf")

FIRST_ORDER_OTHER = (
    "first-order: no preconditioned layer owns it (BatchNormalization, LayerNormalization, "
    "Embedding, DepthwiseConv2D, custom layers, ...), or its layer did not run in the step"
)


class BindingError(RuntimeError):
    """The optimizer could not find the layers of the variables it was asked to update."""


class PreconditionedOptimizer(keras.optimizers.Optimizer):
    """Base class: a Keras optimizer whose Dense/Conv blocks are preconditioned by curvature blocks.

    Subclasses provide `_make_block(layer)` and their own hyperparameters. Arguments shared by all:
    learning_rate, momentum, weight_decay, fisher, kl_clip, max_consecutive_skips, seed, and every
    standard Keras optimizer argument (see TENGraD for their meaning).
    """

    def __init__(self, learning_rate, momentum, weight_decay, fisher, kl_clip,
                 max_consecutive_skips, seed, clipnorm, clipvalue, global_clipnorm, use_ema,
                 ema_momentum, ema_overwrite_frequency, loss_scale_factor,
                 gradient_accumulation_steps, name, **kwargs):
        validate_common(locals())
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=None,
            name=name,
            **kwargs,
        )
        self.momentum = float(momentum)
        self.fisher = fisher
        self.kl_clip = None if kl_clip is None else float(kl_clip)
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.seed = seed
        self._blocks: dict[int, Any] = {}
        self._treatments: dict[str, str] = {}
        # Capture must be active before the first trace of the train step, and the optimizer is
        # created before `compile`, so this is the place.
        capture.install()

    def _make_block(self, layer):
        """The curvature block of a supported layer: the one method every subclass overrides
        (TENGraD's exact blocks, K-FAC's Kronecker blocks)."""
        raise TypeError(f"{type(self).__name__} does not define its curvature blocks (_make_block)")

    # ---- state -------------------------------------------------------------------------------
    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._momentums = self.add_optimizer_variables(var_list, "momentum")
        self.skipped_steps = self.add_variable((), initializer="zeros", dtype="int64",
                                               name="skipped_steps")
        self.consecutive_skips = self.add_variable((), initializer="zeros", dtype="int64",
                                                   name="consecutive_skips")
        self.damping_retries = self.add_variable((), initializer="zeros", dtype="int64",
                                                 name="damping_retries")

    def update_step(self, gradient, variable, learning_rate):
        """Momentum on the (already preconditioned and clipped) direction `gradient`."""
        lr = ops.cast(learning_rate, variable.dtype)
        d = ops.cast(gradient, variable.dtype)
        if self.momentum == 0.0:
            self.assign_sub(variable, ops.multiply(d, lr))
            return
        buf = self._momentums[self._get_variable_index(variable)]
        self.assign(buf, ops.add(ops.multiply(buf, self.momentum), d))
        self.assign_sub(variable, ops.multiply(buf, lr))

    # ---- the step ----------------------------------------------------------------------------
    def apply(self, grads, trainable_variables=None):
        if trainable_variables is None:
            if not self.built:
                raise ValueError(f"{self.name}.apply without variables needs a built optimizer.")
            trainable_variables = self._trainable_variables
        trainable_variables = list(trainable_variables)
        grads = list(grads)
        if not self.built:
            self.build(trainable_variables)
        record = capture.consume()
        blocks = self._bind(record, trainable_variables, grads)
        # Keras unscales by loss_scale_factor inside super().apply; the curvature and the KL clip
        # need the true gradient, so unscale here and scale the direction back for Keras.
        scale = self.loss_scale_factor or 1.0
        if scale != 1.0:
            grads = [None if g is None else g / scale for g in grads]
        step = self.iterations
        # Whether any block refreshes its curvature this step: gates the true Fisher's sampled
        # backward pass and the finiteness check of the curvature.
        fresh = tf.reduce_any([b.needs_output_grads(step, [c.inputs for c in calls])
                               for b, calls in blocks] or [False])
        output_grads = self._output_gradients(record, blocks, scale, fresh)

        directions = list(grads)
        index = {id(v): i for i, v in enumerate(trainable_variables)}
        retries = []
        stores = []
        for block, calls in blocks:
            ids = [index[id(v)] for v in block.variables]
            if any(grads[i] is None for i in ids):
                continue
            inputs = [c.inputs for c in calls]
            outs = output_grads[id(block)]
            curvature, tries = block.curvature(step, inputs, outs)
            retries.append(tries)
            stores.append((block, curvature))
            for i, d in zip(ids, block.precondition([grads[i] for i in ids], curvature)):
                directions[i] = d
        directions = self._kl_clip(directions, grads)

        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(d)) for d in directions
                                if d is not None])
        # Cached curvature was stored only when finite, so only fresh curvature needs the check
        # (on a 3C1F reuse step it would read a 75 MB per-sample-gradient cache for nothing).
        curvature_finite = tf.cond(fresh, lambda: tf.reduce_all(
            [tf.reduce_all(tf.math.is_finite(t)) for _, c in stores for t in c.values()] or [True]),
            lambda: tf.constant(True))
        finite = tf.logical_and(finite, curvature_finite)

        def take_step():
            for block, curvature in stores:
                block.commit(step, curvature)
            if retries:
                self.damping_retries.assign_add(tf.cast(tf.add_n(retries), "int64"))
            self.consecutive_skips.assign(0)
            # Keras divides by loss_scale_factor again inside apply.
            scaled = directions if scale == 1.0 else [None if d is None else d * scale
                                                      for d in directions]
            super(PreconditionedOptimizer, self).apply(scaled, trainable_variables)

        def skip_step():
            self.skipped_steps.assign_add(1)
            self.consecutive_skips.assign_add(1)
            tf.debugging.assert_less(
                self.consecutive_skips, tf.constant(self.max_consecutive_skips, "int64"),
                message=(f"{type(self).__name__}: {self.max_consecutive_skips} steps in a row had a "
                         "non-finite gradient, direction or curvature; the weights were left "
                         "untouched. Check the data and the loss, or lower the learning rate / raise "
                         "the damping."))

        ops.cond(finite, take_step, skip_step)

    def _kl_clip(self, directions, grads):
        if self.kl_clip is None:
            return directions
        # Reduce in the variables' dtype, then combine the per-variable scalars in float64.
        vdg = tf.add_n([tf.cast(tf.reduce_sum(d * tf.cast(g, d.dtype)), tf.float64)
                        for d, g in zip(directions, grads) if d is not None])
        lr = tf.cast(self.learning_rate, tf.float64)
        # ⟨d, g⟩ > 0 in exact arithmetic (F + λI is positive definite); the floor only keeps a
        # rounding-level value from turning into a division by zero.
        nu = tf.minimum(tf.constant(1.0, tf.float64),
                        tf.sqrt(self.kl_clip / (lr * lr * tf.maximum(vdg, 1e-30))))
        return [None if d is None else d * tf.cast(nu, d.dtype) for d in directions]

    # ---- binding -----------------------------------------------------------------------------
    def _bind(self, record: capture.Record, variables, grads) -> list[tuple[Any, list]]:
        """Match this step's captured layer calls to the variables; record every variable's fate."""
        calls_by_layer: dict[int, list[capture.LayerCall]] = {}
        for call in record.layer_calls:
            # Only calls on the path of the differentiated loss belong to this step (not, say, a
            # forward pass for a metric); the training backward pass marks them in both modes.
            if call.output_grad is not None:
                calls_by_layer.setdefault(id(call.layer), []).append(call)
        owned = {id(v) for v in variables}
        pairs = []
        treatments = {}
        for calls in calls_by_layer.values():
            layer = calls[0].layer
            if not all(id(v) in owned for v in [layer.kernel] + ([layer.bias] if layer.bias is not None else [])):
                continue  # a layer of another model, or frozen weights in a trainable layer
            block = self._blocks.get(id(layer))
            if block is None:
                block = self._blocks[id(layer)] = self._make_block(layer)
            _check_same_batch(layer, calls)
            pairs.append((block, calls))
            text = block.describe(calls[0].inputs.shape)
            if len(calls) > 1:
                text += f"; called {len(calls)} times per step, contributions summed exactly"
            for v in block.variables:
                treatments[v.path] = text
        skipped = {id(v): reason for layer, reason in record.skipped for v in layer.trainable_weights}
        for v, g in zip(variables, grads):
            if v.path in treatments:
                continue
            if id(v) in skipped:
                treatments[v.path] = f"first-order: {skipped[id(v)]}"
            elif g is None:
                treatments[v.path] = "not updated: no gradient"
            else:
                treatments[v.path] = FIRST_ORDER_OTHER
        self._treatments = {v.path: treatments[v.path] for v in variables}
        if not pairs and any(g is not None for g in grads):
            raise BindingError(
                f"{type(self).__name__} found no layer to precondition among the variables it was given "
                f"({len(variables)} variables, {len(record.layer_calls)} captured layer calls). "
                "Dense and Conv1D/Conv2D layers are preconditioned; the forward pass, the loss "
                "gradient and apply_gradients must run in the same tf.function (model.fit does "
                "this) or all eagerly, and the optimizer must exist before the model is "
                "first called for training. For models without such layers, use a first-order "
                "optimizer."
            )
        first_order = [p for p, t in self._treatments.items() if t.startswith("first-order")]
        if first_order:
            logger.warning("%s: %d of %d variables are first-order (d = g): %s. "
                           "optimizer.summary() lists why.", type(self).__name__, len(first_order),
                           len(self._treatments), ", ".join(first_order))
        return pairs

    def _output_gradients(self, record, pairs, loss_scale, fresh) -> dict[int, list[tf.Tensor]]:
        """Per-sample output gradients Gᵢ = ∂ℓᵢ/∂zᵢ for every captured call, per block."""
        if not pairs:
            return {}
        if self.fisher == fisher.EMPIRICAL:
            factor = _batch_mean_factor(record)
            # The backward pass gives wᵢ·∂ℓᵢ/∂zᵢ for a weighted loss; the Fisher weights samples as
            # the loss does, F = (1/m) Σ wᵢ uᵢuᵢᵀ, so the rows are rescaled by 1/√wᵢ.
            root_w = _root_sample_weight(record)
            return {id(b): [_weighted_rows(c.output_grad * tf.cast(factor(c) / loss_scale,
                                                                   c.output_grad.dtype),
                                           root_w, divide=True)
                            for c in calls] for b, calls in pairs}
        if not record.loss_calls:
            raise BindingError(
                "fisher='true' needs to see the loss to sample labels from the model's predictions, "
                "but no keras.losses.Loss was called in this step. Compute the loss with a Keras "
                "Loss object (model.compile(loss=...) does) in the same tf.function, or use "
                "fisher='empirical'."
            )
        if tf.executing_eagerly():
            raise BindingError(
                "fisher='true' needs the forward pass and apply_gradients in one tf.function "
                "(model.fit does this unless run_eagerly=True). Wrap the custom train step in "
                "tf.function, or use fisher='empirical'."
            )
        for call in record.loss_calls:
            fisher.check_supported(call.loss)
        flat = [c for _, calls in pairs for c in calls]
        # The sampled backward pass is needed only on steps where some block refreshes its
        # curvature (1 in curvature_update_freq). A tf.cond cannot hold it (the gradient of tensors
        # computed outside a branch does not exist inside it), so the pass is gated with dataflow
        # Switch/Merge instead: on other steps its ops receive a dead tensor and do not run.
        gate = None if _tf_private.in_xla_context() else fresh
        loss_calls = record.loss_calls if gate is None else [
            dataclasses.replace(c, y_pred=tf.nest.map_structure(
                lambda t: tf.raw_ops.Switch(data=t, pred=gate)[1], c.y_pred))
            for c in record.loss_calls]
        record.frozen = True  # the identities keep the training gradients they hold
        try:
            sampled = fisher.sampled_loss_sum(loss_calls, self.seed)
            grads = tf.gradients(sampled, [c.preactivation for c in flat])
        finally:
            record.frozen = False
        if gate is not None:
            # Merge takes whichever input is alive: the sampled gradient, or zeros when gated off.
            grads = [g if g is None else tf.raw_ops.Merge(
                inputs=[tf.raw_ops.Switch(data=tf.zeros_like(g), pred=gate)[0], g])[0]
                for g in grads]
        by_call = {id(c): (tf.zeros_like(c.preactivation) if g is None else g)
                   for c, g in zip(flat, grads)}
        return {id(b): [by_call[id(c)] for c in calls] for b, calls in pairs}

    # ---- reporting ---------------------------------------------------------------------------
    def treatments(self) -> dict[str, str]:
        """{variable path: how the last traced step treated it}. Empty before the first step."""
        return dict(self._treatments)

    def summary(self, print_fn=print) -> str:
        """A table of every trainable variable and its treatment (block, or first-order and why)."""
        if not self._treatments:
            text = f"{type(self).__name__}: not bound yet (the treatment of each variable is known after one step)."
        else:
            width = max(len(p) for p in self._treatments)
            lines = [f"{'variable'.ljust(width)}  treatment"]
            lines += [f"{p.ljust(width)}  {t}" for p, t in self._treatments.items()]
            text = "\n".join(lines)
        if print_fn:
            print_fn(text)
        return text

    # ---- config ------------------------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.pop("gradient_accumulation_steps", None)
        config.update({
            "momentum": self.momentum,
            "fisher": self.fisher,
            "kl_clip": self.kl_clip,
            "max_consecutive_skips": self.max_consecutive_skips,
            "seed": self.seed,
        })
        return config


def _batch_mean_factor(record: capture.Record):
    """m·R for losses averaged over the batch (Keras's default), 1·R for summed ones.

    ∂ℓᵢ/∂zᵢ = m · (∂L/∂z)ᵢ when L is the batch mean; under tf.distribute Keras also divides the
    loss by the R replicas in sync.
    """
    summed = any(getattr(c.loss, "reduction", None) == "sum" for c in record.loss_calls)
    replica = tf.distribute.get_replica_context()
    replicas = replica.num_replicas_in_sync if replica is not None else 1

    def factor(call):
        m = 1 if summed else tf.shape(call.output_grad)[0]
        return tf.cast(m * replicas, tf.float32)

    return factor


def _root_sample_weight(record: capture.Record):
    """√wᵢ of the step's per-sample loss weights (None if unweighted).

    Keras passes `sample_weight` (and `class_weight`, converted) to the loss. With several weighted
    losses the training backward pass mixes their weights in each layer's output gradient, which
    cannot be undone per loss: that case is refused rather than silently mis-weighted.
    """
    weighted = [c for c in record.loss_calls if c.sample_weight is not None]
    if not weighted:
        return None
    if len(weighted) > 1:
        raise BindingError(
            f"{len(weighted)} weighted losses in one step: fisher='empirical' cannot separate "
            "their sample weights in the output gradients. Use fisher='true' (it weights each "
            "output's sampled loss), or a single weighted loss.")
    return fisher.root_weights(weighted[0].sample_weight)


def _weighted_rows(g, root_w, divide: bool):
    if root_w is None:
        return g
    root_w = tf.reshape(tf.cast(root_w, g.dtype), [-1] + [1] * (g.shape.rank - 1))
    return tf.math.divide_no_nan(g, root_w) if divide else g * root_w


def _check_same_batch(layer, calls):
    sizes = {c.inputs.shape[0] for c in calls}
    if len(calls) > 1 and None not in sizes and len(sizes) > 1:
        raise BindingError(
            f"Layer '{layer.name}' was called {len(calls)} times in one step on batches of "
            f"different sizes {sorted(sizes)}; its per-sample gradients are undefined. Call it "
            "once per sample, or exclude it from TENGraD by freezing it."
        )


def check(name: str, value, ok: bool, allowed: str):
    """Raise ValueError naming the argument, its value and what is allowed."""
    if not ok:
        raise ValueError(f"invalid {name}={value!r}; {allowed}.")


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_int(x, low: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def validate_common(args: dict[str, Any]) -> None:
    """Check the hyperparameters every preconditioned optimizer shares."""
    lr = args["learning_rate"]
    check("learning_rate", lr,
          callable(lr) or isinstance(lr, keras.optimizers.schedules.LearningRateSchedule)
          or (is_number(lr) and lr > 0), "expected a float > 0, a LearningRateSchedule or a callable")
    mu = args["momentum"]
    check("momentum", mu, is_number(mu) and 0 <= mu < 1, "expected a float in [0, 1)")
    wd = args["weight_decay"]
    check("weight_decay", wd, wd is None or (is_number(wd) and wd >= 0),
          "expected None or a float >= 0")
    check("fisher", args["fisher"], args["fisher"] in fisher.FISHER_TYPES,
          f"expected one of {fisher.FISHER_TYPES}")
    kl = args["kl_clip"]
    check("kl_clip", kl, kl is None or (is_number(kl) and kl > 0), "expected None or a float > 0")
    check("max_consecutive_skips", args["max_consecutive_skips"],
          is_int(args["max_consecutive_skips"], 1), "expected an int >= 1")
    gas = args["gradient_accumulation_steps"]
    check("gradient_accumulation_steps", gas, gas is None,
          "the curvature is that of one batch, so gradient accumulation is not supported; "
          "use a larger batch_size instead")
