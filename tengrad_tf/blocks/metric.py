"""The damping metric of a Kronecker block: λ·D instead of λ·I, with D from the layer's inputs.

TENGraD solves (F + λD)⁻¹ g exactly. With D = I (the paper's damping, `damping_metric="identity"`)
a gradient component outside the span of the batch's per-sample gradients, which on a wide layer
is most of g, is stepped as g/λ: plain gradient descent, blind to the scale and correlation of the
layer's inputs. With `damping_metric="inputs"` a Kronecker-structured block (Dense, convolutions,
EinsumDense: uᵢ = Σₜ âᵢₜ gᵢₜᵀ, one group) is damped with

    D = D_A ⊗ I,   D_A = (Ā + γ·ā·I) / ((1 + γ)·ā),   Ā = (1/n) Σ â âᵀ,   ā = tr(Ā) / D_in,

Ā the second moment of the n input rows â of the curvature update's batch (patches for a
convolution; the bias column of ones included). For a change Δ of the layer's matrix (D_in × D_out)
λ·vec(Δ)ᵀ D vec(Δ) = λ/((1 + γ)ā) · (mean over rows of ‖Δᵀâ‖² + γ·ā·‖Δ‖²): the damping charges a
step for how much it changes the layer's outputs on its inputs, and only γ/(1+γ) of it for the
weights' own norm. D has mean eigenvalue 1, so λ keeps its meaning; γ = 1 bounds D_A's eigenvalues
below by ½, so no direction is stepped more than twice as far as with D = I.

Why: it is what K-FAC's input factor A does, and measured, it is all of K-FAC's lead in steps. On
the `cpu` configuration K-FAC with its output factor G replaced by a multiple of I needed 137.5
steps to 88 % (150 with both factors), and with A replaced instead 262.5 (docs/step.md, "The
damping metric"). Only the damping changes: F is still the exact Fisher of the block.

The solve is the identity-damped one in whitened coordinates. With D = LLᵀ, L = L_A ⊗ I (L_A the
Cholesky factor of D_A): (F + λD)⁻¹ = L⁻ᵀ (L⁻¹FL⁻ᵀ + λI)⁻¹ L⁻¹, and L⁻¹uᵢ = Σₜ (L_A⁻¹âᵢₜ) gᵢₜᵀ
is the per-sample gradient of whitened input rows. So the curvature is computed as always from a
helper whose input rows are whitened (`Whitened`), and each step whitens the gradient and
un-whitens the direction (`whiten`, `unwhiten`): Gram, cache and Woodbury solve are unchanged. The
quadratic model of adaptive damping uses Lᵀv (`metric_coordinates`): sᵀ(F + λD)s =
(1/m)‖(L⁻¹U)ᵀLᵀs‖² + λ‖Lᵀs‖².

Cost: D_in² numbers per block, a D_in³/3 Cholesky per curvature update, and two triangular solves
of D_in² · D_out per step. A Dense layer on flat inputs whose batch has fewer rows than D_in needs
none of it: D_A is then the identity plus a rank-n term, and metric_rows.py solves with D through
the n × n matrix of the rows (the `ROWS` form). Other blocks with D_in above `MAX_INPUT_DIM` keep
D = I.
"""

from __future__ import annotations

import tensorflow as tf

from tengrad_tf import woodbury
from tengrad_tf.blocks import cost, metric_rows, per_sample
from tengrad_tf.blocks.cost import CacheKind
from tengrad_tf.layers import Structure

METRICS = ("auto", "identity", "inputs")  # "auto": resolved by the optimizer
#: γ, the share of the weights' own norm in D_A. 0.1 let the whitening amplify the inputs' weak
#: directions tenfold and trained worse than D = I on 3C1F; 1 and 10 trained alike (docs/step.md).
IDENTITY_SHARE = 1.0
#: Larger inputs take no L_A: it would take D_in² memory and each step 2·D_in²·D_out products (at
#: the paper's width, 3C1F's Dense layer has D_in = 10,369). They take the rows form, or D = I.
MAX_INPUT_DIM = 2048

#: The two ways of computing with D_A (`DampingMetric.form`).
WHITENED = "whitened"  # by L_A, D_A's Cholesky factor (D_in × D_in), in whitened coordinates
ROWS = "rows"  # through the batch's n < D_in rows (metric_rows.py): Dense layers on flat inputs


def choose_form(helper, cache: CacheKind, p: int | None, capacity: int | None, repeats: int
                ) -> tuple[str | None, str | None]:
    """(form, None) for a block that takes D_A, or (None, why it keeps D = I). The rows form needs
    one row per sample, kept as factors (a Dense layer on flat inputs, the empirical or true
    Fisher); it is taken where it is the cheaper one (n < D_in, or n unknown when traced, since
    a step of it costs n² per output rather than D_in²) and wherever D_in is too large for L_A."""
    if helper.structure is not Structure.KRONECKER:
        return None, "its per-sample gradients are not input rows times output rows"
    if helper.groups != 1:
        return None, "it has groups of channels (one D_A per group is not implemented)"
    by_rows = cache is CacheKind.FACTORS and p == 1 and repeats == 1
    if by_rows and (capacity is None or capacity < helper.d_in or helper.d_in > MAX_INPUT_DIM):
        return ROWS, None
    if helper.d_in > MAX_INPUT_DIM:
        return None, (f"D_in = {helper.d_in} > {MAX_INPUT_DIM}, and its rows are not one per "
                      "sample in a factored cache")
    return WHITENED, None


def input_factor(helper, inputs: list[tf.Tensor], memory_budget: int) -> tf.Tensor:
    """L_A, the lower Cholesky factor of D_A, from the layer's calls on `inputs` (helper dtype)."""
    n_in, f64 = helper.d_in, woodbury.SOLVE_DTYPE
    moment, rows = tf.zeros([n_in, n_in], f64), tf.constant(0.0, f64)

    def chunk_moment(x, valid):
        """(Σ ââᵀ, the number of rows) of the samples of x that are `valid` (not padding)."""
        a = tf.cast(helper.input_rows(x), f64)
        a = tf.reshape(a, [tf.shape(x)[0], -1, n_in]) * valid[:, None, None]
        count = tf.reduce_sum(valid) * tf.cast(tf.shape(a)[1], f64)
        a = tf.reshape(a, [-1, n_in])
        return tf.matmul(a, a, transpose_a=True), count

    for x in inputs:
        # Unfolded patches can be large (P·D_in per sample), so Ā is summed over sample chunks
        # (float64: 8 bytes per number of a sample's rows); rows that are the input (Dense) are not.
        p = helper.positions(x.shape)
        rows_elements = helper.per_sample_elements(x.shape) if p is None else p * n_in
        chunk = cost.chunk(memory_budget, rows_elements, cost.elements_per_sample(x.shape), 8)
        part, count = per_sample.sum_sample_chunks(chunk_moment, [x], chunk, (f64, f64))
        moment, rows = moment + part, rows + count
    moment /= tf.maximum(rows, 1.0)
    mean = tf.linalg.trace(moment) / n_in
    d_a = (moment + IDENTITY_SHARE * mean * tf.eye(n_in, dtype=woodbury.SOLVE_DTYPE)) / (
        (1.0 + IDENTITY_SHARE) * mean)
    # A layer whose inputs were all zero has mean 0: D_A is then I (not NaN).
    d_a = tf.where(mean > 0, d_a, tf.eye(n_in, dtype=woodbury.SOLVE_DTYPE))
    return tf.cast(tf.linalg.cholesky(d_a), helper.dtype)


def whiten(curvature: dict, v: tf.Tensor) -> tf.Tensor:
    """L⁻¹v for v as the block's matrix (D_in × D_out); v itself under D = I."""
    if "metric" not in curvature:
        return v
    return tf.linalg.triangular_solve(curvature["metric"], v, lower=True)


def unwhiten(curvature: dict, v: tf.Tensor) -> tf.Tensor:
    """L⁻ᵀv: the direction back from whitened coordinates; v itself under D = I."""
    if "metric" not in curvature:
        return v
    return tf.linalg.triangular_solve(curvature["metric"], v, lower=True, adjoint=True)


def metric_coordinates(curvature: dict, v: tf.Tensor) -> tf.Tensor:
    """Lᵀv, so that ⟨Lᵀv, Lᵀw⟩ = vᵀDw, and (L⁻¹U)ᵀLᵀv = Uᵀv; v itself under D = I."""
    if "metric" not in curvature:
        return v
    return tf.matmul(curvature["metric"], v, transpose_a=True)


class DampingMetric:
    """One block's damping metric: D_A ⊗ I where `name` is "inputs" and its layer allows it, by
    the `form` chosen when the block's cache is laid out (`choose`), or λI (form None)."""

    def __init__(self, name: str):
        self.name, self.form = name, None

    def choose(self, helper, cache: CacheKind, p, capacity, repeats) -> None:
        if self.name == "inputs":
            self.form, _ = choose_form(helper, cache, p, capacity, repeats)

    def describe(self, helper, cache: CacheKind, p, capacity, repeats) -> str:
        """The summary's suffix: which metric the block takes, and why I where "inputs" was asked."""
        if self.name != "inputs":
            return ""
        form, reason = choose_form(helper, cache, p, capacity, repeats)
        if form is None:
            return f"; damping metric I: {reason}"
        return "; damping metric D_A ⊗ I" + (", through the batch's rows" if form == ROWS else "")

    def helper_for_curvature(self, helper, inputs, memory_budget) -> tuple[object, dict]:
        """(the helper to build this update's curvature from, {"metric": L_A} or {})."""
        if self.form != WHITENED:
            return helper, {}
        with tf.name_scope("tengrad_metric"):
            factor = input_factor(helper, inputs, memory_budget)
        return Whitened(helper, factor), {"metric": factor}


def coordinates_of(curvature: dict, helper):
    """v ↦ tensors whose inner products are vᵀDw, for a block damped with a metric; None (D = I)."""
    if "metric" in curvature:
        return lambda vectors: [metric_coordinates(curvature, helper.to_matrix(vectors))]
    if "metric_scale" in curvature:
        return lambda vectors: metric_rows.coordinates(curvature, helper.to_matrix(vectors))
    return None


class Whitened:
    """A layer helper whose input rows are L_A⁻¹â: the per-sample gradients L⁻¹uᵢ of the whitened
    coordinates, for everything that builds a Gram or a cache from a helper (gram.py)."""

    def __init__(self, helper, factor: tf.Tensor):
        self._helper, self._factor = helper, factor

    def __getattr__(self, name):
        return getattr(self._helper, name)

    def input_rows(self, recorded: tf.Tensor) -> tf.Tensor:
        rows = self._helper.input_rows(recorded)
        # (…, D_in) rows times L_A⁻ᵀ: each row â becomes L_A⁻¹â.
        flat = tf.reshape(rows, [-1, self._helper.d_in])
        white = tf.transpose(tf.linalg.triangular_solve(self._factor, tf.transpose(flat),
                                                        lower=True))
        return tf.reshape(white, tf.shape(rows))

    def per_sample_gradients(self, recorded: tf.Tensor, output_grad: tf.Tensor) -> tf.Tensor:
        j = self._helper.per_sample_gradients(recorded, output_grad)  # (m, D_in, D_out)
        return tf.linalg.triangular_solve(self._factor[None], j, lower=True)
