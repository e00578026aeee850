"""One step's curvature data of a Fisher block: what to cache, and the Gram K = UᵀU, per cache kind.

Pure functions of the layer's helper (its rows and structure), the step's captured inputs and
per-sample output gradients (one entry per call of the layer: a shared layer contributes every call
to the same per-sample gradient, rows concatenated along the position axis or explicit per-sample
gradients summed, which is exact), and the memory budget one chunk of an intermediate may use. The
math itself is per_sample.py's (Kronecker-structured and explicit per-sample gradients) and
tokens.py's (lookup tables); this module picks the route and lays the cache out.
"""

from __future__ import annotations

import math

import tensorflow as tf

from tengrad_tf.blocks import cost, per_sample, tokens
from tengrad_tf.blocks.cost import CacheKind
from tengrad_tf.layers import Structure

_BYTES = 4  # float32; float64 models double it, which the budget check below ignores


def total_positions(helper, inputs: list[tf.Tensor]) -> int | None:
    """P summed over the layer's calls in a step (None if any is dynamic)."""
    ps = [helper.positions(x.shape) for x in inputs]
    return None if None in ps else sum(ps)


def input_rows(helper, inputs) -> tf.Tensor:
    return tf.concat([helper.input_rows(x) for x in inputs], axis=1)


def output_rows(helper, output_grads) -> tf.Tensor:
    return tf.concat([helper.output_rows(dz) for dz in output_grads], axis=1)


def per_sample_gradients(helper, inputs, output_grads, memory_budget: int) -> tf.Tensor:
    """J, the explicit per-sample gradients (m, *matrix), chunked over samples."""
    chunk = _per_sample_chunk(helper, inputs, output_grads, memory_budget)
    if helper.structure is Structure.KRONECKER and helper.per_sample_from_rows:
        return per_sample.per_sample(lambda xs: input_rows(helper, xs), inputs,
                                     output_rows(helper, output_grads), chunk)
    if helper.structure is Structure.TOKENS:  # small tables only (cost.cache_kind)
        ids = tf.concat([helper.tokens(x) for x in inputs], axis=1)
        return tokens.per_sample(ids, output_rows(helper, output_grads), helper.vocabulary)
    n = len(inputs)
    return per_sample.map_sample_chunks(
        lambda *ts: tf.add_n([helper.per_sample_gradients(ts[k], ts[n + k]) for k in range(n)]),
        [*inputs, *output_grads], chunk, dtype=helper.dtype)


def _per_sample_chunk(helper, inputs, output_grads, memory_budget: int) -> int | None:
    """Samples per chunk of J's intermediate (patches or per-sample gradients); None: one piece,
    where it is not larger than the inputs, output gradients and J it is computed between."""
    intermediate = sum(helper.per_sample_elements(x.shape) for x in inputs)
    held = helper.size + sum(cost.elements_per_sample(t.shape) for t in [*inputs, *output_grads])
    return cost.chunk(memory_budget, intermediate, held, _BYTES)


def pair_chunk(g: tf.Tensor, memory_budget: int) -> tf.Tensor:
    """Rows i per chunk of a pairwise Gram: a chunk holds (rows, m, P, P) products, twice; m and P
    are known at run time only."""
    m, p_now = tf.shape(g)[0], tf.shape(g)[1]
    return tf.maximum(1, memory_budget // (_BYTES * 2 * p_now * p_now * m))


def cache_fields(helper, cache: CacheKind, inputs, output_grads, memory_budget: int
                 ) -> dict[str, tf.Tensor]:
    """This batch's cache fields, laid out as stored, without a Gram."""
    if cache is CacheKind.TOKENS:
        ids = tf.concat([helper.tokens(x) for x in inputs], axis=1)
        return {"tokens": tf.cast(ids, helper.dtype), "g": output_rows(helper, output_grads)}
    if cache is CacheKind.PER_SAMPLE:
        return {"j": per_sample_gradients(helper, inputs, output_grads, memory_budget)}
    a = input_rows(helper, inputs)
    g = output_rows(helper, output_grads)
    if total_positions(helper, inputs) == 1:
        a, g = a[:, 0], g[:, 0]
    return {"a": a, "g": g}


def gram_of_fields(fields: dict[str, tf.Tensor], memory_budget: int,
                   rows_of: dict[str, tf.Tensor] | None = None, repeats: int = 1) -> tf.Tensor:
    """K = UᵀU over the samples of cache fields (route F for factors: J is never formed).
    rows_of: the cache fields of m' other samples (J or factors, not a lookup table's) → only
    their rows, (m', m). repeats: per_sample.gram_factored's."""
    if "j" in fields:
        return per_sample.gram_explicit(fields["j"], None if rows_of is None else rows_of["j"])
    g = fields["g"]
    if "tokens" in fields:
        if rows_of is not None:
            raise ValueError("a lookup table's Gram has no route for other samples' rows")
        return tokens.gram(tf.cast(fields["tokens"], tf.int32), g, pair_chunk(g, memory_budget),
                           memory_budget)
    return per_sample.gram_factored(
        fields["a"], g, None if g.shape.rank == 2 else pair_chunk(g, memory_budget),
        None if rows_of is None else (rows_of["a"], rows_of["g"]), repeats)


def gram_of_window(fresh: dict[str, tf.Tensor], window: dict[str, tf.Tensor], held: tf.Tensor,
                   memory_budget: int, repeats: int = 1) -> tf.Tensor:
    """K over a window of curvature_batches batches (cache fields: this batch's `fresh` samples
    first, then the held ones), given `held`, the Gram the cache keeps from the last update: its
    leading block is the held samples' own. Only the fresh rows are new, m·n products of the n²:
    k times fewer for a window of k batches. A lookup table sums its matching pairs over the
    whole window (they are few; tokens.py has no cross-batch route). Returned in `held`'s dtype."""
    if "tokens" in fresh:
        return tf.cast(gram_of_fields(window, memory_budget), held.dtype)
    rows = tf.cast(gram_of_fields(window, memory_budget, fresh, repeats), held.dtype)  # (m, n)
    m, n = tf.shape(rows)[0], tf.shape(rows)[1]
    older = tf.concat([tf.transpose(rows[:, m:]), held[:n - m, :n - m]], axis=1)
    return tf.concat([rows, older], axis=0)


def cache_and_gram(helper, cache: CacheKind, inputs, output_grads, threshold: float,
                   memory_budget: int, repeats: int = 1) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
    """What to cache ({"a", "g"}, {"j"} or {"tokens", "g"}) and the Gram K = UᵀU, by route F
    below `threshold` samples and route E above (cost.factored_threshold); repeats:
    per_sample.gram_factored's."""
    if cache is CacheKind.TOKENS or not cost.is_kronecker(helper):  # one route only
        fields = cache_fields(helper, cache, inputs, output_grads, memory_budget)
        return fields, gram_of_fields(fields, memory_budget)
    j = (None if cache is CacheKind.FACTORS
         else per_sample_gradients(helper, inputs, output_grads, memory_budget))
    p = total_positions(helper, inputs)
    g = output_rows(helper, output_grads)

    # A factors cache keeps the patch rows Â: both routes start from them.
    a = input_rows(helper, inputs) if cache is CacheKind.FACTORS else None

    def route_f():
        rows = input_rows(helper, inputs) if a is None else a
        return per_sample.gram_factored(rows, g, pair_chunk(g, memory_budget), repeats=repeats)

    def route_e():
        if j is not None:
            return per_sample.gram_explicit(j)
        # J from the cached rows, in chunks of samples, dropped after the Gram.
        return per_sample.gram_explicit(per_sample.per_sample(
            lambda rows: rows[0], [a], g,
            _per_sample_chunk(helper, inputs, output_grads, memory_budget)))

    # The cache (what is smaller to keep) and the Gram route (what is cheaper to compute) are
    # separate choices: with P > 1 positions, route F's m²P²(D_in + D_out) can exceed route E's
    # m·P·D_in·D_out + m²·D_in·D_out even when the factors are the smaller cache (a Dense layer on
    # sequences, a late convolution).
    if threshold == math.inf:
        gram = route_f()
    elif threshold < 1:
        gram = route_e()
    elif g.shape[0] is not None:
        # A static batch decides the route here: a tf.cond on a constant predicate would be folded
        # by grappler, and a pruned branch holding a chunk loop (map_fn) breaks its topological
        # sort, after which it leaves the step unoptimized.
        gram = route_f() if g.shape[0] < threshold else route_e()
    else:
        gram = tf.cond(tf.cast(tf.shape(g)[0], tf.float64) < threshold, route_f, route_e)
    if cache is CacheKind.PER_SAMPLE:
        return {"j": j}, gram
    if p == 1:  # stored as matrices: the steps between updates then need no slicing
        a, g = a[:, 0], g[:, 0]
    return {"a": a, "g": g}, gram
