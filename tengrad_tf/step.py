"""One traced step of a preconditioned optimizer, as the stages of `apply` fill it in.

`PreconditionedOptimizer.apply` runs its stages in order (preconditioned.py): bind, curvature and
directions (directions.py), step length (step_length.py), take or skip. Each reads what the earlier
ones found from one `Step` and adds its own part; nothing here builds ops but ⟨d, g⟩ and the
finiteness check.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import tensorflow as tf

from tengrad_tf.record import StepView


@dataclasses.dataclass(eq=False)
class Step:
    """What one traced step has found so far: filled in by the stages of `apply`, in order."""

    record: StepView
    variables: list
    grads: list  # the true (unscaled, all-reduced) gradients; None where a variable has none
    scale: float  # loss_scale_factor (1.0 if none)
    context: Any  # the replica context under tf.distribute, else None
    counter: tf.Tensor = None  # the iteration counter, read once
    fresh: tf.Tensor = None  # bool: some block refreshes its curvature
    losses: list = None  # the loss calls that reach this optimizer's layers
    stores: list = dataclasses.field(default_factory=list)  # (block, its curvature)
    parts: list = dataclasses.field(default_factory=list)  # (block, variable indices, curvature)
    retries: list = dataclasses.field(default_factory=list)  # damping retries (int32 tensors)
    network: Any = None  # fisher_blocks="network": (NetworkSolve, what solves, what to keep)
    directions: list = None
    first_order: list = None  # indices of the variables without a block that have a gradient
    d_dot_g: tf.Tensor = None  # ⟨d, g⟩ of the final directions, float64
    adapting: Any = None  # adaptive.DampingAdaptation of this step, or None
    _finite: tf.Tensor = None

    def index(self) -> dict[int, int]:
        return {id(v): i for i, v in enumerate(self.variables)}

    def finite(self) -> tf.Tensor:
        """Whether the step can be taken (a bool tensor, built once, after ⟨d, g⟩): the damping
        adaptation asks before the update, so that a skipped step writes no state, and the
        update after it."""
        if self._finite is None:
            # ⟨d, g⟩ is finite only if every dᵢ and gᵢ is: a NaN or ±Inf anywhere makes the sum
            # NaN or ±Inf (Inf·0 is NaN). One scalar check instead of one per variable, and the
            # KL clip needs the sum anyway. Cached curvature was stored only when finite, so only
            # fresh curvature needs the check (on a 3C1F reuse step it would read a 75 MB
            # per-sample-gradient cache for nothing).
            curvature_finite = tf.cond(self.fresh, lambda: all_finite(
                [t for _, c in self.stores for t in c.values()]), lambda: tf.constant(True))
            self._finite = tf.logical_and(tf.math.is_finite(self.d_dot_g), curvature_finite)
        return self._finite


def all_finite(tensors) -> tf.Tensor:
    """Whether every element of every tensor is finite (a bool scalar), in two ops per tensor.

    t·0 is 0 where t is finite and NaN where it is not, so the L2 norm of t·0 is 0 or NaN, and
    cannot overflow as a norm or sum of t itself could. reduce_all(is_finite(t)) takes three to
    six ops per tensor (its reduction axes too): a step stores some 40 tensors of curvature on
    3C1F and 75 on the Transformer, and every op is paid again at the first step's tracing."""
    zeros: dict[tf.DType, tf.Tensor] = {}
    norms = []
    for t in tensors:
        if t.dtype not in zeros:
            zeros[t.dtype] = tf.zeros([], t.dtype)
        norms.append(tf.nn.l2_loss(t * zeros[t.dtype]))
    if not norms:
        return tf.constant(True)
    return tf.math.is_finite(float64_total(norms))


def inner_product(directions, grads) -> tf.Tensor:
    """⟨d, g⟩ over every variable with a direction, as a float64 scalar.

    Each variable is reduced in its own dtype; the per-variable sums are stacked per dtype and added
    in float64 (one cast per dtype rather than one per variable: a step's op count is its cost on
    small models)."""
    sums = [tf.reduce_sum(d * tf.cast(g, d.dtype)) for d, g in zip(directions, grads)
            if d is not None]
    if not sums:
        return tf.constant(0.0, tf.float64)
    return float64_total(sums)


def float64_total(scalars) -> tf.Tensor:
    """The sum of scalars of any float dtypes, in float64: stacked per dtype and cast once per
    dtype, rather than once per scalar (a step's op count is its cost on small models)."""
    by_dtype: dict[tf.DType, list[tf.Tensor]] = {}
    for x in scalars:
        by_dtype.setdefault(x.dtype, []).append(x)
    return tf.add_n([tf.reduce_sum(tf.cast(tf.stack(xs), tf.float64))
                     for xs in by_dtype.values()])
