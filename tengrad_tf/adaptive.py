"""TENGraD's exact quadratic model of a step, and what adapts from it: step size, momentum, damping.

The model of the loss around θ on the step's batch is

    M(s) = −gᵀs + ½ sᵀ C s,   C = F + λD on the preconditioned variables,

with F the exact Fisher of *all* blocks together, (1/m) U Uᵀ where U stacks every block's per-sample
gradients (cross-block terms included): xᵀFy = (1/m) (Σ_b U_bᵀx_b)·(Σ_b U_bᵀy_b). The projections
U_bᵀx are the ones the Woodbury solve already does, so the model is exact and costs a projection
per vector, where kfac-jax needs curvature-vector products. Variables without a block are blocks
with F = 0 (C = λI), except under first_order="adam", where Adam's own diagonal model
C = diag(√v̂ + ε)/η (the one its step minimizes) stands for them, separately.

Every step of the preconditioned variables lies in the span of two vectors: the natural-gradient
direction d = (F_b + λD_b)⁻¹ g, block by block (D_b = I without a damping metric), and the
previous step (or momentum buffer) p. With
a = (coefficient of d, coefficient of p), M(s) = −aᵀb + ½ aᵀGa for the 2 × 2 matrix
G = [dᵀCd, dᵀCp; pᵀCd, pᵀCp] and b = [gᵀd, gᵀp] (`Subspace`). So:

  * learning_rate="auto": a = G⁻¹b (momentum="auto"), or the best coefficient of d for a fixed
    momentum (Martens & Grosse 2015, section 7). Because each block is preconditioned alone and the
    model couples the blocks, the best coefficient is not 1: the blocks' steps add up along the
    per-sample directions they share. (With the blocks' own F the minimizer along d would be 1.)
  * adaptive damping (Levenberg–Marquardt, section 6.5): ρ = (h(θ + s) − h(θ)) / M(s) on the same
    batch (replay.py gives h(θ + s)); λ ← λ/ω if ρ < ¼ (λ·10 if the loss went up), λ ← λ·ω if
    ρ > ¾, with ω = (19/20)^T for adaptation every T steps. `DampingAdaptation` is one step of it:
    h(θ) and M(s) before the update; after it the replay, the new λ, and the blocks' cached
    factorizations made again for that λ.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import tensorflow as tf

from tengrad_tf import distribute
from tengrad_tf.first_order import ADAM_EPSILON

if TYPE_CHECKING:  # only its instances are used here
    from tengrad_tf.replay import LossReplay

F64 = tf.float64
# Bounds of the adapted damping: far outside any useful value, they only stop a runaway.
MIN_DAMPING, MAX_DAMPING = 1e-8, 1e4
# Checks of the damping that find nothing to change space out, to at most this many intervals.
MAX_CHECK_SPACING = 8


_PAIRS = [[0, 0], [0, 1], [1, 1], [0, 2], [1, 2]]  # of (d, p, g): dd, dp, pp, dg, pg


def inner_products(vectors: list[list[tf.Tensor]]) -> tf.Tensor:
    """The k × k matrix of ⟨xᵢ, xⱼ⟩ (float64) for k vectors, each a list of tensors (a block's
    variables). One product of the k flattened vectors, not k² sums per variable: the step is
    traced with a few ops per block instead of some 25 per variable."""
    dtype = vectors[0][0].dtype
    rows = tf.cast(tf.stack([tf.concat([tf.reshape(tf.cast(t, dtype), [-1]) for t in x], axis=0)
                             for x in vectors]), F64)
    return tf.matmul(rows, rows, transpose_b=True)


@dataclasses.dataclass
class Subspace:
    """The quadratic model restricted to span{d, p}: G (2 × 2) and b (2,), float64."""

    gram: tf.Tensor
    gradient: tf.Tensor

    @classmethod
    def of(cls, blocks, d, p, g, samples=None) -> "Subspace":
        """`blocks`: [(project, damping, indices[, metric])] with project(vectors) = U_bᵀv (m, 1)
        over the block's variables (None for a block with F = 0), damping its λ (float64 scalar),
        indices its variables' positions in the lists d, p, g, and metric(vectors) = Lᵀv for a
        damping metric D = LLᵀ (blocks/metric.py; absent or None: D = I). `samples`: m, when the
        projections have zero-padded rows beyond it (None: their length)."""
        u_d, u_p, terms = [], [], []
        for project, damping, ids, *metric in blocks:
            db, pb, gb = [d[i] for i in ids], [p[i] for i in ids], [g[i] for i in ids]
            if project is not None:
                u_d.append(tf.cast(project(db), F64))
                u_p.append(tf.cast(project(pb), F64))
            # [dᵀd, dᵀp, pᵀp, dᵀg, pᵀg], the first three times λ (in D's metric)
            products = tf.gather_nd(inner_products([db, pb, gb]), _PAIRS)
            if metric and metric[0] is not None:
                in_metric = inner_products([metric[0](db), metric[0](pb)])
                products = tf.concat([tf.gather_nd(in_metric, _PAIRS[:3]), products[3:]], 0)
            terms.append(products * tf.stack([damping, damping, damping, 1.0, 1.0]))
        dd, dp, pp, gd, gp = tf.unstack(tf.add_n(terms))
        if u_d:
            u_d, u_p = tf.add_n(u_d), tf.add_n(u_p)
            m = tf.cast(tf.shape(u_d)[0] if samples is None else samples, F64)
            dd += tf.reduce_sum(u_d * u_d) / m
            dp += tf.reduce_sum(u_d * u_p) / m
            pp += tf.reduce_sum(u_p * u_p) / m
        return cls(tf.reshape(tf.stack([dd, dp, dp, pp]), [2, 2]), tf.stack([gd, gp]))

    def value(self, a) -> tf.Tensor:
        """M(a₀ d + a₁ p) = −aᵀb + ½ aᵀGa."""
        a = tf.cast(a, F64)
        return -tf.reduce_sum(a * self.gradient) + 0.5 * tf.reduce_sum(
            a * tf.linalg.matvec(self.gram, a))

    def best(self, momentum: float | None) -> tf.Tensor:
        """argmin M: over both coefficients (momentum None), or over d's for p's fixed at
        `momentum`. Where p is zero (the first step) or parallel to d, p's coefficient is 0."""
        dd, dp, _, pp = tf.unstack(tf.reshape(self.gram, [4]))
        gd, gp = tf.unstack(self.gradient)
        if momentum is not None:
            mu = tf.constant(momentum, F64)
            return tf.stack([(gd - mu * dp) / dd, mu])
        det = dd * pp - dp * dp
        ok = det > 1e-10 * dd * pp
        safe = tf.where(ok, det, tf.ones_like(det))
        return tf.stack([tf.where(ok, (pp * gd - dp * gp) / safe, gd / dd),
                         tf.where(ok, (dd * gp - dp * gd) / safe, tf.zeros_like(det))])


def model_value(blocks, s, g, samples=None) -> tf.Tensor:
    """M(s) = −gᵀs + ½ sᵀCs for one step s, with `blocks`, the lists and `samples` as in
    `Subspace.of`: one projection U_bᵀs per block, where the model of span{d, p} needs two."""
    u, terms = [], []
    for project, damping, ids, *metric in blocks:
        sb, gb = [s[i] for i in ids], [g[i] for i in ids]
        if project is not None:
            u.append(tf.cast(project(sb), F64))
        products = inner_products([sb, gb])
        ss = (products[0, 0] if not metric or metric[0] is None
              else inner_products([metric[0](sb)])[0, 0])
        terms.append(0.5 * damping * ss - products[0, 1])
    value = tf.add_n(terms)
    if u:
        u = tf.add_n(u)
        m = tf.cast(tf.shape(u)[0] if samples is None else samples, F64)
        value += 0.5 * tf.reduce_sum(u * u) / m
    return value


def adam_model(g, step, velocity, eta) -> tf.Tensor:
    """−gᵀs + ½ sᵀ diag((√v + ε)/η) s for first-order variables stepped by Adam (float64)."""
    terms = []
    for gi, si, vi in zip(g, step, velocity):
        gi, si, vi = tf.cast(gi, F64), tf.cast(si, F64), tf.cast(vi, F64)
        terms.append(-tf.reduce_sum(gi * si) + 0.5 * tf.reduce_sum(
            si * si * (tf.sqrt(vi) + ADAM_EPSILON)) / eta)
    return tf.add_n(terms) if terms else tf.constant(0.0, F64)


def next_damping(damping, rho, every: int, lowest: float, highest: float) -> tf.Tensor:
    """Levenberg–Marquardt: λ/ω if ρ < ¼ (λ·10 if the loss rose, or ρ is not finite), λ·ω if
    ρ > ¾, else λ; ω = (19/20)^every; kept within [lowest, highest]."""
    omega = (19.0 / 20.0) ** every
    lam = tf.cast(damping, F64)
    new = tf.where(~tf.math.is_finite(rho) | (rho < 0.0), lam * 10.0,
                   tf.where(rho < 0.25, lam / omega, tf.where(rho > 0.75, lam * omega, lam)))
    return tf.clip_by_value(new, lowest, highest)


@dataclasses.dataclass(eq=False)
class DampingAdaptation:
    """One step's damping adaptation, between the model's prediction and the replayed loss."""

    replayer: LossReplay
    adapt: tf.Tensor  # bool: this step adapts λ
    h0: tf.Tensor  # h(θ), float64 (0 on other steps)
    predicted: tf.Tensor  # M(s), float64
    stepped: list  # (variable, its value before the step, its momentum slot)
    # refactor(λ): refactorize every cached Gram for a new λ, and the retries that took (int32)
    refactor: Callable[[tf.Tensor], tf.Tensor]
    damping: tf.Variable  # λ, float64
    damping_retries: tf.Variable
    interval: int  # damping_adaptation_interval
    checks: tf.Variable  # steps between checks now: `interval` times a power of 2 (int64)
    scheduled: tf.Tensor  # bool: this step is one of the every-`checks` steps (not an extra one)
    floor: float | None  # a fixed learning rate: λ never falls below λ₀ (else None)
    reduction_ratio: tf.Variable
    rejected_steps: tf.Variable

    @classmethod
    def begin(cls, replayer, adapt, predict, stepped, refactor, context, **variables
              ) -> "DampingAdaptation":
        """Before the update, on the steps that `adapt`: M(s) (`predict()`), the weights saved to
        take the step back, and h(θ) (`replayer.baseline`). Under tf.distribute (`context`),
        h(θ) is this replica's share, summed in `finish`, except a replayed one, which is
        summed here: the replay may synchronize, so it runs as `finish` runs it."""
        summed = context is not None and replayer.replays_baseline

        def before():
            predicted = predict()
            for v, saved, _ in stepped:
                saved.assign(v)
            return (tf.constant(0.0, F64) if summed else replayer.baseline()), predicted

        zero = tf.constant(0.0, F64)
        h0, predicted = tf.cond(adapt, before, lambda: (zero, zero))
        if summed:
            h0 = distribute.sum_across_replicas_if(
                context, adapt, lambda *inputs: replayer.baseline(list(inputs)),
                tuple(replayer.inputs()), zero)
        return cls(replayer, adapt, h0, predicted, stepped, refactor, **variables)

    def finish(self, taken, context) -> None:
        """After the update, on the steps that adapt λ (and only if the step was taken): the
        replayed loss h(θ + s), then `_adapt`."""
        go = tf.logical_and(self.adapt, taken)
        with tf.name_scope("tengrad_damping_adaptation"):
            if context is None:
                # One cond for all of it: the other steps run none of its ops.
                tf.cond(go, lambda: self._adapt(self.h0, self.replayer.evaluate(), go),
                        lambda: tf.constant(False))
                return
            # Under tf.distribute the losses are the replicas' shares of the global mean, and
            # every replica replays its own inputs (the replayer of the replica that runs the
            # merge would otherwise be used for all). λ is a mirrored variable, whose update in
            # replica context is a merge_call, which cannot sit in a cond branch: `_adapt` runs
            # on every step, gated by `go`.
            # A replayed h(θ) was summed over the replicas in `begin`.
            (h0,) = ([self.h0] if self.replayer.replays_baseline
                     else distribute.all_reduce_sum(context, [self.h0]))
            h1 = distribute.sum_across_replicas_if(
                context, go, lambda *inputs: self.replayer.evaluate(list(inputs)),
                tuple(self.replayer.inputs()), tf.constant(0.0, F64))
            self._adapt(h0, h1, go)

    def _space_checks(self, quiet, go) -> None:
        """A scheduled check that finds nothing to change (`quiet`: λ stays as it was, at its
        floor or above it, and the step did at least a quarter of what the model promised)
        doubles the steps to the next, up to MAX_CHECK_SPACING × the interval; any check's other
        finding (λ raised or lowered, a step taken back) brings them back to the interval. An
        extra check (after a weak step, or after a curvature update) that finds nothing leaves
        the spacing as it was: two quiet checks in a row must not double it twice. With a fixed
        learning rate quiet checks are most of them, and each replays the forward pass and
        projects the step on every block (docs/step.md, "Damping")."""
        current = tf.convert_to_tensor(self.checks)
        longer = tf.where(self.scheduled,
                          tf.minimum(2 * current, self.interval * MAX_CHECK_SPACING), current)
        spaced = tf.where(quiet, longer, tf.constant(self.interval, tf.int64))
        self.checks.assign(tf.where(go, spaced, current))

    def _adapt(self, h0, h1, go) -> tf.Tensor:
        """ρ = (h1 − h0) / M(s), λ from it, the cached factorizations made again for a new λ, and
        a step that raised the loss (ρ < 0) taken back: weights as before it, momentum cleared,
        counted in `rejected_steps`. Changes nothing where `go` is False."""
        rho = (h1 - h0) / tf.where(tf.equal(self.predicted, 0.0),
                                   -tf.ones_like(self.predicted), self.predicted)
        old = tf.convert_to_tensor(self.damping)
        new = next_damping(old, rho, self.interval, MIN_DAMPING, MAX_DAMPING)
        if self.floor is not None:
            # With a fixed learning rate λ never goes below the initial one: a small step is
            # always predicted well (ρ ≈ 1), which would drive λ towards 0 and the direction
            # into the null space of the stale curvature; λ is there to stop steps that raise
            # the loss. It comes back down to λ₀ once steps are predicted well again: a
            # ratchet (λ only rising) let one bad step slow the rest of training (λ 0.1 →
            # 12.9 in 80 steps on 3C1F, docs/step.md). With learning_rate="auto" it is the
            # model's damping, both ways.
            new = tf.maximum(new, tf.constant(self.floor, F64))
            self._space_checks(tf.logical_and(tf.equal(new, old), rho >= 0.25), go)
        self.damping.assign(tf.where(go, new, old))

        def refactor():
            # The cached factorizations follow λ here, where it changes, so that the steps in
            # between use the cache as it is (no per-step check of λ).
            self.damping_retries.assign_add(tf.cast(self.refactor(new), "int64"))
            return tf.constant(True)

        tf.cond(tf.logical_and(go, tf.not_equal(new, old)), refactor,
                lambda: tf.constant(False))
        self.reduction_ratio.assign(tf.where(go, rho, tf.convert_to_tensor(self.reduction_ratio)))

        def take_back():
            for v, saved, slot in self.stepped:
                v.assign(saved)
                slot.assign(tf.zeros_like(slot))
            self.rejected_steps.assign_add(1)
            return tf.constant(True)

        rejected = tf.logical_and(go, tf.logical_not(rho >= 0.0))
        tf.cond(rejected, take_back, lambda: tf.constant(False))
        return tf.constant(True)
