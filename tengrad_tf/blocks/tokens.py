"""Per-sample gradient algebra for lookup tables (Embedding), without ever forming a V × D row.

Sample i uses tokens tokᵢₜ (P per sample) with output gradients gᵢₜ (D); its gradient is the sparse
V × D matrix uᵢ = Σₜ e_{tokᵢₜ} gᵢₜᵀ, the one-hot special case of per_sample.py's Âᵢᵀ Gᵢ:

  gram        Kᵢⱼ = Σₜₛ [tokᵢₜ = tokⱼₛ] gᵢₜ·gⱼₛ             (route F with ÂᵢÂⱼᵀ = token matches)
  project     (Uᵀv)ᵢ = Σₜ ⟨V[tokᵢₜ], gᵢₜ⟩                  (a gather)
  combine     U s = Σᵢₜ sᵢ e_{tokᵢₜ} gᵢₜᵀ                   (a scatter-add into V × D)
  per_sample  the dense uᵢ, (m, V, D): only for small tables (blocks.base.DIRECT_MAX_DIM)

Positions whose output gradient is zero (masked, or zero padding of the cache) contribute nothing.
"""

from __future__ import annotations

import tensorflow as tf

from tengrad_tf.blocks.per_sample import map_sample_chunks

Tensor = tf.Tensor


def gram(tokens: Tensor, g: Tensor, chunk: int | Tensor | None = None) -> Tensor:
    """tokens (m, P) int, g (m, P, D) → K (m, m). A chunk of rows i holds (rows, m, P, P) pairs."""

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
