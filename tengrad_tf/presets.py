"""The paper's hyperparameter presets, and the optimizers they build.

examples/train.py (the main job) and the benchmarks both train from these, so that a curve of
the main job and a row of a benchmark table come from the same settings:

    hp = presets.optimizer_hparams("tengrad", "fashion_mnist")   # {"learning_rate": 0.003, ...}
    optimizer = presets.make_optimizer("tengrad", hp, seed=0)

A value is resolved as: library default < `GENERIC_DEFAULTS` < the preset < explicit overrides,
and only the hyperparameters the optimizer takes (`OPTIMIZER_HPARAMS`) are kept.
"""

from __future__ import annotations

import inspect
from typing import Any

import keras

from tengrad_tf.kfac import KFAC
from tengrad_tf.optimizer import TENGraD

OPTIMIZERS = ("tengrad", "sgd", "adam", "kfac")
CIFAR_DATASETS = ("cifar10", "cifar100")

# The hyperparameters each optimizer takes from a preset (and from the main job's flags).
OPTIMIZER_HPARAMS = {
    "sgd": ("learning_rate", "momentum", "weight_decay"),
    "adam": ("learning_rate", "weight_decay"),
    "tengrad": ("learning_rate", "momentum", "weight_decay", "damping", "fisher",
                "curvature_update_freq", "kl_clip", "damping_metric"),
    "kfac": ("learning_rate", "momentum", "weight_decay", "damping", "fisher", "kl_clip",
             "stat_decay", "cov_update_freq", "inv_update_freq", "inverse_method"),
}

# Model sizes: the paper's, and a demo size that trains in minutes on a laptop CPU. Each preset
# carries both kinds of knob (3C1F's width/hidden, the CIFAR nets' multiplier), so that any model
# can be combined with any dataset.
_FULL_WIDTH = {"width": 128, "hidden": 500, "width_multiplier": 1.0}
_DEMO_WIDTH = {"width": 32, "hidden": 500, "width_multiplier": 0.25}

# "paper" holds the full-scale values that the main job's --paper switches on, "demo" the small
# CPU defaults used otherwise. Optimizer values are used at both scales.
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's Fashion-MNIST settings.
    "fashion_mnist": {
        "model": "3c1f", "batch_size": 128, "milestones": [],
        "paper": {"epochs": 10, **_FULL_WIDTH},
        "demo": {"epochs": 1, **_DEMO_WIDTH},
        "optimizers": {
            "sgd": {"learning_rate": 0.03, "momentum": 0.9, "weight_decay": 1e-3},
            "tengrad": {"learning_rate": 0.003, "damping": 0.1, "weight_decay": 1e-3,
                        "curvature_update_freq": 100},
            # The Cholesky inverse: the same inverse as the eigendecomposition, 4–10× faster at
            # every factor size measured (benchmarks/results/kfac_inverse.json), so the baseline
            # is K-FAC at its faster.
            "kfac": {"learning_rate": 0.003, "damping": 0.1, "inverse_method": "cholesky"},
            "adam": {"learning_rate": 1e-3},
        },
    },
    # The schedule is the paper's (60 epochs, x0.1 at 30 and 50). The per-optimizer values are the
    # usual K-FAC-style CIFAR settings, not checked against the paper's appendix.
    "cifar": {
        "model": "vgg16_bn", "batch_size": 128, "milestones": [30, 50],
        "paper": {"epochs": 60, **_FULL_WIDTH},
        "demo": {"epochs": 1, **_DEMO_WIDTH},
        "optimizers": {
            "sgd": {"learning_rate": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
            "tengrad": {"learning_rate": 0.01, "damping": 0.03, "weight_decay": 3e-3,
                        "curvature_update_freq": 100},
            "kfac": {"learning_rate": 0.01, "damping": 0.03, "weight_decay": 3e-3,
                     "inverse_method": "cholesky"},
            "adam": {"learning_rate": 1e-3},
        },
    },
    # No paper values: library defaults, for new datasets and models.
    "none": {
        "model": "3c1f", "batch_size": 128, "milestones": [],
        "paper": {"epochs": 10, **_FULL_WIDTH}, "demo": {"epochs": 1, **_DEMO_WIDTH},
        "optimizers": {"sgd": {"learning_rate": 0.01, "momentum": 0.9}, "tengrad": {},
                       "kfac": {}, "adam": {"learning_rate": 1e-3}},
    },
}
# What SGD and Adam take when a preset leaves a value out (TENGraD and K-FAC take their
# constructors' defaults, which override these).
GENERIC_DEFAULTS = {"momentum": 0.9, "weight_decay": 0.0, "damping": 0.1, "fisher": "true",
                    "curvature_update_freq": 10, "kl_clip": 1e-2, "learning_rate": 0.01}

_CLASSES = {"tengrad": TENGraD, "kfac": KFAC}


def preset_for(dataset: str) -> str:
    """The preset a dataset trains with by default."""
    return "cifar" if dataset in CIFAR_DATASETS else "fashion_mnist"


def _constructor_defaults(cls: type) -> dict[str, Any]:
    return {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items()
            if v.default is not inspect.Parameter.empty}


def optimizer_hparams(name: str, preset: str = "fashion_mnist",
                      overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Library defaults < `GENERIC_DEFAULTS` < the preset < `overrides`, restricted to what
    optimizer `name` takes (`OPTIMIZER_HPARAMS[name]`); keys it does not take are ignored."""
    values = dict(GENERIC_DEFAULTS)
    if name in _CLASSES:
        values.update(_constructor_defaults(_CLASSES[name]))
    values.update(PRESETS[preset]["optimizers"].get(name, {}))
    values.update(overrides or {})
    return {k: values[k] for k in OPTIMIZER_HPARAMS[name] if k in values}


def make_optimizer(name: str, hparams: dict[str, Any], learning_rate: Any = None,
                   seed: int | None = None) -> keras.optimizers.Optimizer:
    """Optimizer `name` with `hparams` (as `optimizer_hparams` returns them).

    `learning_rate` (a float or a schedule) replaces `hparams["learning_rate"]` when given; `seed`
    fixes TENGraD's and K-FAC's label sampling.
    """
    lr = hparams["learning_rate"] if learning_rate is None else learning_rate
    weight_decay = hparams.get("weight_decay") or None  # Keras wants None, not 0, for "off"
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=hparams["momentum"], weight_decay=weight_decay)
    if name == "adam":
        return keras.optimizers.Adam(lr, weight_decay=weight_decay)
    cls = _CLASSES[name]
    kwargs = dict(hparams, learning_rate=lr, weight_decay=weight_decay, seed=seed)
    # Only what the constructor names: a preset may leave out, and --set may not know, the rest.
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})
