"""Per-sample gradient algebra for layers whose per-sample gradient is uᵢ = Âᵢᵀ Gᵢ.

Dense (P = 1, or P = the extra axes of a rank > 2 input) and convolutions (P = output positions) share
one structure: sample i has patch rows Âᵢ (P × D_in, bias column folded in) and output gradients
Gᵢ (P × D_out), and its gradient is the D_in × D_out matrix Jᵢ = Âᵢᵀ Gᵢ. Everything a Fisher block
needs is written here once, as pure functions on batched tensors (leading axis = samples):

  gram_factored   K = UᵀU without forming any Jᵢ (route F):  Kᵢⱼ = Σₜₛ (ÂᵢÂⱼᵀ)ₜₛ (GᵢGⱼᵀ)ₜₛ
  per_sample      J, the explicit per-sample gradients (route E), then gram_explicit K = J Jᵀ
  project         Uᵀv: (Uᵀv)ᵢ = ⟨Jᵢ, V⟩, from factors or from J
  combine         U s = Σᵢ sᵢ Jᵢ, from factors or from J

Memory: route F's pairwise products are m·m·P·P and the patches of a convolution are m·P·D_in, so the
functions take a `chunk` of samples and never hold more than `chunk` samples' worth of the big
intermediate at once. They do not decide which route or chunk to use: the blocks do (cost model).
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

Tensor = tf.Tensor


def map_sample_chunks(
    fn: Callable[..., Tensor], tensors: list[Tensor], chunk: int | Tensor | None
) -> Tensor:
    """fn over consecutive chunks of `chunk` samples of `tensors`, results concatenated on axis 0.

    `chunk=None` (or a static chunk not smaller than the static batch) runs fn once on everything.
    The batch (and the chunk) may be dynamic, so the inputs are padded to a multiple of `chunk` and
    the padding is cut off again.
    """
    static_m = tensors[0].shape[0]
    if chunk is None or (isinstance(chunk, int) and static_m is not None and chunk >= static_m):
        return fn(*tensors)
    m = tf.shape(tensors[0])[0]
    # Balance the chunks so that padding stays below n_chunks samples (a batch of 128 with a chunk
    # of 290 must not be padded to 290: that would double the work and the memory).
    n_chunks = (m + chunk - 1) // chunk
    chunk = (m + n_chunks - 1) // n_chunks
    padded = []
    for t in tensors:
        pad = [[0, n_chunks * chunk - m]] + [[0, 0]] * (t.shape.rank - 1)
        t = tf.pad(t, pad)
        padded.append(tf.reshape(t, tf.concat([[n_chunks, chunk], tf.shape(t)[1:]], 0)))
    out = tf.map_fn(lambda args: fn(*args), tuple(padded), fn_output_signature=tensors[0].dtype)
    out = tf.reshape(out, tf.concat([[n_chunks * chunk], tf.shape(out)[2:]], 0))
    return out[:m]


def gram_factored(a: Tensor, g: Tensor, chunk: int | None = None) -> Tensor:
    """Route F. a: (m, P, D_in), g: (m, P, D_out) → K (m, m), never forming a per-sample gradient."""
    if a.shape[1] == 1:  # Dense: K = (A Aᵀ) ⊙ (G Gᵀ), the m²(D_in + D_out) special case
        a2, g2 = a[:, 0, :], g[:, 0, :]
        return tf.matmul(a2, a2, transpose_b=True) * tf.matmul(g2, g2, transpose_b=True)

    def rows(a_rows, g_rows):
        aa = tf.einsum("ipa,jqa->ijpq", a_rows, a)
        gg = tf.einsum("ipb,jqb->ijpq", g_rows, g)
        return tf.reduce_sum(aa * gg, axis=[2, 3])

    return map_sample_chunks(rows, [a, g], chunk)


def per_sample(
    patches: Callable[[list[Tensor]], Tensor], inputs: list[Tensor], g: Tensor,
    chunk: int | None = None,
) -> Tensor:
    """Route E. Jᵢ = Âᵢᵀ Gᵢ for all i: (m, D_in, D_out). Patches are built chunk by chunk.

    `inputs` are the layer inputs of each call in the step; `patches` turns them into Â.
    """
    return map_sample_chunks(
        lambda *ts: tf.einsum("ipa,ipb->iab", patches(list(ts[:-1])), ts[-1]), [*inputs, g], chunk
    )


def gram_explicit(j: Tensor) -> Tensor:
    """K = J Jᵀ with J flattened per sample."""
    flat = tf.reshape(j, [tf.shape(j)[0], -1])
    return tf.matmul(flat, flat, transpose_b=True)


def project_factored(a: Tensor, g: Tensor, v: Tensor) -> Tensor:
    """(Uᵀv)ᵢ = Σₜ (Âᵢ V)ₜ · Gᵢₜ for V (D_in, D_out) → (m,). Cost m·P·D_in·D_out."""
    if a.shape[1] == 1:  # plain matmuls: einsum's reshapes cost as much as the work for a Dense
        return tf.reduce_sum(tf.matmul(a[:, 0], v) * g[:, 0], axis=1)
    av = tf.einsum("ipa,ab->ipb", a, v)
    return tf.reduce_sum(av * g, axis=[1, 2])


def combine_factored(a: Tensor, g: Tensor, s: Tensor) -> Tensor:
    """U s = Σᵢ sᵢ Âᵢᵀ Gᵢ = Âᵀ diag(s) G → (D_in, D_out)."""
    if a.shape[1] == 1:
        return tf.matmul(a[:, 0] * s[:, None], g[:, 0], transpose_a=True)
    return tf.einsum("ipa,ipb->ab", a * s[:, None, None], g)


def project_explicit(j: Tensor, v: Tensor) -> Tensor:
    flat = tf.reshape(j, [tf.shape(j)[0], -1])
    return tf.linalg.matvec(flat, tf.reshape(v, [-1]))


def combine_explicit(j: Tensor, s: Tensor) -> Tensor:
    flat = tf.reshape(j, [tf.shape(j)[0], -1])
    return tf.reshape(tf.linalg.matvec(flat, s, transpose_a=True), tf.shape(j)[1:])
