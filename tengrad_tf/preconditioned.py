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

import collections
import dataclasses
import logging
import math
import random
import threading
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tengrad_tf import _tf_private, adaptive, capture, distribute, fisher, layers, replay
from tengrad_tf.capture import BindingError

logger = logging.getLogger("tengrad_tf")
_WARNING_LOCK = threading.Lock()

# How variables without a block step (`first_order`): Keras's Adam, or the heavy-ball step of the
# preconditioned ones with d = g ("sgd") or d = g/λ ("damped": F = 0, the block's null space).
FIRST_ORDER_ADAM, FIRST_ORDER_SGD, FIRST_ORDER_DAMPED = "adam", "sgd", "damped"
AUTO = "auto"
FIRST_ORDER_RULES = (FIRST_ORDER_ADAM, FIRST_ORDER_SGD, FIRST_ORDER_DAMPED)
ADAM_BETA_1, ADAM_BETA_2, ADAM_EPSILON = 0.9, 0.999, 1e-7
# Bounds of the adapted damping: far outside any useful value, they only stop a runaway.
MIN_DAMPING, MAX_DAMPING = 1e-8, 1e4

FIRST_ORDER_OTHER = "first-order: no layer that ran under the step's GradientTape owns it"


class PreconditionedOptimizer(keras.optimizers.Optimizer):
    """Base class: a Keras optimizer whose layers are preconditioned by curvature blocks.

    Subclasses provide `_make_block(layer)` and their own hyperparameters. Arguments shared by all:
    learning_rate, momentum, weight_decay, fisher, kl_clip, max_consecutive_skips, seed, and every
    standard Keras optimizer argument (see TENGraD for their meaning).
    """

    def __init__(self, learning_rate, momentum, weight_decay, fisher, kl_clip, first_order,
                 first_order_learning_rate, max_consecutive_skips, seed, clipnorm, clipvalue,
                 global_clipnorm, use_ema, ema_momentum, ema_overwrite_frequency,
                 loss_scale_factor, gradient_accumulation_steps, name, **kwargs):
        validate_common(locals())
        # learning_rate="auto": the step's size (and with momentum="auto" its momentum) comes from
        # the quadratic model of the whole preconditioned network (_adaptive_step); Keras's own
        # learning rate is then 1 (it scales decoupled weight decay and nothing else).
        super().__init__(
            learning_rate=1.0 if learning_rate == AUTO else learning_rate,
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
        self.adaptive_learning_rate = learning_rate == AUTO
        self.adaptive_momentum = momentum == AUTO
        self.momentum = 0.0 if self.adaptive_momentum else float(momentum)
        self.fisher = fisher
        self.kl_clip = None if kl_clip is None else float(kl_clip)
        self.first_order = first_order
        self.first_order_learning_rate = float(first_order_learning_rate)
        # lr at construction: the first-order rate follows later changes of the learning rate
        # (a schedule, or a callback setting it) in proportion.
        self._reference_learning_rate = _reference_value(
            1.0 if self.adaptive_learning_rate else learning_rate)
        # Indices of the variables the last traced step gave a first-order step (set by `apply`
        # before Keras's `apply` calls `update_step` in the same trace).
        self._first_order_indices: frozenset[int] = frozenset()
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.seed = seed
        self._blocks: dict[int, Any] = {}
        self._treatments: dict[str, str] = {}
        self._warned_first_order: frozenset[str] = frozenset()
        # Why the damping cannot adapt in the traced step (None: it can, or it is fixed).
        self._no_adaptation: str | None = None
        self.adaptive_damping = False  # TENGraD's option; K-FAC has no exact quadratic model
        self._network = None  # TENGraD's fisher_blocks="network" (blocks/network.py)
        # Extra per-step quantities for callbacks.Diagnostics (set before the step is traced).
        self._diagnostics = False
        self._init_resume_state(seed)
        # Capture must be active before the first trace of the train step, and the optimizer is
        # created before `compile`, so this is the place. It stays installed while this optimizer
        # lives (capture.acquire).
        capture.acquire(self)

    def _make_block(self, layer):
        """The curvature block of a supported layer: the one method every subclass overrides
        (TENGraD's exact blocks, K-FAC's Kronecker blocks)."""
        raise TypeError(f"{type(self).__name__} does not define its curvature blocks (_make_block)")

    def _unsupported_reason(self, helper) -> str | None:
        """Why this optimizer has no block for a captured layer (None: it has one). TENGraD has
        one for every captured kind; K-FAC says which it does not factor."""
        return None

    # ---- state -------------------------------------------------------------------------------
    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        # For a variable without a block, with first_order="adam", its momentum slot is Adam's
        # first moment and `_velocities` its second; which variables those are is only known
        # when the step is bound, so every variable gets a slot (memory: one copy of the weights).
        self._momentums = self.add_optimizer_variables(var_list, "momentum")
        if self.first_order == FIRST_ORDER_ADAM:
            self._velocities = self.add_optimizer_variables(var_list, "velocity")
        self.skipped_steps = self.add_variable((), initializer="zeros", dtype="int64",
                                               name="skipped_steps")
        self.consecutive_skips = self.add_variable((), initializer="zeros", dtype="int64",
                                                   name="consecutive_skips")
        self.damping_retries = self.add_variable((), initializer="zeros", dtype="int64",
                                                 name="damping_retries")
        # What the step rule chose, for diagnostics (callbacks.Diagnostics): the coefficients of
        # d and of the previous step (learning_rate="auto"), and the last reduction ratio ρ.
        self.step_coefficients = self.add_variable((2,), initializer="zeros", dtype="float64",
                                                   name="step_coefficients")
        self.reduction_ratio = self.add_variable((), initializer="zeros", dtype="float64",
                                                 name="reduction_ratio")
        # Written only while diagnostics are on (callbacks.Diagnostics): the KL clip's factor ν
        # and the norm of the direction handed to the momentum (learning_rate="auto": the step).
        self.kl_factor = self.add_variable((), initializer="ones", dtype="float64",
                                           name="kl_factor")
        self.direction_norm = self.add_variable((), initializer="zeros", dtype="float64",
                                                name="direction_norm")
        if self.adaptive_damping:
            self.damping_variable = self.add_variable(
                (), initializer="zeros", dtype="float64", name="damping",
                aggregation="only_first_replica")
            # Assigned, not through an initializer, which would round λ through float32; in
            # init_scope, as the variable is made: build may run inside the first traced step.
            with tf.init_scope():
                self.damping_variable.assign(tf.constant(self.damping, tf.float64))
            # The weights before a step that adapts λ, to take the step back if the loss rose.
            self._before_step = self.add_optimizer_variables(var_list, "before_step")
            self.rejected_steps = self.add_variable((), initializer="zeros", dtype="int64",
                                                    name="rejected_steps")

    def update_step(self, gradient, variable, learning_rate):
        """Momentum on the (already preconditioned and clipped) direction `gradient`; Adam for a
        variable without a block under first_order="adam"."""
        index = self._get_variable_index(variable)
        if self.first_order == FIRST_ORDER_ADAM and index in self._first_order_indices:
            self._adam_step(gradient, variable, index, learning_rate)
            return
        if self.adaptive_learning_rate:
            # `gradient` is the step s = α d + μ s_prev itself; its slot keeps it for the next.
            step = ops.cast(gradient, variable.dtype)
            self.assign(self._momentums[index], step)
            self.assign_sub(variable, step)
            return
        lr = ops.cast(learning_rate, variable.dtype)
        d = ops.cast(gradient, variable.dtype)
        if self.momentum == 0.0:
            self.assign_sub(variable, ops.multiply(d, lr))
            return
        buf = self._momentums[self._get_variable_index(variable)]
        self.assign(buf, ops.add(ops.multiply(buf, self.momentum), d))
        self.assign_sub(variable, ops.multiply(buf, lr))

    def _adam_step(self, gradient, variable, index, learning_rate):
        """Adam's step at first_order_learning_rate (see `_adam_moments`)."""
        m, v = self._momentums[index], self._velocities[index]
        m_new, v_new, step = self._adam_moments(gradient, m, v, learning_rate, variable.dtype)
        self.assign(m, m_new)
        self.assign(v, v_new)
        self.assign_sub(variable, step)

    def _adam_rate(self, learning_rate, dtype=tf.float64):
        """Adam's bias-corrected rate η_t·√(1 − β₂ᵗ)/(1 − β₁ᵗ) of this step."""
        def const(x):  # not ops.cast: a Python float would go through float32 first
            return ops.convert_to_tensor(x, dtype=dtype)

        t = ops.cast(self.iterations + 1, dtype)
        eta = const(self.first_order_learning_rate / self._reference_learning_rate) * ops.cast(
            learning_rate, dtype)
        return eta * ops.sqrt(1 - ops.power(const(ADAM_BETA_2), t)) / (
            1 - ops.power(const(ADAM_BETA_1), t))

    def _adam_moments(self, gradient, m, v, learning_rate, dtype):
        """Adam (β₁ 0.9, β₂ 0.999, ε 1e-7, as Keras's) at first_order_learning_rate, which follows
        the learning rate in proportion, η(t) = first_order_learning_rate · lr(t) / lr(0):
        (new first moment, new second moment, the step θ − θ_new)."""
        def const(x):  # not ops.cast: a Python float would go through float32 first
            return ops.convert_to_tensor(x, dtype=dtype)

        g = ops.cast(gradient, dtype)
        m, v = ops.cast(m, dtype), ops.cast(v, dtype)
        eta = self._adam_rate(learning_rate, dtype)
        m_new = ops.add(m, ops.multiply(ops.subtract(g, m), const(1 - ADAM_BETA_1)))
        v_new = ops.add(v, ops.multiply(ops.subtract(ops.square(g), v), const(1 - ADAM_BETA_2)))
        step = ops.divide(ops.multiply(m_new, eta), ops.add(ops.sqrt(v_new), const(ADAM_EPSILON)))
        return m_new, v_new, step

    # ---- the step ----------------------------------------------------------------------------
    def apply(self, grads, trainable_variables=None):
        if trainable_variables is None:
            if not self.built:
                raise ValueError(f"{self.name}.apply without variables needs a built optimizer.")
            trainable_variables = self._trainable_variables
        trainable_variables = list(trainable_variables)
        grads = list(grads)
        # This optimizer's share of the step: the backward pass its gradients came from, and in it
        # the calls of the layers that own its variables (capture.Record.view_for). Found from the
        # gradient tensors as handed over, before anything below replaces them.
        record = capture.step_record().view_for(trainable_variables, grads)
        # Embedding gradients arrive as IndexedSlices; ⟨d, g⟩, the KL clip and the finiteness
        # check need dense tensors (an IndexedSlices cannot be multiplied), so they are densified.
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        if not self.built:
            self.build(trainable_variables)
        blocks = self._bind(record, trainable_variables, grads)
        # Keras unscales by loss_scale_factor inside super().apply; the curvature and the KL clip
        # need the true gradient, so unscale here and scale the direction back for Keras.
        scale = self.loss_scale_factor or 1.0
        if scale != 1.0:
            grads = [None if g is None else g / scale for g in grads]
        # Under tf.distribute: the global gradient first, so that the KL clip and the finiteness
        # check are those of the global batch on every replica (distribute.py, step 1).
        context = distribute.replica_context(type(self).__name__)
        if context is not None:
            grads = distribute.all_reduce_sum(context, grads)
        # One read of the counter for the whole step: blocks build their schedule from this tensor
        # once (blocks.base.once_per_step) instead of once per use.
        # Read in the forward pass's graph: it encloses this one when Keras's LossScaleOptimizer
        # calls apply inside a tf.cond branch (mixed_float16), and the true Fisher's sampled pass,
        # gated by `fresh`, must be built there (capture.Record.as_default); the branch captures both.
        with record.as_default():
            step = tf.convert_to_tensor(self.iterations)
            # Whether any block refreshes its curvature this step: gates the true Fisher's sampled
            # backward pass and the finiteness check of the curvature.
            fresh = tf.reduce_any([b.needs_output_grads(step, [c.inputs for c in calls])
                                   for b, calls in blocks] or [False])
        # The losses of this optimizer's backward pass that reach its layers: another optimizer's
        # loss, or one that depends on other layers only, plays no part in its Fisher.
        losses = record.losses_reaching([c for _, calls in blocks for c in calls])
        with record.as_default(), tf.name_scope("tengrad_output_grads"):  # scopes mark profiles
            output_grads = self._output_gradients(record, blocks, losses, scale, fresh)

        directions = list(grads)
        index = {id(v): i for i, v in enumerate(trainable_variables)}
        work = []
        for block, calls in blocks:
            ids = [index[id(v)] for v in block.variables]
            if not any(grads[i] is None for i in ids):
                work.append((block, ids, [c.inputs for c in calls], output_grads[id(block)]))
        if context is not None:
            # Every block's samples from every replica, in one collective (distribute.py, step 2).
            flat = [t for _, _, xs, gs in work for t in xs + gs]
            gathered = iter(distribute.gather_samples(context, flat, fresh))
            work = [(b, ids, [next(gathered) for _ in xs], [next(gathered) for _ in gs])
                    for b, ids, xs, gs in work]
        retries = []
        stores = []
        parts = []
        preconditioned = set()
        for block, ids, inputs, outs in work:
            curvature, tries = block.curvature(step, inputs, outs)
            retries.append(tries)
            stores.append((block, curvature))
            parts.append((block, ids, curvature))
            preconditioned.update(ids)
        network = self._network_solve(parts, work, fresh) if parts else None
        if network is not None:  # fisher_blocks="network": one solve for every block
            solve, state, tries = network
            retries.append(tries)
            parts = [(b, ids, {**c, "damping": state["damping"]}) for b, ids, c in parts]
            for (_, ids, _), ds in zip(parts, solve.precondition(
                    [(b, c) for b, _, c in parts], [[grads[i] for i in ids] for _, ids, _ in parts],
                    state)):
                for i, d in zip(ids, ds):
                    directions[i] = d
        else:
            for block, ids, curvature in parts:
                for i, d in zip(ids, block.precondition([grads[i] for i in ids], curvature)):
                    directions[i] = d
        first_order = [i for i, g in enumerate(grads) if g is not None and i not in preconditioned]
        self._first_order_indices = frozenset(self._get_variable_index(trainable_variables[i])
                                              for i in first_order)
        if self.first_order == FIRST_ORDER_DAMPED:
            for i in first_order:
                directions[i] = grads[i] / tf.cast(self.damping, grads[i].dtype)
        # The quadratic model of the step in span{d, p} (adaptive.Subspace): every step of the
        # learning_rate="auto" mode, and on the steps that adapt the damping.
        slots = {i: self._momentums[self._get_variable_index(trainable_variables[i])]
                 for i in range(len(grads)) if grads[i] is not None}
        modelled = []
        if self.adaptive_learning_rate or self.adaptive_damping:  # TENGraD's exact blocks only
            modelled = [(lambda v, b=b, c=c: b.project(v, c), c["damping"], ids)
                        for b, ids, c in parts]
            if self.first_order != FIRST_ORDER_ADAM:  # variables with F = 0: C = λI
                modelled += [(None, self._damping_tensor(), [i]) for i in first_order]

        # m of the projections U_bᵀv, which are zero-padded when the cache's capacity is fixed.
        samples = next((c["samples"] for _, _, c in parts if "samples" in c), None)

        def subspace(directions):
            previous = [tf.cast(slots[i], grads[i].dtype) if i in slots else None
                        for i in range(len(grads))]
            return adaptive.Subspace.of(modelled, directions, previous, grads, samples)

        with tf.name_scope("tengrad_kl_clip"):
            if self.adaptive_learning_rate and parts:
                # s = a₀ d + a₁ p, a from the model; the KL clip bounds its sᵀ(F + λI)s.
                with tf.name_scope("tengrad_adaptive_step"):
                    model = subspace(directions)
                    coefficients = model.best(None if self.adaptive_momentum else self.momentum)
                    if self.kl_clip is not None:
                        coefficients *= self._kl_factor(tf.reduce_sum(
                            coefficients * tf.linalg.matvec(model.gram, coefficients)))
                    self.step_coefficients.assign(coefficients)
                    a0, a1 = tf.unstack(coefficients)
                    for i in {i for _, _, ids in modelled for i in ids}:
                        directions[i] = (tf.cast(a0, grads[i].dtype) * directions[i]
                                         + tf.cast(a1, grads[i].dtype) * tf.cast(slots[i],
                                                                                 grads[i].dtype))
                clipped_d_dot_g = _inner_product(directions, grads)
                d_dot_g = clipped_d_dot_g
            else:
                # The KL clip bounds the quadratic model's ⟨d, g⟩ = dᵀ(F+λI)d of the step: with
                # Adam, that of the blocks only (Adam bounds its own steps); with d = g/λ a
                # variable is a block with F = 0, and with d = g one with F + λI = I, so they count.
                clipped = preconditioned if self.first_order == FIRST_ORDER_ADAM else None
                clipped_d_dot_g = _inner_product(
                    [d if clipped is None or i in clipped else None
                     for i, d in enumerate(directions)], grads)
                directions = self._kl_clip(directions, clipped_d_dot_g, clipped)
                d_dot_g = clipped_d_dot_g
                if clipped is not None and first_order:
                    d_dot_g += _inner_product([directions[i] for i in first_order],
                                              [grads[i] for i in first_order])

        adapting = self._damping_adaptation(record, losses, scale, step, parts, subspace,
                                            directions, grads, first_order, trainable_variables)
        if self._diagnostics:
            self.direction_norm.assign(tf.sqrt(_inner_product(directions, directions)))

        # ⟨d, g⟩ is finite only if every dᵢ and gᵢ is: a NaN or ±Inf anywhere makes the sum NaN or
        # ±Inf (Inf·0 is NaN). One scalar check instead of one per variable, and the KL clip needs
        # the sum anyway.
        finite = tf.math.is_finite(d_dot_g)
        # Cached curvature was stored only when finite, so only fresh curvature needs the check
        # (on a 3C1F reuse step it would read a 75 MB per-sample-gradient cache for nothing).
        curvature_finite = tf.cond(fresh, lambda: tf.reduce_all(
            [tf.reduce_all(tf.math.is_finite(t)) for _, c in stores for t in c.values()] or [True]),
            lambda: tf.constant(True))
        finite = tf.logical_and(finite, curvature_finite)

        def count_taken(retries):
            if retries:
                self.damping_retries.assign_add(tf.cast(tf.add_n(retries), "int64"))
            self.consecutive_skips.assign(0)

        def take_step(directions, curvatures):
            for (block, _), curvature in zip(stores, curvatures):
                block.commit(step, curvature)
            if network is not None:
                network[0].commit(tf.logical_or(fresh, tf.constant(self.adaptive_damping)),
                                  network[1])
            # Keras divides by loss_scale_factor again inside apply.
            scaled = directions if scale == 1.0 else [None if d is None else d * scale
                                                      for d in directions]
            if context is not None:
                # Keras all-reduces (SUM) what it is handed: d from replica 0 only (distribute.py).
                scaled = distribute.first_replica_only(tf.distribute.get_replica_context(), scaled)
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

        curvatures = [c for _, c in stores]
        if context is None:
            ops.cond(finite, lambda: (count_taken(retries), take_step(directions, curvatures))[-1],
                     skip_step)
        else:
            # Keras's apply is a merge_call, which cannot sit in a cond branch in replica context.
            distribute.cond_across_replicas(context, finite, take_step, (directions, curvatures),
                                            count_taken, (retries,), skip_step)
        if adapting is not None:
            adapting.finish(finite, context)

    def _kl_clip(self, directions, vdg, only=None):
        """ν d with ν = min(1, sqrt(κ / (lr² ⟨d, g⟩))); `vdg` is ⟨d, g⟩ in float64. `only`: the
        indices of the directions to scale (None: all)."""
        if self.kl_clip is None:
            return directions
        lr = tf.cast(self.learning_rate, tf.float64)
        nu = self._kl_factor(lr * lr * vdg)
        return [d if d is None or (only is not None and i not in only)
                else d * tf.cast(nu, d.dtype) for i, d in enumerate(directions)]

    def _kl_factor(self, kl) -> tf.Tensor:
        """ν = min(1, sqrt(κ / KL)) for the quadratic model's KL of the step (float64)."""
        # KL > 0 in exact arithmetic (F + λI is positive definite); the floor only keeps a
        # rounding-level value from turning into a division by zero.
        nu = tf.minimum(tf.constant(1.0, tf.float64),
                        tf.sqrt(self.kl_clip / tf.maximum(kl, 1e-30)))
        if self._diagnostics:
            self.kl_factor.assign(nu)
        return nu

    # ---- binding -----------------------------------------------------------------------------
    def _bind(self, record: capture.StepView, variables, grads) -> list[tuple[Any, list]]:
        """Match this step's captured layer calls to the variables; record every variable's fate.

        The view holds only the calls that this optimizer's backward pass reached (not, say, a
        forward pass for a metric, or another optimizer's loss); of those, the layers whose
        variables are all this optimizer's get a block. Every other variable is first-order, and
        its treatment names its layer, the layer's class and why."""
        calls_by_layer: dict[int, list[capture.LayerCall]] = {}
        for call in record.layer_calls:
            calls_by_layer.setdefault(id(call.layer), []).append(call)
        owned = {id(v) for v in variables}
        batch = _batch_dimension(record)
        pairs = []
        treatments = {}
        first_order: dict[int, tuple[Any, str]] = {}  # id(variable): (layer, reason)
        for calls in calls_by_layer.values():
            layer = calls[0].layer
            helper = layers.helper_for(layer)
            if not all(id(v) in owned for v in helper.variables):
                continue  # a layer of another model, or frozen weights in a trainable layer
            record.check_exact(calls)
            reason = self._unsupported_reason(helper) or _unbatched_reason(calls, batch)
            if reason:
                first_order.update({id(v): (layer, reason) for v in helper.variables})
                continue
            block = self._blocks.get(id(layer))
            if block is None:
                block = self._blocks[id(layer)] = self._make_block(layer)
                block.state_listener = self._block_state_created  # restore and track its state
                block.diagnostics = self._diagnostics
            _check_same_batch(layer, calls)
            pairs.append((block, calls))
            text = block.describe(calls[0].inputs.shape)
            if len(calls) > 1:
                text += f"; called {len(calls)} times per step, contributions summed exactly"
            for v in block.variables:
                treatments[v.path] = text
        for layer, reason in record.skipped:
            for v in layer.trainable_weights:
                first_order.setdefault(id(v), (layer, reason))
        unexplained = [v for v, g in zip(variables, grads)
                       if g is not None and v.path not in treatments and id(v) not in first_order]
        for v, layer in record.owners(unexplained).items():
            first_order[v] = (layer, layers.first_order_reason(layer))
        first_order_layers = {}  # path: (layer, reason)
        for v, g in zip(variables, grads):
            if v.path in treatments:
                continue
            if id(v) in first_order:
                layer, reason = first_order_layers[v.path] = first_order[id(v)]
                treatments[v.path] = f"first-order: {type(layer).__name__} '{layer.name}': {reason}"
            elif g is None:
                treatments[v.path] = "not updated: no gradient"
            else:
                treatments[v.path] = FIRST_ORDER_OTHER
        self._treatments = {v.path: treatments[v.path] for v in variables}
        if not pairs and any(g is not None for g in grads):
            raise BindingError(
                f"{type(self).__name__} found no layer to precondition among the variables it was given "
                f"({len(variables)} variables, {len(record.layer_calls)} captured layer calls in "
                "the backward pass of its gradients). "
                "Dense, EinsumDense, Embedding, convolution and normalization layers are "
                "preconditioned (README, 'Layers'); the forward pass, the loss "
                "gradient and apply_gradients must run in the same tf.function (model.fit does "
                "this) or all eagerly, and the optimizer must exist before the model is "
                "first called for training. For models without such layers, use a first-order "
                "optimizer."
            )
        first_order = [p for p, t in self._treatments.items() if t.startswith("first-order")]
        # Once per optimizer for a given set: fit may trace its step more than once, and replicas
        # of a MirroredStrategy trace it concurrently, one thread each.
        with _WARNING_LOCK:
            if not first_order or frozenset(first_order) == self._warned_first_order:
                return pairs
            self._warned_first_order = frozenset(first_order)
            # Named by layer ("LSTM 'lstm'"), or by path where no layer that ran owns it.
            owners = dict.fromkeys(
                f"{type(first_order_layers[p][0]).__name__} '{first_order_layers[p][0].name}'"
                if p in first_order_layers else p for p in first_order)
            logger.warning("%s: %d of %d variables have no curvature block and take a first-order "
                           "step (first_order=%r): %s. optimizer.summary() lists why.",
                           type(self).__name__, len(first_order), len(self._treatments),
                           self.first_order, ", ".join(owners))
        return pairs

    def _output_gradients(self, record, pairs, losses, loss_scale, fresh
                          ) -> dict[int, list[tf.Tensor]]:
        """Per-sample output gradients Gᵢ = ∂ℓᵢ/∂zᵢ for every captured call, per block.

        Built in the record's graph (the caller enters it), where `fresh` lives too.
        Half-precision gradients (mixed precision) are returned in float32, the blocks' dtype.
        """
        if not pairs:
            return {}
        flat = [c for _, calls in pairs for c in calls]
        if self.fisher == fisher.EMPIRICAL:
            factor = _batch_mean_factor(losses)
            # The backward pass gives wᵢ·∂ℓᵢ/∂zᵢ for a weighted loss; the Fisher weights samples as
            # the loss does, F = (1/m) Σ wᵢ uᵢuᵢᵀ, so the rows are rescaled by 1/√wᵢ.
            root_w = _root_sample_weight(losses)
            # The training loss was multiplied by our loss_scale_factor or, under mixed_float16, by
            # the dynamic scale of the LossScaleOptimizer wrapping us (which sets ours to None);
            # its backward pass carries the scale. Unscaled in float32: in float16 it would
            # overflow exactly where the scale is large.
            lso_scale = record.loss_scale_of(self)

            def unscaled(c):
                g = tf.cast(c.output_grad, _fisher_dtype(c.output_grad.dtype))
                s = tf.cast(factor(c), g.dtype) / tf.constant(loss_scale, g.dtype)
                return g * (s if lso_scale is None else s / tf.cast(lso_scale, g.dtype))

            return {id(b): [_weighted_rows(unscaled(c), root_w, divide=True) for c in calls]
                    for b, calls in pairs}
        if not losses:
            raise BindingError(
                "fisher='true' needs to see the loss to sample labels from the model's predictions, "
                "but no keras.losses.Loss was part of the differentiated loss in this step. "
                "Compute the loss with a Keras "
                "Loss object (model.compile(loss=...) does) in the same tf.function, or use "
                "fisher='empirical'."
            )
        if tf.executing_eagerly():
            raise BindingError(
                "fisher='true' needs the forward pass and apply_gradients in one tf.function "
                "(model.fit does this unless run_eagerly=True). Wrap the custom train step in "
                "tf.function, or use fisher='empirical'."
            )
        for call in losses:
            fisher.check_supported(call.loss)
        # The sampled backward pass is needed only on steps where some block refreshes its
        # curvature (1 in curvature_update_freq). A tf.cond cannot hold it (the gradient of tensors
        # computed outside a branch does not exist inside it), so the pass is gated with dataflow
        # Switch/Merge instead: on other steps its seed gradient is a dead tensor, and every
        # gradient op downstream of a dead input does not run. The gate must sit on the seed
        # (grad_ys), not on the loss's input: the gradient of a Switch is a Merge with zeros, which
        # would revive the whole backward pass on gated-off steps (the profile showed exactly that).
        gate = None if _tf_private.in_xla_context() else fresh
        with record.frozen_taps():  # the taps keep the training gradients they hold
            # In the loss's dtype, as Keras's Loss.__call__ computes the training loss (float32
            # for float16 predictions under mixed precision).
            loss_calls = [dataclasses.replace(c, y_pred=tf.nest.map_structure(
                lambda t, c=c: tf.cast(t, c.loss.dtype), c.y_pred)) for c in losses]
            loss_calls = [dataclasses.replace(c, loss_grad=self._loss_weight(record, c, loss_scale))
                          for c in loss_calls]
            sampled = fisher.sampled_loss_sum(
                loss_calls, fisher.step_key(self._resume_state.sampling_seed, self.iterations))
            seed = None if gate is None else tf.raw_ops.Switch(data=tf.ones_like(sampled),
                                                                pred=gate)[1]
            grads = tf.gradients(sampled, [c.preactivation for c in flat], grad_ys=seed)
        if gate is not None:
            # Merge takes whichever input is alive: the sampled gradient, or zeros when gated off.
            # The zeros are shaped from the pre-activation, which is alive, not from g, which is
            # dead when gated off: with a dynamic batch size nothing folds zeros_like(g) into a
            # constant, and a dead Merge would kill the step.
            grads = [g if g is None else tf.raw_ops.Merge(inputs=[tf.raw_ops.Switch(
                data=tf.zeros_like(c.preactivation, dtype=g.dtype), pred=gate)[0], g])[0]
                for c, g in zip(flat, grads)]
        by_call = {id(c): (tf.zeros_like(c.preactivation) if g is None else g)
                   for c, g in zip(flat, grads)}
        return {id(b): [by_call[id(c)] for c in calls] for b, calls in pairs}

    def _loss_weight(self, record, call, loss_scale) -> tf.Tensor:
        """A loss's weight in the differentiated total, float64. It came from the backward pass,
        which carries the loss scale (loss_scale_factor, a LossScaleOptimizer's) like the output
        gradients do; divided out here."""
        lso_scale = record.loss_scale_of(self)
        unscale = tf.cast(loss_scale, tf.float64) * (
            1.0 if lso_scale is None else tf.cast(lso_scale, tf.float64))
        return tf.cast(call.loss_grad, tf.float64) / unscale

    def _network_solve(self, parts, work, fresh):
        """(NetworkSolve, its curvature, retries) under fisher_blocks="network", else None."""
        if getattr(self, "fisher_blocks", "layer") != "network":
            return None
        if self._network is None:
            self._network = self._make_network_solve()
            self._network.state_listener = self._block_state_created
        grams = [c["gram"] for _, _, c in parts]
        # m: this step's (the Grams may be padded), or the blocks' window of several batches.
        samples = parts[0][2].get("samples", tf.shape(work[0][3][0])[0])
        state, tries = self._network.curvature(fresh, grams, samples, parts[0][0]._capacity)
        return self._network, state, tries

    # ---- adaptive damping ----------------------------------------------------------------------
    def _damping_tensor(self) -> tf.Tensor:
        """λ now, float64: the adapted value, or the constant."""
        if getattr(self, "adaptive_damping", False):
            return tf.convert_to_tensor(self.damping_variable)
        return tf.constant(self.damping, tf.float64)

    def _damping_adaptation(self, record, losses, scale, step, parts, subspace, directions,
                            grads, first_order, variables):
        """Before the update, on the steps that adapt λ (every damping_adaptation_interval): the
        step's loss h(θ) and the model's M(s). `finish` then replays the loss at θ + s and sets λ
        from ρ = (h(θ + s) − h(θ)) / M(s) (adaptive.next_damping). None when λ is fixed, or when
        the step cannot be replayed exactly (the reason is logged and in `summary()`)."""
        if not getattr(self, "adaptive_damping", False) or not parts:
            return None
        replayer = replay.LossReplay.of(
            record, losses, lambda c: self._loss_weight(record, c, scale))
        if isinstance(replayer, str):
            if self._no_adaptation != replayer:
                self._no_adaptation = replayer
                logger.warning("%s: the damping stays at %s: it adapts from the loss replayed at "
                               "the new weights, and this step cannot be replayed exactly: %s.",
                               type(self).__name__, self.damping, replayer)
            return None
        self._no_adaptation = None
        every = self.damping_adaptation_interval
        # Every `every` steps, and on every step after one that did less than a quarter of what
        # the model promised (or was taken back): while λ is too small, no step goes unchecked.
        adapt = tf.logical_or(tf.equal(tf.math.floormod(tf.cast(step, tf.int64), every), 0),
                              self.reduction_ratio < 0.25)
        stepped = [(v, self._before_step[self._get_variable_index(v)])
                   for v, g in zip(variables, grads) if g is not None]
        if self.adaptive_learning_rate:
            coefficients = tf.constant([1.0, 0.0], tf.float64)  # directions hold s itself
        else:
            lr = tf.cast(self.learning_rate, tf.float64)
            coefficients = tf.stack([lr, lr * self.momentum])
        adam = [i for i in first_order if self.first_order == FIRST_ORDER_ADAM]

        def before():
            predicted = subspace(directions).value(coefficients)
            if adam:  # Adam's own diagonal model of its step (adaptive.adam_model)
                lr = self.learning_rate
                moments = [self._adam_moments(
                    grads[i], *[slots[self._get_variable_index(variables[i])]
                                for slots in (self._momentums, self._velocities)],
                    lr, tf.float64) for i in adam]
                eta = self._adam_rate(lr)
                predicted += adaptive.adam_model([grads[i] for i in adam],
                                                 [step for _, _, step in moments],
                                                 [v for _, v, _ in moments], eta)
            for v, saved in stepped:
                saved.assign(v)
            return replayer.recorded(), predicted

        zero = tf.constant(0.0, tf.float64)
        h0, predicted = tf.cond(adapt, before, lambda: (zero, zero))
        return _Adaptation(self, replayer, adapt, h0, predicted, stepped)

    # ---- reporting ---------------------------------------------------------------------------
    def diagnostics(self) -> dict[str, float]:
        """What the step rule did at the last step, as Python floats (callbacks.Diagnostics):
        damping λ, the step's coefficients of d and of the previous step (learning_rate="auto"),
        the reduction ratio ρ of the last damping adaptation, the KL clip's factor ν, the norm of
        the direction, the counters, and each block's condition number of its damped Gram (of the
        last curvature update)."""
        if not self.built:
            return {}
        values = {
            "damping": float(self.damping_variable.numpy()) if self.adaptive_damping
            else float(getattr(self, "damping", float("nan"))),
            "step_size": float(self.step_coefficients.numpy()[0]),
            "momentum_coefficient": float(self.step_coefficients.numpy()[1]),
            "reduction_ratio": float(self.reduction_ratio.numpy()),
            "kl_factor": float(self.kl_factor.numpy()),
            "direction_norm": float(self.direction_norm.numpy()),
            "skipped_steps": int(self.skipped_steps.numpy()),
            "damping_retries": int(self.damping_retries.numpy()),
        }
        if self.adaptive_damping:
            values["rejected_steps"] = int(self.rejected_steps.numpy())
        for block in self._blocks.values():
            if getattr(block, "condition", None) is not None:
                values[f"condition/{block.layer.name}"] = float(block.condition.numpy())
        return values

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

    # ---- saving and resuming -------------------------------------------------------------------
    # Keras saves `self.variables` by index (.keras files, save_weights, BackupAndRestore). The
    # blocks' curvature state (TENGraD's cache, K-FAC's factors and inverses) is not among them: it
    # is created at the first trace, after `build` and after a load. It is saved under extra keys
    # "curvature_<i>_<field>", where i is the index of the block's kernel among the optimizer's
    # variables (stable across processes and layer renames, like Keras's own indices). A load keeps
    # the arrays pending until the block is bound, then the block is created from them. For
    # tf.train.Checkpoint the same variables are tracked, under the same names, by a tf.Module
    # child `_resume_state`; tracking them when they are created restores them if `restore()` was
    # called before (TF's deferred restoration).
    _STATE_PREFIX = "curvature_"
    _SEED_KEY = "sampling_seed"

    def _init_resume_state(self, seed):
        # The true Fisher samples labels statelessly from (this seed, step). seed=None draws one
        # as Keras does for its layers (Python's `random`, fixed by keras.utils.set_random_seed);
        # it is saved with the optimizer, so a resumed run samples what the original one would.
        base = random.randint(1, 10**9) if seed is None else int(seed)
        self._pending_state: dict[str, dict[str, np.ndarray]] = {}
        self._resume_state = tf.Module(name="resume_state")
        with tf.init_scope():
            self._resume_state.sampling_seed = tf.Variable(
                base, dtype=tf.int64, trainable=False, name=self._SEED_KEY)

    def _state_key(self, block) -> str:
        key = getattr(block, "key", None)  # the network solve's own key
        return key or f"{self._STATE_PREFIX}{self._get_variable_index(block.variables[0])}"

    def _curvature_holders(self) -> list:
        """Every object with saved curvature state: the blocks, and the network solve."""
        return list(self._blocks.values()) + ([self._network] if self._network else [])

    def _block_state_created(self, block) -> None:
        """Called by a block (eagerly, in tf.init_scope) once its state variables exist."""
        key = self._state_key(block)
        pending = self._pending_state.pop(key, None)
        if pending is not None:
            block.load_state(pending)
        for field, variable in block.state_variables.items():
            setattr(self._resume_state, f"{key}_{field}", variable)

    def _saved_block_state(self) -> dict[str, dict[str, np.ndarray]]:
        """{key: {field: array}} of every block, and of loaded state not yet bound to a block."""
        state = {k: dict(v) for k, v in self._pending_state.items()}
        for block in self._curvature_holders():
            variables = block.state_variables
            if variables:
                state[self._state_key(block)] = {f: v.numpy() for f, v in variables.items()}
        return state

    def save_own_variables(self, store):
        super().save_own_variables(store)
        store[self._SEED_KEY] = self._resume_state.sampling_seed.numpy()
        for key, fields in self._saved_block_state().items():
            for field, value in fields.items():
                store[f"{key}_{field}"] = value

    def load_own_variables(self, store):
        keys = list(store.keys())
        indexed = {k: store[k] for k in keys if k.isdigit()}
        # Keras checks the count of its own (indexed) variables and skips the whole optimizer with
        # a warning on a mismatch; the curvature is then skipped as well, never loaded alone.
        super().load_own_variables(indexed)
        if len(indexed) != len(self.variables):
            return
        if self._SEED_KEY in keys:
            self._resume_state.sampling_seed.assign(store[self._SEED_KEY])
        loaded: dict[str, dict[str, np.ndarray]] = {}
        for k in keys:
            if k.startswith(self._STATE_PREFIX):
                index, field = k[len(self._STATE_PREFIX):].split("_", 1)
                loaded.setdefault(f"{self._STATE_PREFIX}{index}", {})[field] = np.asarray(store[k])
        self._pending_state = loaded
        for block in self._curvature_holders():
            if not block.state_variables:
                continue  # not built yet: it takes its pending state when it is
            # A file without curvature (saved before it was saved) leaves the block to recompute
            # on its next step, as a fresh one would; never the curvature of another step.
            arrays = self._pending_state.pop(self._state_key(block), None)
            if arrays is None:
                block.reset_state()
            else:
                block.load_state(arrays)

    # ---- config ------------------------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.pop("gradient_accumulation_steps", None)
        config.update({
            "learning_rate": AUTO if self.adaptive_learning_rate else config["learning_rate"],
            "momentum": AUTO if self.adaptive_momentum else self.momentum,
            "fisher": self.fisher,
            "kl_clip": self.kl_clip,
            "first_order": self.first_order,
            "first_order_learning_rate": self.first_order_learning_rate,
            "max_consecutive_skips": self.max_consecutive_skips,
            "seed": self.seed,
        })
        return config


@dataclasses.dataclass(eq=False)
class _Adaptation:
    """One step's damping adaptation, between the model's prediction and the replayed loss."""

    optimizer: Any
    replayer: replay.LossReplay
    adapt: tf.Tensor  # bool: this step adapts λ
    h0: tf.Tensor  # h(θ), float64 (0 on other steps)
    predicted: tf.Tensor  # M(s), float64
    stepped: list  # (variable, its value before the step)

    def finish(self, taken, context) -> None:
        """After the update: ρ = (h(θ + s) − h(θ)) / M(s), and λ from it (if the step was taken).
        A step that raised the loss (ρ < 0) is taken back: weights as before it, momentum
        cleared, counted in `rejected_steps`."""
        opt = self.optimizer
        go = tf.logical_and(self.adapt, taken)
        zero = tf.constant(0.0, tf.float64)
        with tf.name_scope("tengrad_damping_adaptation"):
            h0 = self.h0
            if context is None:
                h1 = tf.cond(go, self.replayer.evaluate, lambda: zero)
            else:  # the losses are the replicas' shares of the global mean
                (h0,) = distribute.all_reduce_sum(context, [h0])
                # Every replica replays its own inputs (the replayer of the replica that runs the
                # merge would otherwise be used for all).
                h1 = distribute.sum_across_replicas_if(
                    context, go, lambda *inputs: self.replayer.evaluate(list(inputs)),
                    tuple(self.replayer.inputs()), zero)
            rho = (h1 - h0) / tf.where(tf.equal(self.predicted, 0.0),
                                       -tf.ones_like(self.predicted), self.predicted)
            lam = opt.damping_variable
            new = adaptive.next_damping(lam, rho, opt.damping_adaptation_interval, MIN_DAMPING,
                                        MAX_DAMPING)
            if not opt.adaptive_learning_rate:
                # With a fixed learning rate λ never goes below the initial one: a small step is
                # always predicted well (ρ ≈ 1), which would drive λ towards 0 and the direction
                # into the null space of the stale curvature; λ is there to stop steps that raise
                # the loss. It comes back down to λ₀ once steps are predicted well again: a
                # ratchet (λ only rising) let one bad step slow the rest of training (λ 0.1 →
                # 12.9 in 80 steps on 3C1F, docs/step.md). With learning_rate="auto" it is the
                # model's damping, both ways.
                new = tf.maximum(new, tf.constant(opt.damping, tf.float64))
            lam.assign(tf.where(go, new, tf.convert_to_tensor(lam)))
            opt.reduction_ratio.assign(tf.where(go, rho, tf.convert_to_tensor(opt.reduction_ratio)))

            def take_back():
                for v, saved in self.stepped:
                    v.assign(saved)
                    slot = opt._momentums[opt._get_variable_index(v)]
                    slot.assign(tf.zeros_like(slot))
                opt.rejected_steps.assign_add(1)
                return tf.constant(True)

            rejected = tf.logical_and(go, tf.logical_not(rho >= 0.0))
            tf.cond(rejected, take_back, lambda: tf.constant(False))


def _reference_value(learning_rate) -> float:
    """The value of a float, schedule (at step 0) or callable learning rate, as a Python float."""
    if isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        return float(learning_rate(0))
    if callable(learning_rate):
        return float(learning_rate())
    return float(learning_rate)


def _fisher_dtype(dtype: tf.DType) -> tf.DType:
    """float64 stays float64 (exact tests); everything else, float16/bfloat16 included, float32."""
    return tf.float64 if dtype == tf.float64 else tf.float32


def _inner_product(directions, grads) -> tf.Tensor:
    """⟨d, g⟩ over every variable with a direction, as a float64 scalar.

    Each variable is reduced in its own dtype; the per-variable sums are stacked per dtype and added
    in float64 (one cast per dtype rather than one per variable: a step's op count is its cost on
    small models)."""
    sums: dict[tf.DType, list[tf.Tensor]] = {}
    for d, g in zip(directions, grads):
        if d is not None:
            sums.setdefault(d.dtype, []).append(tf.reduce_sum(d * tf.cast(g, d.dtype)))
    if not sums:
        return tf.constant(0.0, tf.float64)
    return tf.add_n([tf.reduce_sum(tf.cast(tf.stack(s), tf.float64)) for s in sums.values()])


def _batch_mean_factor(losses: list[capture.LossCall]):
    """m·R for losses averaged over the batch (Keras's default), 1 for summed ones.

    ∂ℓᵢ/∂zᵢ = m · (∂L/∂z)ᵢ when L is the mean over the m samples of the replica's batch; under
    tf.distribute a Keras Loss also divides such a mean by the R replicas in sync
    (keras.losses.loss.reduce_values), but leaves a summed loss as it is. A loss computed without a
    Keras Loss is taken to be a batch mean, as Keras's own are by default. `losses` are those that
    reach the optimizer's layers: summed and averaged ones together would mix the two factors in
    one output gradient, which cannot be undone, so that is refused.
    """
    summed = {getattr(c.loss, "reduction", None) == "sum" for c in losses}
    if len(summed) > 1:
        raise BindingError(
            "fisher='empirical': losses with reduction='sum' and averaged losses reach the same "
            "optimizer's layers in one step, so the per-sample output gradients cannot be "
            "recovered from their sum. Use one reduction for all, or fisher='true' (it samples "
            "each loss with its own reduction).")
    replica = tf.distribute.get_replica_context()
    replicas = replica.num_replicas_in_sync if replica is not None else 1

    def factor(call):
        if summed == {True}:
            return tf.constant(1.0, tf.float32)
        return tf.cast(tf.shape(call.output_grad)[0] * replicas, tf.float32)

    return factor


def _root_sample_weight(losses: list[capture.LossCall]):
    """√wᵢ of the step's per-sample loss weights (None if unweighted), of the losses that reach
    the optimizer's layers.

    Keras passes `sample_weight` (and `class_weight`, converted) to the loss. With several weighted
    losses the training backward pass mixes their weights in each layer's output gradient, which
    cannot be undone per loss: that case is refused rather than silently mis-weighted.
    """
    weighted = [c for c in losses if c.sample_weight is not None]
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


def _batch_dimension(record: capture.StepView):
    """The step's batch size as the captured calls see it: the leading dimension most of them have
    (an int, or None when dynamic), or Ellipsis when that is unclear.

    A dynamic dimension wins a tie, since a tensor computed from the batch carries it and a
    constant never does; between two static sizes the predictions' leading dimension decides."""
    dims = collections.Counter(c.preactivation.shape[0] if c.preactivation.shape.rank else
                               Ellipsis for c in record.layer_calls)
    dims.pop(Ellipsis, None)
    if not dims:
        return Ellipsis
    top = max(dims.values())
    candidates = [d for d, n in dims.items() if n == top]
    if None in candidates or len(candidates) == 1:
        return None if None in candidates else candidates[0]
    for call in record.loss_calls:
        y_pred = tf.nest.flatten(call.y_pred)
        if call.loss_grad is None or not y_pred or not tf.is_tensor(y_pred[0]):
            continue
        first = y_pred[0].shape[0] if y_pred[0].shape.rank else None
        return first if first in candidates else Ellipsis
    return Ellipsis


def _unbatched_reason(calls, batch) -> str | None:
    """Why a layer's calls have no sample axis, or None.

    A layer called on a tensor without the batch axis (an Embedding of `ops.arange(T)` positions,
    broadcast into the batch afterwards) has only the batch's summed gradient at its output, not
    the per-sample ones. Its leading dimension is then static where the batch's is dynamic, or
    another number than the other layers' (`_batch_dimension`)."""
    if batch is Ellipsis:
        return None
    for call in calls:
        shape = call.preactivation.shape
        first = shape[0] if shape.rank else None
        if first is not None and first != batch:
            return (f"called on a tensor without the batch axis (leading dimension {first}, the "
                    f"batch's is {'dynamic' if batch is None else batch}), so its output gradient "
                    "holds no per-sample gradients; feed it batched inputs (e.g. positions "
                    "broadcast to (batch, T)) for an exact block")
    return None


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
          or (is_number(lr) and lr > 0) or lr == AUTO,
          'expected a float > 0, a LearningRateSchedule, a callable or "auto"')
    mu = args["momentum"]
    check("momentum", mu, (is_number(mu) and 0 <= mu < 1) or (mu == AUTO and lr == AUTO),
          'expected a float in [0, 1), or "auto" with learning_rate="auto"')
    wd = args["weight_decay"]
    check("weight_decay", wd, wd is None or (is_number(wd) and wd >= 0),
          "expected None or a float >= 0")
    check("fisher", args["fisher"], args["fisher"] in fisher.FISHER_TYPES,
          f"expected one of {fisher.FISHER_TYPES}")
    check("first_order", args["first_order"], args["first_order"] in FIRST_ORDER_RULES,
          f"expected one of {FIRST_ORDER_RULES}")
    fo_lr = args["first_order_learning_rate"]
    check("first_order_learning_rate", fo_lr, is_number(fo_lr) and fo_lr > 0, "expected a float > 0")
    kl = args["kl_clip"]
    check("kl_clip", kl, kl is None or (is_number(kl) and kl > 0), "expected None or a float > 0")
    check("max_consecutive_skips", args["max_consecutive_skips"],
          is_int(args["max_consecutive_skips"], 1), "expected an int >= 1")
    check("seed", args["seed"], args["seed"] is None or is_int(args["seed"], 0),
          "expected None or an int >= 0")
    # Keras's base optimizer accepts any value for these and fails (or misbehaves) only later.
    for name in ("clipnorm", "clipvalue", "global_clipnorm", "loss_scale_factor"):
        value = args[name]
        check(name, value, value is None or (is_number(value) and value > 0),
              "expected None or a float > 0")
    check("use_ema", args["use_ema"], isinstance(args["use_ema"], bool), "expected True or False")
    ema = args["ema_momentum"]
    check("ema_momentum", ema, is_number(ema) and 0 <= ema <= 1, "expected a float in [0, 1]")
    freq = args["ema_overwrite_frequency"]
    check("ema_overwrite_frequency", freq, freq is None or is_int(freq, 1),
          "expected None or an int >= 1")
    gas = args["gradient_accumulation_steps"]
    check("gradient_accumulation_steps", gas, gas is None,
          "the curvature is that of one batch, so gradient accumulation is not supported; "
          "use a larger batch_size instead")
