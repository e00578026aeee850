"""K-FAC's curvature block: the Kronecker-factored approximation A ⊗ G of one layer's Fisher.

The K-FAC optimizer (kfac.py) shares everything but this block with TENGraD. What the layer looks
like (the patch rows Â, the output-gradient rows G, the gradient as one D_in × D_out matrix, bias
last) is asked of the layer's helper (tengrad_tf/layers), as TENGraD's blocks ask it.

Layers covered: those whose per-sample gradient is an input row times an output-gradient row.
Dense, Conv1D/2D/3D and EinsumDense (a Dense over positions) as below; grouped and depthwise
convolutions per group of channels (one (A, G) pair per group, stacked: a depthwise layer has one
per input channel, with its k·k window and the bias as A's rows and its depth_multiplier outputs as
G's); Embedding with A the diagonal of the token frequencies, A = diag(count of each token over
the m·P positions)/(m·P), kept as a vector (V may be 50k). Normalization layers and transposed and
separable convolutions have no standard Kronecker factorization: K-FAC says so for each in its
summary, and they take a first-order step.

Factors (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016). For one step of a layer
with m samples, P patch rows per sample (P = 1 for a Dense layer on (batch, features); output positions
for a convolution; all calls of a shared layer together), patch rows âᵢₜ ∈ R^D_in (bias column of
ones included) and per-sample output gradients gᵢₜ = ∂ℓᵢ/∂zᵢₜ ∈ R^D_out (the core hands them to the
block already per sample, for the empirical and the true Fisher alike):

    A = 1/(m·P) Σᵢ Σₜ âᵢₜ âᵢₜᵀ          (D_in × D_in: the mean over samples and positions)
    G = 1/m     Σᵢ Σₜ gᵢₜ gᵢₜᵀ          (D_out × D_out: the mean over samples of the sum over positions)

For a Dense layer (P = 1), A ⊗ G = [(1/m) ÂᵀÂ] ⊗ [(1/m) Σᵢ gᵢgᵢᵀ] is the K-FAC approximation of the
exact Fisher block F = (1/m) Σᵢ vec(âᵢgᵢᵀ) vec(âᵢgᵢᵀ)ᵀ that TENGraD inverts: the expectation of a
Kronecker product replaced by the Kronecker product of the expectations. For a convolution, A ⊗ G =
(1/P)·[(1/m)ΣΣ âₜâₜᵀ] ⊗ [(1/m)ΣΣ gₜgₜᵀ] is KFC's Ω ⊗ Γ (independent activations and derivatives,
spatial homogeneity, spatially uncorrelated derivatives). The product A ⊗ G is the one of
KFAC-Pytorch (Wang; ComputeCovA / ComputeCovG with batch_averaged=True), which splits the 1/P
differently between the factors (its A is ours / P, its G is ours · P): with the π-corrected
damping below, any split A → cA, G → G/c gives exactly the same step. gpauloski/kfac-pytorch's
helpers (Conv2dModuleHelper.get_a_factor / get_g_factor) divide patch and output-gradient rows by P
before a mean over m·P rows and use output gradients of the batch-mean loss; that scales A ⊗ G by
1/(m²P⁵) (1/m² for Linear), i.e. the same approximation under a different damping scale.

Damping: factored Tikhonov with the π correction (Martens & Grosse 2015, section 6.3):

    π = sqrt( (tr A / D_in) / (tr G / D_out) ),   d = (A + π√λ I)⁻¹ V (G + (√λ/π) I)⁻¹

with V the kernel and bias gradient as one (D_in, D_out) matrix, so that (A + π√λ I) ⊗ (G + √λ/π I)
= A ⊗ G + λ I + (cross terms). π = 1 when either trace is zero (e.g. a layer whose output gradients
all vanish).

Schedule and state: the running averages are updated on steps where step % cov_update_freq == 0,
factor ← stat_decay·factor + (1 − stat_decay)·new, where the first update of a block takes the new
value directly (no identity prior, no zero-initialization bias). The damped inverses are recomputed
from the current averages on steps where step % inv_update_freq == 0. A block's first step (step 0,
or the first step it takes part in without saved state) always does both. Saving the optimizer
(.keras, save_weights, tf.train.Checkpoint) saves the averages, the inverses and the update count,
so a resumed run continues the schedule exactly (resume.py). The
inverses come from an eigendecomposition (inverse_method="eigh", the paper's and kfac-pytorch's
default: eigenvalues clipped at 0 before adding the damping, a positive-definite, finite result for
any finite factor) or from a Cholesky factorization of F + δI ("cholesky": about a tenth of the
flops; F + δI must be positive definite in floating point, which holds while δ is well above the
factor's rounding, ~ε‖F‖; otherwise the factor is not finite and the step is skipped, counted),
in float64 for float64 layers and float32 otherwise. Steps whose factors are not finite are
skipped by the core and leave the block untouched.

Under tf.distribute the core hands every replica the layer inputs and output gradients of the whole
global batch (all-gathered, see distribute.py), so the factors are the global batch's statistics,
identical on every replica; tested against a single device in tests/test_distribute.py.

Cost per block: O((m·P)(D_in² + D_out²)) per factor update, O(D_in³ + D_out³) per inverse update,
O(D_in·D_out·(D_in + D_out)) per step for the preconditioning.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tengrad_tf import distribute, eager_state, layers
from tengrad_tf.blocks import schedule
from tengrad_tf.blocks.protocol import CurvatureBlock
from tengrad_tf.layers import Structure
from tengrad_tf.record import BindingError


class KroneckerBlock(CurvatureBlock):
    """K-FAC curvature block of one layer (kernel and bias together).

    Implements the block protocol (protocol.py). The layer knowledge (patch rows, output rows,
    gradient layout) is the layer's helper (`tengrad_tf.layers`), as for TENGraD's blocks.
    """

    @staticmethod
    def unsupported_reason(helper) -> str | None:
        """Why K-FAC has no block for a layer TENGraD covers (None if it has one)."""
        if helper.structure is Structure.EXPLICIT:
            return ("K-FAC has no standard Kronecker factorization for this kind of layer (its "
                    "per-sample gradient is not an input row times an output-gradient row); "
                    "TENGraD has an exact block for it")
        return None

    def __init__(self, layer: keras.layers.Layer, damping: float = 0.1, stat_decay: float = 0.95,
                 cov_update_freq: int = 20, inv_update_freq: int = 100,
                 inverse_method: str = "eigh"):
        helper = layers.helper_for(layer)
        reason = "no layer helper" if helper is None else self.unsupported_reason(helper)
        if reason:
            raise BindingError(f"K-FAC has no block for layer '{layer.name}' "
                               f"({type(layer).__name__}): {reason}.")
        self.helper = helper
        self.layer = layer
        # Lookup tables: A is diagonal (the token frequencies), kept as a vector.
        self.diagonal = helper.structure is Structure.TOKENS
        self.groups = 1 if self.diagonal else helper.groups
        self.damping = float(damping)
        self.stat_decay = float(stat_decay)
        self.cov_update_freq = int(cov_update_freq)
        self.inv_update_freq = int(inv_update_freq)
        self.inverse_method = inverse_method
        self.variables = helper.variables
        self._state: dict[str, tf.Variable] | None = None
        self._updates: tf.Variable | None = None
        self._schedule_memo: dict = {}
        self.diagnostics = False  # K-FAC keeps no extra per-step numbers

    # ---- layer facts, from the layer helper -----------------------------------------------------
    @property
    def dtype(self) -> tf.DType:
        return self.helper.dtype

    @property
    def d_in(self) -> int:
        return self.helper.vocabulary if self.diagonal else self.helper.d_in

    @property
    def d_out(self) -> int:
        return self.helper.d_out

    def _factor_shape(self, n: int) -> list[int]:
        return [n, n] if self.groups == 1 else [self.groups, n, n]

    def describe(self, inputs_shape) -> str:
        h = self.helper
        p = h.positions(inputs_shape)  # None: a Dense layer on sequences of dynamic length
        a = f"diagonal {self.d_in}" if self.diagonal else f"{self.d_in}×{self.d_in}"
        groups = f" per group ({self.groups})" if self.groups > 1 else ""
        return (
            f"K-FAC {h.kind} block of layer '{self.layer.name}' ({h.describe_parameters()}; "
            f"A: {a}, G: {self.d_out}×{self.d_out}{groups}, P={'dynamic' if p is None else p}; factors "
            f"every {self.cov_update_freq} steps, inverses ({self.inverse_method}) every "
            f"{self.inv_update_freq})"
        )

    # ---- state -------------------------------------------------------------------------------
    def prepare(self, inputs) -> bool:
        """Create the factors, their inverses and the update count, once (their shapes do not
        depend on the batch). True if this call created them."""
        if self._state is not None:
            return False

        def var(name, shape):
            return tf.Variable(tf.zeros(shape, self.dtype), trainable=False,
                               name=f"{self.layer.name}_kfac_{name}")

        a_shape = [self.d_in] if self.diagonal else self._factor_shape(self.d_in)
        g_shape = self._factor_shape(self.d_out)
        with eager_state.outside_the_step():
            self._state = {"A": var("A", a_shape), "G": var("G", g_shape),
                           "A_inv": var("A_inv", a_shape), "G_inv": var("G_inv", g_shape)}
            # Committed factor updates so far (0: the factors and inverses hold nothing yet).
            self._updates = tf.Variable(tf.constant(0, tf.int64), trainable=False,
                                        name=f"{self.layer.name}_kfac_updates")
        return True

    @property
    def state_variables(self) -> dict[str, tf.Variable]:
        """{"A", "G", "A_inv", "G_inv", "updates"}: empty before the block's first step."""
        if self._state is None:
            return {}
        return {**self._state, "updates": self._updates}

    def reset_state(self) -> None:
        """Forget the factors: the next step starts the averages afresh, as the first step does."""
        distribute.assign_on_every_replica(self._updates, 0)

    def load_state(self, arrays: dict) -> None:
        """Set the running factors, their inverses and the update count from saved arrays."""
        variables = self.state_variables
        mismatch = (f"layer '{self.layer.name}': the saved K-FAC state does not fit this block "
                    "(the saved optimizer belongs to another model, or the model's layers or "
                    "dtype changed); ")
        if set(arrays) != set(variables):
            raise ValueError(mismatch + f"saved fields {sorted(arrays)}, expected "
                             f"{sorted(variables)}.")
        values = {k: tf.convert_to_tensor(a) for k, a in arrays.items()}
        for k, v in variables.items():
            if values[k].dtype != v.dtype or values[k].shape != v.shape:
                raise ValueError(mismatch + f"'{k}' was saved as {values[k].dtype.name} "
                                 f"{values[k].shape}, the block holds {v.dtype.name} {v.shape}.")
        for k, v in variables.items():
            distribute.assign_on_every_replica(v, values[k])

    def _schedule(self, step) -> tuple[tf.Tensor, tf.Tensor]:
        """(update the factors?, update the inverses?) at `step`, built once per traced step."""
        def update(step):
            first = tf.equal(self._updates, 0)
            step = tf.cast(step, tf.int64)
            cov = tf.logical_or(first, schedule.every(step, self.cov_update_freq))
            inv = tf.logical_or(first, schedule.every(step, self.inv_update_freq))
            return cov, inv

        return schedule.once_per_step(self._schedule_memo, step, update)

    def needs_output_grads(self, step) -> tf.Tensor:
        """Whether this step updates the factors (the only use of output gradients)."""
        return self._schedule(step)[0]

    # ---- curvature ---------------------------------------------------------------------------
    def factors(self, inputs: list[tf.Tensor], output_grads: list[tf.Tensor]
                ) -> tuple[tf.Tensor, tf.Tensor]:
        """This step's (A, G), see the module docstring; one entry per call of the layer."""
        h = self.helper
        g = tf.concat([h.output_rows(dz) for dz in output_grads], axis=1)  # (m, P, [groups,] D_out)
        m = tf.cast(tf.shape(g)[0], self.dtype)
        p = tf.cast(tf.shape(g)[1], self.dtype)
        g = tf.reshape(g, [-1, *g.shape[2:]])
        if self.diagonal:  # one-hot rows: A is the frequency of each token among the positions
            ids = tf.reshape(tf.concat([h.tokens(x) for x in inputs], axis=1), [-1])
            big_a = tf.math.unsorted_segment_sum(tf.ones_like(ids, self.dtype), ids,
                                                 self.d_in) / (m * p)
        else:
            a = tf.concat([h.input_rows(x) for x in inputs], axis=1)  # (m, P, [groups,] D_in)
            a = tf.reshape(a, [-1, *a.shape[2:]])
            big_a = tf.einsum(self._outer, a, a) / (m * p)
        big_g = tf.einsum(self._outer, g, g) / m
        return big_a, big_g

    @property
    def _outer(self) -> str:
        """Σ over rows of the outer product of each row with itself, per group."""
        return "ni,nj->ij" if self.groups == 1 else "ngi,ngj->gij"

    def damped_inverses(self, a: tf.Tensor, g: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """((A + π√λ I)⁻¹, (G + √λ/π I)⁻¹), NaN if a factor is not finite (the step is then skipped).

        Per group for grouped layers; a diagonal A is inverted elementwise."""
        dtype = self.dtype
        tr_a = (tf.reduce_sum(a, -1) if self.diagonal else tf.linalg.trace(a)) / self.d_in
        tr_g = tf.linalg.trace(g) / self.d_out
        ok = tf.logical_and(tr_a > 0, tr_g > 0)
        one = tf.ones_like(tr_a)
        pi = tf.where(ok, tf.sqrt(tf.where(ok, tr_a, one) / tf.where(ok, tr_g, one)), one)
        root = tf.constant(self.damping ** 0.5, dtype)

        def inverse(f, damping):
            # eigh and cholesky read the lower triangle only: a factor that rounding left slightly
            # asymmetric is taken as the symmetric matrix of its lower triangle. (Symmetrizing a
            # batch of factors as (F + Fᵀ)/2 instead made grappler's arithmetic optimizer miswire
            # the step's graph under TF 2.21, for depthwise layers in a fit on a tf.data iterator.)
            if self.inverse_method == "cholesky":
                eye = tf.eye(tf.shape(f)[-1], batch_shape=tf.shape(f)[:-2], dtype=dtype)
                factor = tf.linalg.cholesky(f + damping[..., None, None] * eye)
                return tf.linalg.cholesky_solve(factor, eye)
            e, q = tf.linalg.eigh(f)
            e = tf.maximum(e, 0) + damping[..., None]
            return tf.matmul(q / e[..., None, :], q, transpose_b=True)

        def inverses():
            a_inv = 1.0 / (a + pi * root) if self.diagonal else inverse(a, pi * root)
            return a_inv, inverse(g, root / pi)

        finite = tf.logical_and(tf.reduce_all(tf.math.is_finite(a)),
                                tf.reduce_all(tf.math.is_finite(g)))
        # The eigensolver raises on NaN input; a non-finite factor makes the whole step a skip.
        return tf.cond(
            finite, inverses,
            lambda: (tf.fill(tf.shape(a), tf.constant(float("nan"), dtype)),
                     tf.fill(tf.shape(g), tf.constant(float("nan"), dtype))),
        )

    def curvature(self, step, inputs, output_grads):
        """Averaged factors and their damped inverses for this step, fresh or cached by the schedule.

        Assigns nothing: `commit` keeps the result if the step is taken.
        """
        cached = {k: v.read_value() for k, v in self._state.items()}
        update_cov, update_inv = self._schedule(step)
        first = tf.equal(self._updates, 0)

        def averaged():
            new_a, new_g = self.factors(inputs, output_grads)
            decay = tf.where(first, tf.zeros([], self.dtype),
                             tf.constant(self.stat_decay, self.dtype))
            return (decay * cached["A"] + (1 - decay) * new_a,
                    decay * cached["G"] + (1 - decay) * new_g)

        a, g = tf.cond(update_cov, averaged, lambda: (cached["A"], cached["G"]))
        a_inv, g_inv = tf.cond(update_inv, lambda: self.damped_inverses(a, g),
                               lambda: (cached["A_inv"], cached["G_inv"]))
        return {"A": a, "G": g, "A_inv": a_inv, "G_inv": g_inv}, tf.constant(0, tf.int32)

    def commit(self, step, state: dict[str, tf.Tensor]) -> None:
        """Keep this step's averages and inverses (called only when the whole step is finite)."""
        update_cov, update_inv = self._schedule(step)

        def store(names, count):
            def fn():
                for k in names:
                    self._state[k].assign(state[k])
                if count:
                    self._updates.assign_add(1)
                return tf.constant(True)
            return fn

        tf.cond(update_inv, store(("A_inv", "G_inv"), False), lambda: tf.constant(False))
        tf.cond(update_cov, store(("A", "G"), True), lambda: tf.constant(False))

    def preconditioner(self, step, state: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """This step's own averages: they already average over many batches."""
        return state

    def precondition(self, grads: list[tf.Tensor], state: dict[str, tf.Tensor]) -> list[tf.Tensor]:
        """(A + π√λ I)⁻¹ V (G + √λ/π I)⁻¹ for this block's kernel and bias gradients (per group)."""
        v = self.helper.to_matrix(grads)
        if self.diagonal:
            left = state["A_inv"][:, None] * v
        else:
            left = tf.matmul(state["A_inv"], v)
        return self.helper.from_matrix(tf.matmul(left, state["G_inv"]))
