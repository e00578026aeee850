"""tf.distribute support: a TENGraD/K-FAC step over R replicas is one step on the global batch.

Under a `tf.distribute` strategy Keras runs the train step once per replica on that replica's share
of the global batch (m = Σ_r m_r samples), divides each replica's loss by R = num_replicas_in_sync,
and calls the optimizer's `apply` in replica context. Keras then all-reduces (SUM) whatever
gradients `apply` hands it and applies them once per variable. The core (preconditioned.py) uses
the helpers here so that a step is exactly that of one device on the m samples:

  1. Gradients: all-reduced (SUM) before preconditioning. With Keras's 1/R loss scaling the sum is
     the gradient of the global batch mean. The KL clip (nonlinear in g) and the finiteness check
     then see the global gradient, identically on every replica.
  2. Curvature: on steps where a block refreshes its curvature, the layer inputs and the per-sample
     output gradients of every block are all-gathered along the sample axis, in one collective for
     all layers. Each replica then forms the same global m × m Gram and Cholesky factor (K-FAC: the
     same global factors), so the Fisher is that of the global batch, not an average of per-replica
     inverses. On other steps the gather carries one row of zeros per tensor.
     The gather happens outside the blocks' `tf.cond` on purpose: a collective in replica context is
     a `merge_call`, and a `merge_call` inside a `tf.cond` branch is an error under
     MirroredStrategy.
  3. Directions: identical on every replica. Replica 0 hands Keras d and the others zeros, so
     Keras's all-reduce SUM gives d exactly (dividing by R instead would round for R = 3 and would
     change what Keras's per-replica clipnorm/clipvalue/global_clipnorm do).
  4. The skip of non-finite steps: the `cond` runs in cross-replica context through `merge_call`,
     with the taken step run per replica inside it, as Keras's LossScaleOptimizer does.

Per-block caches are replica-local variables (SyncOnRead, ONLY_FIRST_REPLICA): every replica writes
its own copy with the same values, no cross-device traffic; a checkpoint saves the first replica's.

What crosses devices per step, in floats: the gradients twice (the all-reduce of g here, Keras's of
d), like SGD's once; on curvature steps, per layer, m · (elements of one sample's layer input +
elements of its output gradient), e.g. m·(n_in + n_out) for a Dense layer, never a d × d matrix.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import tensorflow as tf

# Strategies this module is written and tested for. Others (ParameterServerStrategy: asynchronous
# updates; TPUStrategy and CentralStorageStrategy: not tested) raise a clear error.
_SUPPORTED = (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy,
              tf.distribute.OneDeviceStrategy)

#: Variable arguments for per-replica state that every replica computes identically (curvature
#: caches): each replica reads and writes its own copy; a checkpoint saves the first replica's.
REPLICA_LOCAL = dict(synchronization=tf.VariableSynchronization.ON_READ,
                     aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


def assign_on_every_replica(variable: tf.Variable, value) -> None:
    """`variable.assign(value)` on every local replica's copy.

    A block's saved state is restored while a step is traced in one replica's context, where the
    assign of a replica-local variable would set that replica's copy only. Without a strategy this
    is a plain assign.
    """
    for local in tf.distribute.get_strategy().experimental_local_results(variable):
        local.assign(value)


class DistributionError(RuntimeError):
    """The optimizer was used with a tf.distribute setup it does not support."""


def replica_context(optimizer_name: str):
    """The replica context of a distributed step, or None when no strategy is in use.

    Raises DistributionError for unsupported strategies and for calls in cross-replica context.
    """
    if not tf.distribute.has_strategy():
        return None
    strategy = tf.distribute.get_strategy()
    if not isinstance(strategy, _SUPPORTED):
        raise DistributionError(
            f"{optimizer_name} supports MirroredStrategy, MultiWorkerMirroredStrategy and "
            f"OneDeviceStrategy, not {type(strategy).__name__}: its exact Fisher needs every "
            "replica's samples in each synchronous step. Use one of those strategies.")
    context = tf.distribute.get_replica_context()
    if context is None:
        raise DistributionError(
            f"{optimizer_name}.apply was called in cross-replica context; call it inside "
            "strategy.run (model.fit does this).")
    return context


def replicas_in_sync() -> int:
    """R, the number of replicas a step runs on (1 without a strategy, or in cross-replica
    context)."""
    context = tf.distribute.get_replica_context()
    return 1 if context is None else context.num_replicas_in_sync


def all_reduce_sum(context, tensors: Sequence[tf.Tensor | None]) -> list[tf.Tensor | None]:
    """SUM over replicas of every non-None tensor, in one batched collective; None stays None."""
    present = [t for t in tensors if t is not None]
    if not present:
        return list(tensors)
    reduced = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, present))
    return [None if t is None else next(reduced) for t in tensors]


def gather_samples(context, tensors: Sequence[tf.Tensor], when) -> list[tf.Tensor]:
    """All-gather tensors along axis 0 (samples) across replicas, in replica order, when `when`.

    When `when` is False every replica sends one row of zeros instead, so the collective still
    runs (a collective cannot sit inside a tf.cond branch in replica context) but carries almost
    nothing; the caller ignores the result then. Not zero rows: an all-gather of zero-size tensors
    crashes the process (segmentation fault, TF 2.21, MirroredStrategy on CPUs). Tensors that are
    the same object are gathered once.
    """
    unique: dict[int, tf.Tensor] = {}
    for t in tensors:
        unique.setdefault(id(t), t)
    keys = list(unique)
    gated = [tf.cond(when, lambda t=t: t,
                     lambda t=t: tf.zeros(tf.concat([[1], tf.shape(t)[1:]], 0), t.dtype))
             for t in unique.values()]
    gathered = context.all_gather(gated, axis=0) if gated else []
    # The collective loses the static shape; the blocks need it for every axis but the samples.
    gathered = {k: tf.ensure_shape(g, [None] + t.shape[1:])
                for k, g, t in zip(keys, gathered, unique.values())}
    return [gathered[id(t)] for t in tensors]


def first_replica_only(context, tensors: Sequence[tf.Tensor | None]) -> list[tf.Tensor | None]:
    """t on replica 0 and zeros elsewhere, so that Keras's all-reduce SUM of them is exactly t."""
    first = tf.equal(context.replica_id_in_sync_group, 0)
    return [None if t is None else tf.where(first, t, tf.zeros_like(t)) for t in tensors]


def cond_across_replicas(context, pred: tf.Tensor, per_replica_fn: Callable[..., Any],
                         per_replica_args: tuple, once_fn: Callable[..., Any], once_args: tuple,
                         false_fn: Callable[[], Any]) -> None:
    """`if pred: once_fn(*once_args); per_replica_fn(*per_replica_args) on every replica;
    else: false_fn()`, for a `pred` that is equal on all replicas.

    The cond runs in cross-replica context, where a branch may contain merge_calls (Keras's `apply`
    does). `once_fn` and `false_fn` run there too, once, for state that is updated once (counters),
    with the first replica's `once_args`; `per_replica_fn` gets each replica's own arguments.
    """

    def merge_fn(strategy, pred, per_replica_args, once_args):
        def first(value):
            return value if value is None else strategy.experimental_local_results(value)[0]

        def taken():
            once_fn(*tf.nest.map_structure(first, once_args))
            strategy.extended.call_for_each_replica(per_replica_fn, args=per_replica_args)

        tf.cond(first(pred), taken, false_fn)

    context.merge_call(merge_fn, args=(pred, tuple(per_replica_args), tuple(once_args)))


def sum_across_replicas_if(context, pred: tf.Tensor, per_replica_fn: Callable[..., tf.Tensor],
                           per_replica_args: tuple, zero: tf.Tensor) -> tf.Tensor:
    """Σ over replicas of `per_replica_fn(*per_replica_args)` if `pred` (equal on all replicas),
    else `zero`; each replica's function gets its own arguments.

    For work that may synchronize inside (a model call whose BatchNormalization updates mirrored
    moving statistics, a merge_call): a merge_call may not sit in a tf.cond branch in replica
    context, so the cond runs in cross-replica context, and the function per replica inside it, as
    `cond_across_replicas` does it."""

    def merge_fn(strategy, pred, per_replica_args):
        def taken():
            values = strategy.extended.call_for_each_replica(per_replica_fn,
                                                             args=per_replica_args)
            return strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None)

        return tf.cond(strategy.experimental_local_results(pred)[0], taken, lambda: zero)

    return context.merge_call(merge_fn, args=(pred, tuple(per_replica_args)))
