"""Per-sample gradient algebra for lookup tables (Embedding), without ever forming a V × D row.

Sample i uses tokens tokᵢₜ (P per sample) with output gradients gᵢₜ (D); its gradient is the sparse
V × D matrix uᵢ = Σₜ e_{tokᵢₜ} gᵢₜᵀ, the one-hot special case of per_sample.py's Âᵢᵀ Gᵢ:

  gram        Kᵢⱼ = Σₜₛ [tokᵢₜ = tokⱼₛ] gᵢₜ·gⱼₛ             (route F with ÂᵢÂⱼᵀ = token matches),
              from the matching pairs of positions only, or from all m²P² pairs
  project     (Uᵀv)ᵢ = Σₜ ⟨V[tokᵢₜ], gᵢₜ⟩                  (a gather)
  combine     U s = Σᵢₜ sᵢ e_{tokᵢₜ} gᵢₜᵀ                   (a scatter-add into V × D)
  per_sample  the dense uᵢ, (m, V, D): only for small tables (blocks.base.DIRECT_MAX_DIM)

Positions whose output gradient is zero (masked, or zero padding of the cache) contribute nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

from tengrad_tf import _tf_private
from tengrad_tf.blocks.per_sample import map_sample_chunks

Tensor = tf.Tensor


# A matching pair costs two gathered rows of G and a scattered sum, where a pair of the m²P² costs
# one multiply-add per element of a batched product. Measured on the 2-core CPU (m = 128, P = 64,
# D = 64, random tokens): the matching pairs took 1.7 ms against 68 ms for all pairs at 0.02 % of
# them (a 20,000-token table), 16 against 65 ms at 0.5 %, 50 against 63 ms at 2 %, and 119 against
# 64 ms at 5 %. So they are used when they are at most 1/40 of all pairs.
ALL_PAIRS_PER_MATCH = 40


def gram(tokens: Tensor, g: Tensor, chunk: int | Tensor | None = None,
         memory_budget: int | None = None) -> Tensor:
    """tokens (m, P) int, g (m, P, D) → K (m, m).

    Only positions holding the same token contribute, and a batch has Σᵥ nᵥ² such pairs for the
    nᵥ uses of each token v, against m²P² pairs in all. With a `memory_budget` (bytes), K is
    summed over the matching pairs when their gathered rows fit in it and they are few enough
    (ALL_PAIRS_PER_MATCH); otherwise, or without a budget, or under XLA (which has no
    unique-with-counts, and needs static shapes), over all pairs, `chunk` rows i at a time (a
    chunk holds (rows, m, P, P) products)."""
    if memory_budget is None or _tf_private.in_xla_context():
        return _gram_all_pairs(tokens, g, chunk)
    matches = _matches(tokens)
    n = tf.cast(tf.size(tokens), tf.int64)
    pairs = tf.reduce_sum(tf.square(matches.counts))
    fits = pairs * (2 * g.shape[-1] + 4) * g.dtype.size <= memory_budget
    worth_it = pairs * ALL_PAIRS_PER_MATCH <= n * n
    return tf.cond(tf.logical_and(fits, worth_it),
                   lambda: _gram_matching_pairs(matches, pairs, g, tf.shape(tokens)[0]),
                   lambda: _gram_all_pairs(tokens, g, chunk))


class _Matches(NamedTuple):
    """The positions of a batch (flattened, sample-major) grouped by token: `order` lists them by
    token, `starts`/`counts` (int64) give each token's run in it, `run` each sorted position's."""

    order: Tensor
    run: Tensor
    starts: Tensor
    counts: Tensor


def _matches(tokens: Tensor) -> _Matches:
    flat = tf.reshape(tokens, [-1])
    order = tf.argsort(flat, stable=True)
    _, run, counts = tf.unique_with_counts(tf.gather(flat, order), out_idx=tf.int64)
    return _Matches(order, run, tf.cumsum(counts, exclusive=True), counts)


def _gram_matching_pairs(matches: _Matches, pairs: Tensor, g: Tensor, m: Tensor) -> Tensor:
    """K from the `pairs` (Σᵥ nᵥ², int64) pairs (a, b) of positions with the same token:
    Kᵢⱼ += g_a·g_b for a in sample i and b in sample j. Each sorted position a pairs with every
    position of its token's run."""
    flat_g = tf.reshape(g, [-1, g.shape[-1]])
    p = tf.shape(g)[1]
    length = tf.gather(matches.counts, matches.run)  # of each sorted position's run
    first = tf.repeat(tf.range(tf.size(length, out_type=tf.int64)), length)  # a, sorted
    within = tf.range(pairs) - tf.gather(tf.cumsum(length, exclusive=True), first)
    second = tf.gather(tf.gather(matches.starts, matches.run), first) + within  # b, sorted
    a, b = tf.gather(matches.order, first), tf.gather(matches.order, second)
    products = tf.reduce_sum(tf.gather(flat_g, a) * tf.gather(flat_g, b), axis=1)
    pair_of_samples = (a // p) * m + b // p
    return tf.reshape(tf.math.unsorted_segment_sum(products, pair_of_samples, m * m), [m, m])


def _gram_all_pairs(tokens: Tensor, g: Tensor, chunk: int | Tensor | None) -> Tensor:
    """K from all m²P² pairs of positions, the matches masked in."""

    def rows(tok_rows, g_rows):
        match = tf.equal(tok_rows[:, None, :, None], tokens[None, :, None, :])
        products = tf.einsum("ipd,jqd->ijpq", g_rows, g)
        return tf.reduce_sum(tf.where(match, products, tf.zeros_like(products)), axis=[2, 3])

    return map_sample_chunks(rows, [tokens, g], chunk, dtype=g.dtype)


def project(tokens: Tensor, g: Tensor, v: Tensor) -> Tensor:
    """Uᵀv for v (V, D) → (m, 1)."""
    return tf.reshape(tf.reduce_sum(tf.gather(v, tokens) * g, axis=[1, 2]), [-1, 1])


def combine(tokens: Tensor, g: Tensor, s: Tensor, vocabulary: int) -> Tensor:
    """U s for s (m, 1) → (V, D)."""
    weighted = tf.reshape(g * s[:, :, None], [-1, g.shape[-1]])
    return tf.math.unsorted_segment_sum(weighted, tf.reshape(tokens, [-1]), vocabulary)


def per_sample(tokens: Tensor, g: Tensor, vocabulary: int) -> Tensor:
    """The dense per-sample gradients (m, V, D)."""
    m = tf.shape(tokens)[0]
    ids = tokens + vocabulary * tf.range(m)[:, None]
    dense = tf.math.unsorted_segment_sum(tf.reshape(g, [-1, g.shape[-1]]), tf.reshape(ids, [-1]),
                                         m * vocabulary)
    return tf.reshape(dense, [m, vocabulary, g.shape[-1]])
