"""K-FAC, the baseline: the same Keras optimizer as TENGraD with Kronecker-factored curvature blocks.

Everything but the curvature is shared with TENGraD (preconditioned.py: binding through capture, KL
clipping, momentum, weight decay, the skip of non-finite steps). The block, its factors, damping and
schedule are blocks/kronecker.py's; this module is the optimizer: its hyperparameters, and which
block a layer gets.
"""

from __future__ import annotations

import keras

from tengrad_tf.blocks.kronecker import KroneckerBlock
from tengrad_tf.preconditioned import PreconditionedOptimizer
from tengrad_tf.record import BindingError
from tengrad_tf.validation import check, is_int, is_number

__all__ = ["BindingError", "KFAC", "KroneckerBlock"]

INVERSE_METHODS = ("eigh", "cholesky")


@keras.saving.register_keras_serializable(package="tengrad_tf")
class KFAC(PreconditionedOptimizer):
    """K-FAC (KFC for convolutions): Kronecker-factored natural gradient, the TENGraD baseline.

    Each Dense, EinsumDense, Embedding and convolution layer (grouped and depthwise: per group; not
    transposed or separable ones) forms one block of its kernel and bias whose Fisher is approximated
    by A ⊗ G (running averages of the input and output-gradient second moments) and inverted with
    π-corrected factored Tikhonov damping; see the module docstring for the exact conventions. The
    step rule (KL clipping, momentum, weight decay) and the binding are TENGraD's.

    Usage: `model.compile(optimizer=KFAC(), loss=..., ...)` then `model.fit(...)`; nothing else.

    Args:
        learning_rate: float, `keras.optimizers.schedules.LearningRateSchedule`, or callable.
        damping: λ > 0; each factor gets √λ of it (times π or 1/π).
        momentum: μ in [0, 1), heavy-ball momentum on the natural-gradient direction.
        weight_decay: decoupled weight decay (θ ← θ − lr·wd·θ), or None.
        fisher: "true" samples labels from the model's predictive distribution; "exact" weights
            every class by its probability ((sparse) categorical cross-entropy); "empirical" uses
            the training labels.
        kl_clip: κ > 0 for KL clipping of the step, or None to disable.
        stat_decay: ε in [0, 1), factor ← ε·factor + (1 − ε)·new (the first update takes new).
        cov_update_freq: update the running factors every this many steps (TCov).
        inv_update_freq: recompute the damped inverses every this many steps (TInv).
        inverse_method: "eigh" (an eigendecomposition of each factor, the paper's and
            kfac-pytorch's) or "cholesky" (a Cholesky factorization of the damped factor, several
            times faster for large factors; F + δI must be numerically positive definite, see
            blocks/kronecker.py). Both give the same damped inverse.
        max_consecutive_skips: raise after this many non-finite steps in a row.
        seed: seed of the label sampling of the true Fisher, which is stateless in (seed, step)
            so that a resumed run draws the same labels; None draws one, saved with the optimizer.
        clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum, ema_overwrite_frequency,
        loss_scale_factor, name: as in every Keras optimizer. `gradient_accumulation_steps` is
            rejected, as for TENGraD.

    References: Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate
    Curvature", ICML 2015; Grosse & Martens, "A Kronecker-factored approximate Fisher matrix for
    convolution layers", ICML 2016.
    """

    def __init__(
        self,
        learning_rate=0.003,
        damping=0.1,
        momentum=0.9,
        weight_decay=None,
        fisher="true",
        kl_clip=1e-3,
        first_order="adam",
        first_order_learning_rate=1e-3,
        stat_decay=0.95,
        cov_update_freq=20,
        inv_update_freq=100,
        inverse_method="eigh",
        max_consecutive_skips=50,
        seed=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name="KFAC",
        **kwargs,
    ):
        check("damping", damping, is_number(damping) and damping > 0, "expected a float > 0")
        check("learning_rate", learning_rate, learning_rate != "auto",
              "K-FAC has no exact quadratic model to choose its step with (TENGraD has)")
        check("stat_decay", stat_decay, is_number(stat_decay) and 0 <= stat_decay < 1,
              "expected a float in [0, 1)")
        check("cov_update_freq", cov_update_freq, is_int(cov_update_freq, 1), "expected an int >= 1")
        check("inv_update_freq", inv_update_freq, is_int(inv_update_freq, 1), "expected an int >= 1")
        check("inverse_method", inverse_method, inverse_method in INVERSE_METHODS,
              f"expected one of {INVERSE_METHODS}")
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
        self.stat_decay = float(stat_decay)
        self.cov_update_freq = int(cov_update_freq)
        self.inv_update_freq = int(inv_update_freq)
        self.inverse_method = inverse_method

    def _unsupported_reason(self, helper):
        return KroneckerBlock.unsupported_reason(helper)

    def _make_block(self, layer):
        return KroneckerBlock(layer, damping=self.damping, stat_decay=self.stat_decay,
                              cov_update_freq=self.cov_update_freq,
                              inv_update_freq=self.inv_update_freq,
                              inverse_method=self.inverse_method)

    def get_config(self):
        config = super().get_config()
        config.update({
            "damping": self.damping,
            "stat_decay": self.stat_decay,
            "cov_update_freq": self.cov_update_freq,
            "inv_update_freq": self.inv_update_freq,
            "inverse_method": self.inverse_method,
        })
        return config
