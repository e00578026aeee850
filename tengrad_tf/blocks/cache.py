"""A Fisher block's cache: what it keeps between curvature updates, its capacity, save and restore.

The cache is a set of replica-local tf.Variables (distribute.REPLICA_LOCAL: under tf.distribute
every replica writes the same values to its own copy) and a `filled` flag. Their leading (sample)
dimension is dynamic, since the batch size is only known at run time, unless the cache has a
fixed `capacity`: with `max_batch_size`, or a static batch size at the first trace, it holds that
many samples and smaller batches are zero-padded (`to_capacity`). Padded samples are zero rows of
U and the solve gives them zero weight, so this is exact; XLA needs it, because a variable's shape
cannot change under XLA.

What this module does not do: decide which kind of cache a block keeps (cost.py), or compute it.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tengrad_tf import _tf_private, distribute, eager_state, woodbury
from tengrad_tf.blocks.cost import CacheKind


class XlaCacheError(RuntimeError):
    """Under XLA the curvature cache needs a batch size that is static when the step is traced."""


def capacity_for(layer_name: str, batch: int | None, max_batch_size: int | None,
                 curvature_batches: int) -> int | None:
    """Samples a cache holds: fixed (int) or dynamic (None), for a layer first called on a
    replica's batch of `batch` samples (None: dynamic) and a window of `curvature_batches`."""
    capacity = batch
    if capacity is not None:  # under tf.distribute the cache holds the gathered global batch
        capacity *= distribute.replicas_in_sync()
    if max_batch_size is not None:
        if capacity is not None and capacity > max_batch_size:
            raise ValueError(
                f"layer '{layer_name}': this step's batch has {capacity} samples, more "
                f"than max_batch_size={max_batch_size}. Raise max_batch_size to the "
                "largest batch size used (the global batch under tf.distribute).")
        capacity = max_batch_size
    if capacity is not None:  # the window of curvature_batches batches
        capacity *= curvature_batches
    if capacity is None and _tf_private.in_xla_context():
        # XLA compiles a variable with the shape it has and cannot change it (an assign of
        # another shape fails: "Shape of resource ... cannot be changed after
        # initialization"), and Keras's fit traces its step with an unknown batch size.
        raise XlaCacheError(
            f"layer '{layer_name}': under XLA (jit_compile=True) the curvature cache "
            "needs a fixed number of samples, and this step was traced with an unknown batch "
            "size (model.fit does this when the number of samples is not a multiple of "
            "batch_size, or for a tf.data dataset batched without drop_remainder=True). Pass "
            "TENGraD(max_batch_size=<your batch_size>) (the largest batch the optimizer sees; "
            "smaller batches are zero-padded exactly), or compile with "
            "model.compile(jit_compile=False).")
    return capacity


def cache_layout(helper, cache: CacheKind, capacity: int | None, p: int | None, *,
                 adaptive_damping: bool, joint: bool, window: bool,
                 metric_form: str | None = None) -> dict[str, tuple]:
    """{field: (shape, dtype)} of a block's cache of kind `cache` (cost.py) for `capacity` samples
    and P = `p` positions: the factors (layer dtype), and the solve's state (float64).
    `metric_form` (metric.py): "whitened", the cache is of whitened input rows and keeps their
    factor L_A; "rows", it keeps the Cholesky factor of N and (κ, σ) (metric_rows.py)."""
    rows = [capacity] if p == 1 else [capacity, p]  # Dense factors: (m, D) matrices
    if cache is CacheKind.FACTORS:
        fields = {"a": rows + [helper.d_in], "g": rows + [helper.d_out]}
    elif cache is CacheKind.TOKENS:
        # Token ids are kept as floats (exact below 2²⁴, layers.EmbeddingHelper), so that every
        # cached tensor is one the core's finiteness check of fresh curvature can take.
        fields = {"tokens": [capacity, p], "g": [capacity, p, helper.d_out]}
    elif cache is CacheKind.PER_SAMPLE or (cache is CacheKind.INVERSE and adaptive_damping):
        fields = {"j": [capacity, *helper.matrix_shape]}
    else:
        fields = {}
    if metric_form == "whitened":
        fields["metric"] = [helper.d_in, helper.d_in]
    if joint:  # the network solve keeps the factorization (blocks/network.py)
        solve_state = {}
    elif cache is CacheKind.INVERSE:
        solve_state = {"inverse": [helper.size] * 2}
        if adaptive_damping:  # the λ it was built for
            solve_state["requested"] = []
    else:
        solve_state = {"cholesky": [capacity, capacity]}
        if adaptive_damping:  # K and the λ it was factorized for
            solve_state.update(gram=[capacity, capacity], requested=[])
    if metric_form == "rows":
        solve_state.update(metric_cholesky=[capacity, capacity], metric_scale=[2])
    if "requested" in solve_state or window:
        solve_state["samples"] = []  # m, the real samples (the cache may be zero-padded)
    if not joint:
        solve_state["damping"] = []
    return {**{n: (shape, helper.dtype) for n, shape in fields.items()},
            **{n: (shape, woodbury.SOLVE_DTYPE) for n, shape in solve_state.items()}}


class Cache:
    """Replica-local variables {field: (shape, dtype)}, None in a shape for a dynamic dimension,
    named after the layer; fields in `ones` start at 1, the others at 0."""

    def __init__(self, layer_name: str, fields: dict[str, tuple[list, tf.DType]],
                 capacity: int | None, max_batch_size: int | None, ones: tuple[str, ...] = ()):
        self.layer_name = layer_name
        self.capacity = capacity
        self.max_batch_size = max_batch_size

        def var(name, shape, dtype):
            make = tf.ones if name in ones else tf.zeros
            return tf.Variable(make([0 if d is None else d for d in shape], dtype),
                               shape=tf.TensorShape(shape), trainable=False,
                               name=f"{layer_name}_{name}", **distribute.REPLICA_LOCAL)

        with eager_state.outside_the_step():
            self.variables = {n: var(n, shape, dtype) for n, (shape, dtype) in fields.items()}
            # False until curvature is first stored: a fresh or restored optimizer that starts in
            # the middle of a reuse window must not precondition with an empty cache.
            self.filled = tf.Variable(False, trainable=False, name=f"{layer_name}_filled",
                                      **distribute.REPLICA_LOCAL)

    def __contains__(self, field: str) -> bool:
        return field in self.variables

    def read(self) -> dict[str, tf.Tensor]:
        return {k: v.read_value() for k, v in self.variables.items()}

    def store(self, values: dict[str, tf.Tensor], fields) -> None:
        """Assign `fields` of `values` and mark the cache filled."""
        for k in fields:
            self.variables[k].assign(values[k])
        self.filled.assign(True)

    def window(self, fresh: dict[str, tf.Tensor], batches: int) -> dict[str, tf.Tensor]:
        """curvature_batches = k (`batches`): this batch's samples first, then up to (k − 1)·m
        real (not padding) samples of the previous updates held here; the oldest go."""
        m = tf.shape(next(iter(fresh.values())))[0]
        held = tf.cast(self.variables["samples"], tf.int32)
        keep = tf.where(self.filled, tf.minimum(held, (batches - 1) * m), 0)
        return {k: tf.concat([t, self.variables[k][:keep]], axis=0) for k, t in fresh.items()}

    # ---- saving and restoring (resume.py) ------------------------------------------------------
    @property
    def state_variables(self) -> dict[str, tf.Variable]:
        return {**self.variables, "filled": self.filled}

    def reset(self) -> None:
        """Forget the cache: the next step computes fresh curvature."""
        distribute.assign_on_every_replica(self.filled, False)

    def load(self, arrays: dict) -> None:
        """Set the cache from saved arrays (eagerly). A cache saved with another capacity (the first
        batch size, when static) is re-padded exactly as `to_capacity` pads a smaller batch."""
        fields = set(self.state_variables)
        mismatch = (f"layer '{self.layer_name}': the saved curvature does not fit this block "
                    "(the saved optimizer belongs to another model, or the model's layers or "
                    "dtype changed); ")
        if set(arrays) != fields:
            raise ValueError(mismatch + f"saved fields {sorted(arrays)}, expected {sorted(fields)}.")
        cache = {}
        # Samples held by the saved cache (None for the explicit inverse alone: no sample axis).
        m = next((np.shape(arrays[k])[0] for k in ("cholesky", "j") if k in arrays), None)
        for k, v in self.variables.items():
            value = tf.convert_to_tensor(arrays[k])
            # Compare all but the sample axes, which `to_capacity` adapts below.
            want = ([m, m] if k in ("cholesky", "gram", "metric_cholesky") else
                    [m, *v.shape[1:]] if k in ("a", "g", "j", "tokens") else v.shape)
            if value.dtype != v.dtype or not value.shape.is_compatible_with(want):
                raise ValueError(mismatch + f"'{k}' was saved as {value.dtype.name} "
                                 f"{value.shape}, the cache holds {v.dtype.name} {v.shape}.")
            cache[k] = value
        if self.capacity is not None and m is not None:
            if m > self.capacity:
                raise ValueError(
                    f"layer '{self.layer_name}': the saved curvature holds {m} samples, but this "
                    f"cache has a fixed capacity of {self.capacity} (max_batch_size, or the batch "
                    "size when it was static at the first trace). Resume with max_batch_size at "
                    "least as large as the saved cache.")
            cache = self.to_capacity(cache)
        for k, v in self.variables.items():
            distribute.assign_on_every_replica(v, cache[k])
        distribute.assign_on_every_replica(self.filled, bool(arrays["filled"]))

    def to_capacity(self, state: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Zero-pad the sample dimension up to the cache capacity (Cholesky: identity block)."""
        # The inverse has no sample dimension; under adaptive damping its J beside it has one.
        if self.capacity is None or ("inverse" in state and "j" not in state):
            return state
        cap = self.capacity
        too_large = (f"layer '{self.layer_name}': a batch of more than {cap} samples does not fit "
                     "the curvature cache, whose size is fixed by " + (
                         f"max_batch_size={self.max_batch_size}. Raise max_batch_size to the "
                         "largest batch size used." if self.max_batch_size is not None else
                         "the first batch (its size was static when traced). Make the first batch "
                         "the largest, or pass TENGraD(max_batch_size=<largest batch size>)."))
        rows = next(state[k] for k in ("cholesky", "gram", "j") if k in state)  # m × …
        if rows.shape[0] is not None and rows.shape[0] > cap:
            raise ValueError(too_large)  # static: say so while tracing
        m = tf.shape(rows)[0]
        # A dynamic batch size is checked at run time. XLA drops Assert ops, and a negative padding
        # would silently crop instead; so the padding is clamped at 0 and the shape check below,
        # which XLA does when it compiles for the actual batch size, fails for an oversized batch
        # (naming this node, e.g. "…/batch_larger_than_cache_capacity_4_raise_max_batch_size").
        check = tf.debugging.assert_less_equal(m, cap, message=too_large)
        node = f"batch_larger_than_cache_capacity_{cap}_raise_max_batch_size"
        out = {}
        with tf.control_dependencies([] if check is None else [check]):
            pad = tf.maximum(cap - m, 0)
            for k, t in state.items():
                if t.shape.rank == 0 or k in ("inverse", "metric", "metric_scale"):  # no samples
                    out[k] = t
                    continue
                if k in ("cholesky", "metric_cholesky"):
                    eye = tf.eye(cap, dtype=t.dtype)[m:, m:]
                    padded = tf.pad(t, [[0, pad], [0, pad]]) + tf.pad(eye, [[m, 0], [m, 0]])
                elif k == "gram":
                    padded = tf.pad(t, [[0, pad], [0, pad]])
                else:
                    padded = tf.pad(t, [[0, pad]] + [[0, 0]] * (t.shape.rank - 1))
                # The joint mode's Gram goes to the network solve, not to this cache.
                shape = self.variables[k].shape if k in self.variables else [cap, cap]
                out[k] = tf.ensure_shape(padded, shape, name=node)
        return out
