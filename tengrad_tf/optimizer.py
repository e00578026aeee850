"""TENGraD, the Keras optimizer: its hyperparameters and its blocks.

The step rule, binding and state shared with the K-FAC baseline are in preconditioned.py (and the
modules it names); the exact Fisher blocks are in blocks/. Every `curvature_update_freq` steps each
block recomputes its Gram and Cholesky factor from the step's captured factors; in between it
preconditions new gradients with the cached ones.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tengrad_tf.blocks import FisherBlock, metric
from tengrad_tf.blocks.network import NetworkSolve
from tengrad_tf.preconditioned import PreconditionedOptimizer
from tengrad_tf.record import BindingError
from tengrad_tf.validation import check, is_int, is_number

# fisher_blocks: one Fisher block per layer (block-diagonal), or all layers' in one (network.py).
FISHER_BLOCKS = ("layer", "network")

__all__ = ["BindingError", "TENGraD"]


@keras.saving.register_keras_serializable(package="tengrad_tf")
class TENGraD(PreconditionedOptimizer):
    """Time-efficient natural gradient descent with exact Fisher-block inverses.

    Each layer with an exact block (Dense, EinsumDense, Embedding, convolutions of every kind,
    Layer/Group/BatchNormalization; README, "Layers") forms one block (kernel and bias together; γ
    and β together), whose damped Fisher F + λI, with F = (1/m) Σᵢ uᵢuᵢᵀ over the m per-sample
    gradients of the batch, is inverted exactly through the Woodbury identity with an m × m Gram
    matrix. Recurrent layers and layers of other kinds take first-order steps (`summary()` says
    which and why). Layer inputs and output gradients are
    captured from the forward and backward passes that training already runs.

    Usage: `model.compile(optimizer=TENGraD(), loss=..., ...)` then `model.fit(...)`; nothing else.
    Custom loops: compute the loss and call `apply_gradients` in the same `tf.function` as the
    forward pass (see docs/usage.md, "Custom training loops").

    Args:
        learning_rate: float, `keras.optimizers.schedules.LearningRateSchedule`, or callable.
        damping: λ > 0, the Tikhonov damping of each Fisher block, for a Fisher of
            `damping_batch_size` samples.
        damping_batch_size: int or None. A Fisher block of m samples is damped with
            λ·√(damping_batch_size / m) (woodbury.batch_damping): more at small batches, whose
            Fisher and gradient are noisier, less at large ones. None: λ at every batch size.
        damping_metric: "auto" (the default) is "inputs" where it applies (fisher_blocks="layer"
            and curvature_batches=1) and "identity" otherwise. "identity" damps every block with
            λI, as the paper does. "inputs" damps
            a Dense or convolution block with λ·D_A ⊗ I, D_A its inputs' normalized second moment
            (blocks/metric.py): the damping then charges a step for the change of the layer's
            outputs, not of its weights, as K-FAC's input factor does (docs/step.md, "The damping
            metric"). F stays the exact Fisher. A Dense layer with more inputs than its batch has
            rows solves through the rows (blocks/metric_rows.py: no D_in × D_in matrix, and a
            step costs about what λI's does). Other blocks, and other layers with more than 2,048
            inputs, keep λI (`summary()` says which).
        momentum: μ in [0, 1), heavy-ball momentum on the natural-gradient direction.
        weight_decay: decoupled weight decay (θ ← θ − lr·wd·θ), or None.
        fisher: "true" samples labels from the model's predictive distribution (an extra backward
            pass through the activations, run only on curvature-update steps); "exact" takes the
            expectation over every class instead of one sampled label ((sparse) categorical
            cross-entropy: C backward passes and C·m Gram rows per update; fewer steps, a dearer
            curvature: docs/step.md, "The exact Fisher"); "empirical" uses the training labels
            (free).
        curvature_update_freq: recompute factors, Gram and Cholesky every this many steps, and
            precondition with the cached ones in between.
        curvature_batches: k ≥ 1. Each block's Fisher is the exact one of the samples of the last
            k curvature updates together (a k·m Gram; the cache holds k batches). k = 4 and 10
            needed fewer steps than k = 1 on 3C1F (docs/step.md, "Several batches"); 1 stays the
            default until it is measured more widely.
        lagged_curvature: on a curvature update, precondition the step with the curvature of the
            previous update (still cached) and keep the new one for the steps after, so that no
            batch's gradient is preconditioned by its own Fisher, which damps it most where it
            points (docs/step.md, "Lagged curvature"). The first step, with nothing cached, takes
            its own. False: every update step takes its own batch's Fisher, as in the paper.
        kl_clip: κ > 0 for KL clipping of the step, or None to disable.
        memory_budget: bytes one chunk of the convolution Gram routes may use; with
            fisher="exact", also the most a block's float64 Gram of C·m rows may take.
        max_damping_retries: how often an indefinite Gram is refactorized with 10× more damping.
        max_consecutive_skips: raise after this many non-finite steps in a row.
        jit_solve: compile the m × m part of each block (Gram symmetrization, Cholesky with its
            damping retries, triangular solves) with XLA inside a step that is not compiled as a
            whole. "auto": True when TensorFlow sees a GPU, False on CPUs (where XLA's small
            Cholesky and triangular solves measured slower; docs/resuming.md, "XLA"). Decided when the step
            is first traced.
        max_batch_size: the largest batch the optimizer will see (the global batch under
            tf.distribute), or None. When set, the curvature cache has this fixed size and smaller
            batches are zero-padded (exact). Needed for `model.compile(jit_compile=True)` with
            `fit`, which traces its step with an unknown batch size while XLA needs fixed shapes.
        seed: seed of the label sampling of the true Fisher, which is stateless in (seed, step)
            so that a resumed run draws the same labels; None draws one, saved with the optimizer.
        clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum, ema_overwrite_frequency,
        loss_scale_factor, name: as in every Keras optimizer. Clipping applies to the
            natural-gradient direction. `gradient_accumulation_steps` is rejected: the curvature
            is that of one batch.

    Defaults (lr 0.003, λ 0.1, freq 100, κ 1e-2) come from benchmarks/defaults.py: equal training
    time on Fashion-MNIST against Keras's SGD() and Adam() defaults (docs/defaults.md); the
    adaptive options and the current four-model study are in docs/step.md.

    Reference: Soori, Can, Fu, Mehri Dehnavi, "TENGraD: Time-Efficient Natural Gradient Descent
    with Exact Fisher-Block Inversion", ICML 2021.
    """

    def __init__(
        self,
        learning_rate=0.003,
        damping=0.1,
        damping_batch_size=128,
        damping_metric="auto",
        momentum=0.9,
        adaptive_damping=True,
        damping_adaptation_interval=5,
        fisher_blocks="layer",
        weight_decay=None,
        fisher="true",
        curvature_update_freq=100,
        curvature_batches=1,
        lagged_curvature=True,
        kl_clip=1e-2,
        first_order="adam",
        first_order_learning_rate=1e-3,
        memory_budget=256 * 2**20,
        max_damping_retries=6,
        max_consecutive_skips=50,
        seed=None,
        jit_solve="auto",
        max_batch_size=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name="TENGraD",
        **kwargs,
    ):
        check("damping", damping, is_number(damping) and damping > 0, "expected a float > 0")
        check("damping_batch_size", damping_batch_size,
              damping_batch_size is None or is_int(damping_batch_size, 1),
              "expected None or an int >= 1")
        check("adaptive_damping", adaptive_damping, isinstance(adaptive_damping, bool),
              "expected True or False")
        check("damping_adaptation_interval", damping_adaptation_interval,
              is_int(damping_adaptation_interval, 1), "expected an int >= 1")
        check("fisher_blocks", fisher_blocks, fisher_blocks in FISHER_BLOCKS,
              f"expected one of {FISHER_BLOCKS}")
        check("curvature_update_freq", curvature_update_freq, is_int(curvature_update_freq, 1),
              "expected an int >= 1")
        check("curvature_batches", curvature_batches, is_int(curvature_batches, 1),
              "expected an int >= 1")
        check("damping_metric", damping_metric, damping_metric in metric.METRICS,
              f"expected one of {metric.METRICS}")
        # The window's older rows and the network's shared solve would mix coordinates whitened
        # by different factors; not implemented.
        check("damping_metric", damping_metric,
              damping_metric != "inputs" or (fisher_blocks == "layer" and curvature_batches == 1),
              "'inputs' needs fisher_blocks='layer' and curvature_batches=1")
        check("lagged_curvature", lagged_curvature, isinstance(lagged_curvature, bool),
              "expected True or False")
        check("memory_budget", memory_budget, is_int(memory_budget, 2**20),
              "expected an int number of bytes >= 1 MiB")
        check("max_damping_retries", max_damping_retries, is_int(max_damping_retries, 0),
              "expected an int >= 0")
        check("jit_solve", jit_solve, jit_solve == "auto" or isinstance(jit_solve, bool),
              'expected "auto", True or False')
        check("max_batch_size", max_batch_size, max_batch_size is None or is_int(max_batch_size, 1),
              "expected None or an int >= 1")
        # The exact Fisher's cache holds R·m rows for R classes, which are known only from the
        # loss once the step is traced, while max_batch_size fixes the cache's size before.
        check("max_batch_size", max_batch_size, max_batch_size is None or fisher != "exact",
              "fisher='exact' sizes its cache from the loss's classes; use None with it")
        super().__init__(
            learning_rate=learning_rate, momentum=momentum, weight_decay=weight_decay,
            fisher=fisher, kl_clip=kl_clip, first_order=first_order,
            first_order_learning_rate=first_order_learning_rate,
            max_consecutive_skips=max_consecutive_skips, seed=seed,
            clipnorm=clipnorm, clipvalue=clipvalue, global_clipnorm=global_clipnorm,
            use_ema=use_ema, ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency, loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps, name=name, **kwargs,
        )
        self.damping = float(damping)
        self.damping_batch_size = damping_batch_size
        self.damping_metric = damping_metric
        self.adaptive_damping = adaptive_damping
        self.damping_adaptation_interval = int(damping_adaptation_interval)
        self.fisher_blocks = fisher_blocks
        self.curvature_update_freq = int(curvature_update_freq)
        self.curvature_batches = int(curvature_batches)
        self.lagged_curvature = lagged_curvature
        self.memory_budget = int(memory_budget)
        self.max_damping_retries = int(max_damping_retries)
        self.jit_solve = jit_solve
        self.max_batch_size = max_batch_size

    def _make_block(self, layer):
        return FisherBlock(
            layer, memory_budget=self.memory_budget,
            damping=self.damping_variable if self.adaptive_damping else self.damping,
            curvature_update_freq=self.curvature_update_freq,
            max_damping_retries=self.max_damping_retries,
            jit_solve=self.resolved_jit_solve(), max_batch_size=self.max_batch_size,
            adaptive_damping=self.adaptive_damping, joint=self.fisher_blocks == "network",
            curvature_batches=self.curvature_batches, lagged_curvature=self.lagged_curvature,
            damping_batch_size=self.damping_batch_size,
            damping_metric=self.resolved_damping_metric())

    def _make_network_solve(self):
        if self.fisher_blocks != "network":
            return None
        return NetworkSolve(self.damping_variable if self.adaptive_damping else self.damping,
                            max_damping_retries=self.max_damping_retries,
                            jit_solve=self.resolved_jit_solve(),
                            adaptive_damping=self.adaptive_damping,
                            damping_batch_size=self.damping_batch_size)

    def resolved_damping_metric(self) -> str:
        """`damping_metric` with "auto" decided: "inputs" where the blocks can take it (one
        block per layer, one batch's Fisher), "identity" under fisher_blocks="network" or
        curvature_batches > 1, whose shared solve or older rows would mix coordinates of
        different metrics. `summary()` says which metric each block takes."""
        if self.damping_metric != "auto":
            return self.damping_metric
        joint_or_window = self.fisher_blocks != "layer" or self.curvature_batches > 1
        return "identity" if joint_or_window else "inputs"

    def resolved_jit_solve(self) -> bool:
        """`jit_solve` with "auto" decided: True iff TensorFlow sees a GPU. Asked when blocks are
        made (first trace), not at construction, where listing devices would initialize the
        runtime before the user could still configure it (tf.config.set_visible_devices, ...)."""
        if self.jit_solve == "auto":
            return bool(tf.config.list_logical_devices("GPU"))
        return self.jit_solve

    def get_config(self):
        config = super().get_config()
        config.update({
            "damping": self.damping,
            "damping_batch_size": self.damping_batch_size,
            "damping_metric": self.damping_metric,
            "adaptive_damping": self.adaptive_damping,
            "damping_adaptation_interval": self.damping_adaptation_interval,
            "fisher_blocks": self.fisher_blocks,
            "curvature_update_freq": self.curvature_update_freq,
            "curvature_batches": self.curvature_batches,
            "lagged_curvature": self.lagged_curvature,
            "memory_budget": self.memory_budget,
            "max_damping_retries": self.max_damping_retries,
            "jit_solve": self.jit_solve,
            "max_batch_size": self.max_batch_size,
        })
        return config
