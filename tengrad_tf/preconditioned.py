"""The layer-agnostic core of a preconditioned Keras optimizer: its state and its step rule.

TENGraD and the K-FAC baseline differ only in their curvature blocks; everything else is here once.
One step (see docs/DESIGN.md), `apply`, top to bottom:
  1. bind: this step's captured layer calls to the variables (binding.py);
  2. curvature: each block's, fresh or cached by its own schedule, from the captured layer inputs
     and per-sample output gradients (output_grads.py), gathered over replicas (distribute.py);
  3. directions: dₗ = (Fₗ + λI)⁻¹ gₗ for each block ℓ (kernel and bias together); every other
     variable is first-order (first_order.py), and `summary()` says which and why;
  4. step length: KL clipping, ν = min(1, sqrt(κ / (lr² Σₗ ⟨dₗ, gₗ⟩))), d ← ν d, or the step of the
     exact quadratic model (learning_rate="auto", adaptive.py), and the damping's adaptation;
  5. take or skip: momentum and decoupled weight decay as Keras's SGD does them (buf ← μ buf + d,
     θ ← θ − lr·wd·θ, θ ← θ − lr·buf). A step whose direction or curvature is not finite changes
     nothing (weights, momentum, cached curvature, the iteration counter) and is counted in
     `skipped_steps`.
The core talks to blocks only through the protocol of blocks/protocol.py: it asks a block to
prepare its state, restores saved state into it (resume.py), and hands it the step number and this
step's tensors. When a block refreshes its curvature is the block's business.

What this module does not do: capture (capture.py), curvature math (blocks/), the solve
(woodbury.py), label sampling (fisher.py), saving (resume.py), reporting (reporting.py).
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
from keras import ops

from tengrad_tf import binding, capture, distribute, eager_state, first_order
from tengrad_tf.directions import Directions
from tengrad_tf.first_order import FIRST_ORDER_ADAM
from tengrad_tf.record import StepView
from tengrad_tf.reporting import Reporting
from tengrad_tf.resume import ResumableCurvature
from tengrad_tf.step import Step
from tengrad_tf.step_length import StepLength
from tengrad_tf.validation import AUTO, validate_common


class PreconditionedOptimizer(Directions, StepLength, ResumableCurvature, Reporting,
                              keras.optimizers.Optimizer):
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
            # Initial values from a callable of the variable's own dtype: Keras's "constant"
            # would round λ through float32, and an assign here would be a merge_call when build
            # runs in the first step's replica context (a custom loop under MirroredStrategy),
            # made by the first replica alone: the replicas' collectives no longer match.
            self.damping_variable = self.add_variable(
                (), initializer=_exactly(self.damping), dtype="float64", name="damping",
                aggregation="only_first_replica")
            # Steps between damping checks: damping_adaptation_interval, longer while the checks
            # find nothing to change (adaptive.DampingAdaptation).
            self.check_interval = self.add_variable(
                (), initializer=_exactly(self.damping_adaptation_interval), dtype="int64",
                name="check_interval", aggregation="only_first_replica")
            # The weights before a step that adapts λ, to take the step back if the loss rose.
            self._before_step = self.add_optimizer_variables(var_list, "before_step")
            self.rejected_steps = self.add_variable((), initializer="zeros", dtype="int64",
                                                    name="rejected_steps")

    def update_step(self, gradient, variable, learning_rate):
        """Momentum on the (already preconditioned and clipped) direction `gradient`; Adam for a
        variable without a block under first_order="adam"."""
        index = self._get_variable_index(variable)
        if self.first_order == FIRST_ORDER_ADAM and index in self._first_order_indices:
            m, v = self._momentums[index], self._velocities[index]
            m_new, v_new, step = self._adam_moments(gradient, m, v, learning_rate, variable.dtype)
            self.assign(m, m_new)
            self.assign(v, v_new)
            self.assign_sub(variable, step)
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
        buf = self._momentums[index]
        self.assign(buf, self._momentum_buffer(d, buf))
        self.assign_sub(variable, ops.multiply(buf, lr))

    def _momentum_buffer(self, direction, buffer):
        """Keras's SGD momentum, buffer ← μ·buffer + d; the step is lr times the new buffer."""
        return ops.add(ops.multiply(buffer, self.momentum), direction)

    def _adam_rate(self, learning_rate, dtype=tf.float64):
        """Adam's bias-corrected rate of this step at first_order_learning_rate, which follows the
        learning rate in proportion, η(t) = first_order_learning_rate · lr(t) / lr(0), times
        `_first_order_trust` (the step and Adam's term of the quadratic model both use it)."""
        return first_order.adam_rate(
            self.iterations, learning_rate,
            self.first_order_learning_rate / self._reference_learning_rate,
            dtype) * self._first_order_trust(dtype)

    def _adam_moments(self, gradient, m, v, learning_rate, dtype):
        """(new first moment, new second moment, the step θ − θ_new) of Adam (first_order.py)."""
        return first_order.adam_moments(gradient, m, v, self._adam_rate(learning_rate, dtype),
                                        dtype)

    # ---- the step ----------------------------------------------------------------------------
    def apply(self, grads, trainable_variables=None):
        if trainable_variables is None:
            if not self.built:
                raise ValueError(f"{self.name}.apply without variables needs a built optimizer.")
            trainable_variables = self._trainable_variables
        variables = list(trainable_variables)
        grads = list(grads)
        # This optimizer's share of the step: the backward pass its gradients came from, and in it
        # the calls of the layers that own its variables (record.Record.view_for). Found from the
        # gradient tensors as handed over, before anything below replaces them.
        record = capture.step_record().view_for(variables, grads)
        # Embedding gradients arrive as IndexedSlices; ⟨d, g⟩, the KL clip and the finiteness
        # check need dense tensors (an IndexedSlices cannot be multiplied), so they are densified.
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        if not self.built:
            # Keras builds the optimizer in the first traced step (unless a distribution strategy
            # is set); made there, its variables would make TensorFlow trace the step twice.
            with eager_state.outside_the_step():
                self.build(variables)
        pairs = self._bind(record, variables, grads)
        step = self._start(record, variables, grads)
        self._curvature(step, pairs)
        self._directions(step)
        self._step_length(step)
        self._take_or_skip(step)

    def _bind(self, record: StepView, variables, grads) -> list[tuple[Any, list]]:
        """[(block, its layer's calls)] of this step (binding.py); keeps the treatments."""
        def block_for(layer):
            block = self._blocks.get(id(layer))
            if block is None:
                block = self._blocks[id(layer)] = self._make_block(layer)
                block.diagnostics = self._diagnostics
            return block

        bound = binding.bind(record, variables, grads, self._unsupported_reason, block_for)
        self._treatments = bound.treatments
        binding.require_blocks(bound, record, variables, grads, type(self).__name__)
        self._warn_first_order(bound.first_order_owners())
        return bound.pairs

    def _start(self, record, variables, grads) -> Step:
        """The true gradient of the step: unscaled, and under tf.distribute the global one."""
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
        return Step(record, variables, grads, scale, context)

    def _take_or_skip(self, step: Step) -> None:
        """Apply the step if it is finite (blocks keep their curvature), else count a skip."""
        finite = step.finite()
        context, scale, network = step.context, step.scale, step.network

        def count_taken(retries):
            if retries:
                self.damping_retries.assign_add(tf.cast(tf.add_n(retries), "int64"))
            self.consecutive_skips.assign(0)

        def take_step(directions, curvatures):
            for (block, _), curvature in zip(step.stores, curvatures):
                block.commit(step.counter, curvature)
            if network is not None:
                network[0].commit(step.fresh, network[2])
            # Keras divides by loss_scale_factor again inside apply.
            scaled = directions if scale == 1.0 else [None if d is None else d * scale
                                                      for d in directions]
            if context is not None:
                # Keras all-reduces (SUM) what it is handed: d from replica 0 only (distribute.py).
                scaled = distribute.first_replica_only(tf.distribute.get_replica_context(), scaled)
            super(PreconditionedOptimizer, self).apply(scaled, step.variables)

        def skip_step():
            self.skipped_steps.assign_add(1)
            self.consecutive_skips.assign_add(1)
            tf.debugging.assert_less(
                self.consecutive_skips, tf.constant(self.max_consecutive_skips, "int64"),
                message=(f"{type(self).__name__}: {self.max_consecutive_skips} steps in a row had a "
                         "non-finite gradient, direction or curvature; the weights were left "
                         "untouched. Check the data and the loss, or lower the learning rate / raise "
                         "the damping."))

        curvatures = [c for _, c in step.stores]
        if context is None:
            ops.cond(finite, lambda: (count_taken(step.retries),
                                      take_step(step.directions, curvatures))[-1], skip_step)
        else:
            # Keras's apply is a merge_call, which cannot sit in a cond branch in replica context.
            distribute.cond_across_replicas(context, finite, take_step,
                                            (step.directions, curvatures),
                                            count_taken, (step.retries,), skip_step)
        if step.adapting is not None:
            step.adapting.finish(finite, context)

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


def _reference_value(learning_rate) -> float:
    """The value of a float, schedule (at step 0) or callable learning rate, as a Python float."""
    if isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        return float(learning_rate(0))
    if callable(learning_rate):
        return float(learning_rate())
    return float(learning_rate)


def _exactly(value):
    """A Keras initializer of the scalar `value` in the variable's dtype, without rounding it
    through float32."""
    return lambda shape, dtype: tf.fill(shape, tf.constant(value, dtype))
