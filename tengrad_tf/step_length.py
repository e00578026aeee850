"""The step-length stage: KL clipping, or the exact quadratic model's step; and λ's adaptation.

With a fixed learning rate the direction is clipped so that the quadratic model's KL of the step,
lr²·⟨d, g⟩, stays within κ (`kl_clip`). With learning_rate="auto" the step is the minimizer of the
exact quadratic model in span{d, previous step} (adaptive.Subspace), clipped the same way. On the
steps that adapt the damping, h(θ) and the model's M(s) are taken before the update
(adaptive.DampingAdaptation), which finishes after it.
"""

from __future__ import annotations

import logging

import tensorflow as tf

from tengrad_tf import adaptive, output_grads, replay
from tengrad_tf.blocks import metric, schedule
from tengrad_tf.first_order import FIRST_ORDER_ADAM
from tengrad_tf.step import Step, inner_product

logger = logging.getLogger("tengrad_tf")


class StepLength:
    """The step-length stage of `PreconditionedOptimizer.apply` (a mixin of it)."""

    # Steps between curvature updates, whose first reusing step the damping adaptation checks;
    # TENGraD sets its own. 1: every step has fresh curvature, no extra check.
    curvature_update_freq = 1

    def _step_length(self, step: Step) -> None:
        """Scale the directions: the quadratic model's step (learning_rate="auto") or the KL clip;
        then begin this step's damping adaptation."""
        grads, directions = step.grads, step.directions
        slots = {i: self._momentums[self._get_variable_index(step.variables[i])]
                 for i in range(len(grads)) if grads[i] is not None}
        # The quadratic model of the step in span{d, p} (adaptive.Subspace): every step of the
        # learning_rate="auto" mode, and on the steps that adapt the damping.
        modelled = []
        if self.adaptive_learning_rate or self.adaptive_damping:  # TENGraD's exact blocks only
            modelled = [(lambda v, b=b, c=c: b.project(v, c), c["damping"], ids,
                         metric.coordinates_of(c, b.helper)) for b, ids, c in step.parts]
            if self.first_order != FIRST_ORDER_ADAM:  # variables with F = 0: C = λI
                modelled += [(None, self._damping_tensor(), [i]) for i in step.first_order]
        # m of the projections U_bᵀv, which are zero-padded when the cache's capacity is fixed.
        samples = next((c["samples"] for _, _, c in step.parts if "samples" in c), None)

        def subspace(directions):
            previous = [tf.cast(slots[i], grads[i].dtype) if i in slots else None
                        for i in range(len(grads))]
            return adaptive.Subspace.of(modelled, directions, previous, grads, samples)

        with tf.name_scope("tengrad_kl_clip"):
            if self.adaptive_learning_rate and step.parts:
                # s = a₀ d + a₁ p, a from the model; the KL clip bounds its sᵀ(F + λI)s.
                with tf.name_scope("tengrad_adaptive_step"):
                    model = subspace(directions)
                    coefficients = model.best(None if self.adaptive_momentum else self.momentum)
                    if self.kl_clip is not None:
                        coefficients *= self._kl_factor(tf.reduce_sum(
                            coefficients * tf.linalg.matvec(model.gram, coefficients)))
                    self.step_coefficients.assign(coefficients)
                    a0, a1 = tf.unstack(coefficients)
                    for i in {i for _, _, ids, *_ in modelled for i in ids}:
                        dtype = grads[i].dtype
                        directions[i] = (tf.cast(a0, dtype) * directions[i]
                                         + tf.cast(a1, dtype) * tf.cast(slots[i], dtype))
                step.d_dot_g = inner_product(directions, grads)
            else:
                # The KL clip bounds the quadratic model's ⟨d, g⟩ = dᵀ(F+λI)d of the step: with
                # Adam, that of the blocks only (Adam bounds its own steps); with d = g/λ a
                # variable is a block with F = 0, and with d = g one with F + λI = I, so they count.
                clipped = ({i for _, ids, _ in step.parts for i in ids}
                           if self.first_order == FIRST_ORDER_ADAM else None)
                d_dot_g = inner_product([d if clipped is None or i in clipped else None
                                         for i, d in enumerate(directions)], grads)
                directions = self._kl_clip(directions, d_dot_g, clipped)
                if clipped is not None and step.first_order:
                    d_dot_g += inner_product([directions[i] for i in step.first_order],
                                             [grads[i] for i in step.first_order])
                step.d_dot_g = d_dot_g
        step.directions = directions
        step.adapting = self._begin_adaptation(step, modelled, samples)
        if self._diagnostics:
            self.direction_norm.assign(tf.sqrt(inner_product(directions, directions)))

    def _kl_clip(self, directions, vdg, only=None):
        """ν d with ν = min(1, sqrt(κ / (lr² ⟨d, g⟩))); `vdg` is ⟨d, g⟩ in float64. `only`: the
        indices of the directions to scale (None: all)."""
        if self.kl_clip is None:
            return directions
        lr = tf.cast(self.learning_rate, tf.float64)
        nu = self._kl_factor(lr * lr * vdg)
        # ν cast once per dtype, not once per variable: an op of every step, per variable.
        dtypes = dict.fromkeys(d.dtype for d in directions if d is not None)
        nus = {dtype: tf.cast(nu, dtype) for dtype in dtypes}
        return [d if d is None or (only is not None and i not in only)
                else d * nus[d.dtype] for i, d in enumerate(directions)]

    def _kl_factor(self, kl) -> tf.Tensor:
        """ν = min(1, sqrt(κ / KL)) for the quadratic model's KL of the step (float64)."""
        # KL > 0 in exact arithmetic (F + λI is positive definite); the floor only keeps a
        # rounding-level value from turning into a division by zero.
        nu = tf.minimum(tf.constant(1.0, tf.float64),
                        tf.sqrt(self.kl_clip / tf.maximum(kl, 1e-30)))
        if self._diagnostics:
            self.kl_factor.assign(nu)
        return nu

    def _damping_tensor(self) -> tf.Tensor:
        """λ now, float64: the adapted value, or the constant."""
        if self.adaptive_damping:
            return tf.convert_to_tensor(self.damping_variable)
        return tf.constant(self.damping, tf.float64)

    def _begin_adaptation(self, step: Step, modelled, samples):
        """On the steps that adapt λ (every damping_adaptation_interval, adaptive.py): h(θ) and the
        model's M(s) before the update. None when λ is fixed, or when the step cannot be replayed
        exactly (the reason is logged)."""
        if not self.adaptive_damping or not step.parts:
            return None
        lso_scale = step.record.loss_scale_of(self)
        replayer = replay.LossReplay.of(
            step.record, step.losses,
            lambda c: output_grads.loss_weight(c, step.scale, lso_scale),
            [v for v, g in zip(step.variables, step.grads) if g is not None])
        if isinstance(replayer, str):
            if self._no_adaptation != replayer:
                self._no_adaptation = replayer
                logger.warning("%s: the damping stays at %s: it adapts from the loss replayed at "
                               "the new weights, and this step cannot be replayed exactly: %s.",
                               type(self).__name__, self.damping, replayer)
            return None
        self._no_adaptation = None
        grads, variables, directions = step.grads, step.variables, step.directions
        # Every `check_interval` steps (damping_adaptation_interval, or a multiple of it while the
        # checks find nothing to change), and on every step after one that did less than a
        # quarter of what the model promised (or was taken back): while λ is too small, no step
        # goes unchecked. Also on the first step after each curvature update: the first that a
        # new curvature preconditions on another batch than its own. A step with its own batch's
        # curvature fits that batch and passes its check even where λ is far too small for the
        # steps that reuse the curvature (docs/step.md, "Damping").
        every = self.damping_adaptation_interval
        counter = tf.cast(step.counter, tf.int64)
        scheduled = schedule.every(counter, self.check_interval)
        adapt = tf.logical_or(scheduled, self.reduction_ratio < 0.25)
        if self.curvature_update_freq > 1:
            adapt = tf.logical_or(adapt, schedule.every(counter - 1, self.curvature_update_freq))
        adapt = tf.logical_and(adapt, step.finite())  # a skipped step writes no snapshot
        stepped = [(v, self._before_step[self._get_variable_index(v)],
                    self._momentums[self._get_variable_index(v)])
                   for v, g in zip(variables, grads) if g is not None]
        adam = [i for i in step.first_order if self.first_order == FIRST_ORDER_ADAM]

        def predict():
            if self.adaptive_learning_rate:  # the directions hold the step s itself
                s = directions
            else:  # s = lr·(μ p + d), p the momentum buffer (update_step's rule)
                s, rates = {}, {}  # lr read once per dtype, not once per variable
                for i in {i for _, _, ids, *_ in modelled for i in ids}:
                    d, dtype = directions[i], directions[i].dtype
                    if self.momentum:
                        p = self._momentums[self._get_variable_index(variables[i])]
                        d = self._momentum_buffer(d, tf.cast(p, dtype))
                    if dtype not in rates:
                        rates[dtype] = tf.cast(self.learning_rate, dtype)
                    s[i] = rates[dtype] * d
            predicted = adaptive.model_value(modelled, s, grads, samples)
            if adam:  # Adam's own diagonal model of its step (adaptive.adam_model)
                lr = self.learning_rate
                moments = [self._adam_moments(
                    grads[i], *[moment[self._get_variable_index(variables[i])]
                                for moment in (self._momentums, self._velocities)],
                    lr, tf.float64) for i in adam]
                predicted += adaptive.adam_model([grads[i] for i in adam],
                                                 [delta for _, _, delta in moments],
                                                 [v for _, v, _ in moments], self._adam_rate(lr))
            return predicted

        def refactor(damping):
            """Every cached factorization, for the new λ: the blocks' or the network's one. All
            blocks, not only this step's: a block whose layer sat out this step must not keep a
            factorization of an old λ for its next one."""
            return tf.add_n([h.refactor(damping) for h in self._curvature_holders()])

        return adaptive.DampingAdaptation.begin(
            replayer, adapt, predict, stepped, refactor, step.context,
            damping=self.damping_variable,
            damping_retries=self.damping_retries, interval=every, checks=self.check_interval,
            scheduled=scheduled,
            floor=None if self.adaptive_learning_rate else self.damping,
            reduction_ratio=self.reduction_ratio, rejected_steps=self.rejected_steps)
