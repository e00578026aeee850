"""Per-sample gradient algebra for layers whose per-sample gradient is uᵢ = Âᵢᵀ Gᵢ.

Dense and EinsumDense (P = 1, or P = the positions of a rank > 2 input) and convolutions (P = output
positions) share one structure: sample i has patch rows Âᵢ (P × D_in, bias column folded in) and
output gradients Gᵢ (P × D_out), and its gradient is the D_in × D_out matrix Jᵢ = Âᵢᵀ Gᵢ.
Everything a Fisher block needs is written here once, as pure functions on batched tensors
(leading axis = samples):

  gram_factored   K = UᵀU without forming any Jᵢ (route F):  Kᵢⱼ = Σₜₛ (ÂᵢÂⱼᵀ)ₜₛ (GᵢGⱼᵀ)ₜₛ
  per_sample      J, the explicit per-sample gradients (route E), then gram_explicit K = J Jᵀ
  project         Uᵀv: (Uᵀv)ᵢ = ⟨Jᵢ, V⟩, from factors or from J
  combine         U s = Σᵢ sᵢ Jᵢ, from factors or from J

Grouped and depthwise convolutions have one such Jᵢ per group of channels; `per_sample` forms them
(route E), and the Gram is then J Jᵀ over all groups. Lookup tables (one-hot Â) are in tokens.py.

Memory: route F's pairwise products are m·m·P·P and the patches of a convolution are m·P·D_in, so the
functions take a `chunk` of samples and never hold more than `chunk` samples' worth of the big
intermediate at once. They do not decide which route or chunk to use: the blocks do (cost model).
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

Tensor = tf.Tensor


def map_sample_chunks(
    fn: Callable[..., Tensor], tensors: list[Tensor], chunk: int | Tensor | None,
    dtype: tf.DType | None = None,
) -> Tensor:
    """fn over consecutive chunks of `chunk` samples of `tensors`, results concatenated on axis 0.

    `chunk=None` (or a static chunk not smaller than the static batch) runs fn once on everything.
    The batch (and the chunk) may be dynamic, so the inputs are padded to a multiple of `chunk` and
    the padding is cut off again. `dtype`: of fn's result (default: that of `tensors[0]`).
    """
    if _in_one_chunk(tensors, chunk):
        return fn(*tensors)
    m = tf.shape(tensors[0])[0]
    padded, n_chunks, chunk = _padded_chunks(tensors, chunk)
    out = tf.map_fn(lambda args: fn(*args), tuple(padded),
                    fn_output_signature=dtype or tensors[0].dtype)
    out = tf.reshape(out, tf.concat([[n_chunks * chunk], tf.shape(out)[2:]], 0))
    return out[:m]


def sum_sample_chunks(fn: Callable[..., tuple], tensors: list[Tensor], chunk: int | None,
                      dtypes: tuple) -> tuple:
    """Σ over consecutive chunks of `chunk` samples of fn(*chunk's tensors, valid), `valid` (the
    chunk's samples,) 1 for a sample and 0 for padding, which fn must weight by it; fn returns a
    tuple of tensors of `dtypes`. Chunked as `map_sample_chunks` is, for reductions."""
    if _in_one_chunk(tensors, chunk):
        return fn(*tensors, tf.ones([tf.shape(tensors[0])[0]], dtypes[0]))
    m = tf.shape(tensors[0])[0]
    padded, n_chunks, chunk = _padded_chunks(tensors, chunk)
    valid = tf.reshape(tf.cast(tf.range(n_chunks * chunk) < m, dtypes[0]), [n_chunks, chunk])
    parts = tf.map_fn(lambda args: fn(*args), tuple(padded) + (valid,),
                      fn_output_signature=tuple(dtypes))
    return tuple(tf.reduce_sum(part, axis=0) for part in parts)


def _in_one_chunk(tensors: list[Tensor], chunk: int | Tensor | None) -> bool:
    static_m = tensors[0].shape[0]
    return chunk is None or (isinstance(chunk, int) and static_m is not None and chunk >= static_m)


def _padded_chunks(tensors: list[Tensor], chunk: int | Tensor
                   ) -> tuple[list[Tensor], Tensor, Tensor]:
    """The tensors zero-padded to whole chunks and shaped (chunks, chunk, ...): fixed-size chunks,
    whose size TensorFlow infers where the batch is static (a dynamic slice would not be)."""
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
    return padded, n_chunks, chunk


def gram_factored(a: Tensor, g: Tensor, chunk: int | None = None,
                  rows_of: tuple[Tensor, Tensor] | None = None, repeats: int = 1) -> Tensor:
    """Route F. a: (m, P, D_in), g: (m, P, D_out) → K (m, m), never forming a per-sample gradient.

    rows_of: the factors (a', g') of m' other samples → only their rows, (m', m): u'ᵢ·uⱼ. A Gram
    that grows by a batch at a time needs only the new rows (gram.gram_of_window).
    repeats: R when each input row comes R times in a row (fisher="exact"): a Dense layer then
    multiplies its distinct rows only (`_distinct`).
    """
    a, g = _dense_rows(a), _dense_rows(g)
    a_rows, g_rows = (a, g) if rows_of is None else map(_dense_rows, rows_of)
    if a.shape.rank == 2:  # Dense: K = (A Aᵀ) ⊙ (G Gᵀ), the m²(D_in + D_out) special case
        aa = tf.matmul(_distinct(a_rows, repeats), _distinct(a, repeats), transpose_b=True)
        if repeats > 1:
            aa = tf.repeat(tf.repeat(aa, repeats, axis=0), repeats, axis=1)
        return aa * tf.matmul(g_rows, g, transpose_b=True)

    def rows(a_chunk, g_chunk):
        aa = tf.einsum("ipa,jqa->ijpq", a_chunk, a)
        gg = tf.einsum("ipb,jqb->ijpq", g_chunk, g)
        return tf.reduce_sum(aa * gg, axis=[2, 3])

    return map_sample_chunks(rows, [a_rows, g_rows], chunk)


def per_sample(
    patches: Callable[[list[Tensor]], Tensor], inputs: list[Tensor], g: Tensor,
    chunk: int | None = None,
) -> Tensor:
    """Route E. Jᵢ = Âᵢᵀ Gᵢ for all i: (m, D_in, D_out), or (m, groups, D_in, D_out) for grouped
    rows Â (m, P, groups, D_in) and G (m, P, groups, D_out). Patches are built chunk by chunk.

    `inputs` are the layer inputs of each call in the step; `patches` turns them into Â.
    """
    equation = "ipa,ipb->iab" if g.shape.rank == 3 else "ipga,ipgb->igab"
    return map_sample_chunks(
        lambda *ts: tf.einsum(equation, patches(list(ts[:-1])), ts[-1]), [*inputs, g], chunk,
        dtype=g.dtype)


def gram_explicit(j: Tensor, rows_of: Tensor | None = None) -> Tensor:
    """K = J Jᵀ with J flattened per sample; rows_of: the J' of other samples → J' Jᵀ (m', m)."""
    flat = tf.reshape(j, [tf.shape(j)[0], -1])
    rows = flat if rows_of is None else tf.reshape(rows_of, [tf.shape(rows_of)[0], -1])
    return tf.matmul(rows, flat, transpose_b=True)


def _dense_rows(x: Tensor) -> Tensor:
    """(m, 1, D) → (m, D): one patch row per sample is a Dense layer's plain matrix."""
    return x[:, 0] if x.shape.rank == 3 and x.shape[1] == 1 else x


def _distinct(a: Tensor, repeats: int) -> Tensor:
    """The distinct rows of `a` when each comes `repeats` times in a row: the exact Fisher's C
    rows of a sample share its input row (fisher.py), so a Dense layer's products with A need
    only every C-th row, C times fewer."""
    return a if repeats == 1 else a[::repeats]


# Uᵀv and U s run on every step, also between curvature updates, where a small model's step costs
# about as much per op as per flop: they take and return s as an (m, 1) column (no reshapes in the
# solve), and Dense factors stored as (m, D) matrices (no slicing).
def project_factored(a: Tensor, g: Tensor, v: Tensor, repeats: int = 1) -> Tensor:
    """(Uᵀv)ᵢ = Σₜ (Âᵢ V)ₜ · Gᵢₜ for V (D_in, D_out) → (m, 1). Cost m·P·D_in·D_out.

    a, g: (m, P, D) factors, or (m, D) for a Dense layer (P = 1); repeats: as in gram_factored."""
    a, g = _dense_rows(a), _dense_rows(g)
    if a.shape.rank == 2:  # plain matmuls: einsum's reshapes cost as much as the work for a Dense
        av = tf.matmul(_distinct(a, repeats), v)
        if repeats > 1:
            av = tf.repeat(av, repeats, axis=0)
        return tf.reduce_sum(av * g, axis=1, keepdims=True)
    av = tf.einsum("ipa,ab->ipb", a, v)
    return tf.reshape(tf.reduce_sum(av * g, axis=[1, 2]), [-1, 1])


def combine_factored(a: Tensor, g: Tensor, s: Tensor, repeats: int = 1) -> Tensor:
    """U s = Σᵢ sᵢ Âᵢᵀ Gᵢ = Âᵀ diag(s) G → (D_in, D_out), for s of shape (m, 1); repeats: as in
    gram_factored (a Dense layer first sums the rows of G that share an input row)."""
    a, g = _dense_rows(a), _dense_rows(g)
    if a.shape.rank == 2:
        if repeats == 1:
            return tf.matmul(a * s, g, transpose_a=True)
        shared = tf.reduce_sum(tf.reshape(s * g, [-1, repeats, g.shape[-1]]), axis=1)
        return tf.matmul(_distinct(a, repeats), shared, transpose_a=True)
    return tf.einsum("ipa,ipb->ab", a * s[:, :, None], g)


def project_explicit(j: Tensor, v: Tensor) -> Tensor:
    """Uᵀv from explicit per-sample gradients j (m, D_in, D_out) → (m, 1)."""
    flat = tf.reshape(j, [tf.shape(j)[0], -1])
    return tf.matmul(flat, tf.reshape(v, [-1, 1]))


def combine_explicit(j: Tensor, s: Tensor) -> Tensor:
    """U s from explicit per-sample gradients, for s of shape (m, 1) → (D_in, D_out)."""
    flat = tf.reshape(j, [tf.shape(j)[0], -1])
    return tf.reshape(tf.matmul(flat, s, transpose_a=True), tf.shape(j)[1:])
