"""Argument validation (tengrad_tf/validation.py): a bad value fails at construction, naming the
argument and the value, for every constructor argument of TENGraD and KFAC.
"""

from __future__ import annotations

import inspect

import pytest

from tengrad_tf import KFAC, TENGraD

COMMON_BAD = [
    ("learning_rate", 0.0), ("learning_rate", float("nan")), ("learning_rate", "fast"),
    ("momentum", 1.0), ("momentum", -0.1), ("momentum", True), ("momentum", "auto"),
    ("weight_decay", -1e-4), ("weight_decay", "l2"),
    ("fisher", "sampled"), ("fisher", None),
    ("kl_clip", 0.0), ("kl_clip", -1.0),
    ("first_order", "rmsprop"), ("first_order", None),
    ("first_order_learning_rate", 0.0), ("first_order_learning_rate", "small"),
    ("max_consecutive_skips", 0), ("max_consecutive_skips", 2.0),
    ("seed", -1), ("seed", 1.5), ("seed", "x"),
    ("clipnorm", 0.0), ("clipvalue", -1.0), ("global_clipnorm", "1"),
    ("use_ema", "yes"), ("ema_momentum", 1.5), ("ema_overwrite_frequency", 0),
    ("loss_scale_factor", 0.0),
    ("gradient_accumulation_steps", 4),
    ("name", 3),
]
SPECIFIC_BAD = {
    TENGraD: [("damping", 0.0), ("damping", float("inf")), ("damping", "big"),
              ("adaptive_damping", "yes"), ("damping_adaptation_interval", 0),
              ("fisher_blocks", "all"),
              ("curvature_update_freq", 0), ("curvature_update_freq", 2.5),
              ("curvature_batches", 0), ("curvature_batches", 2.0),
              ("lagged_curvature", "yes"), ("lagged_curvature", 1),
              ("memory_budget", 1000), ("memory_budget", 2.0**30),
              ("max_damping_retries", -1), ("max_damping_retries", None),
              ("jit_solve", "yes"), ("jit_solve", 1), ("max_batch_size", 0),
              ("max_batch_size", 64.0), ("damping_batch_size", 0),
              ("damping_batch_size", 128.0), ("damping_metric", "kronecker"),
              ("damping_metric", None)],
    KFAC: [("damping", -1.0), ("stat_decay", 1.0), ("stat_decay", -0.5), ("learning_rate", "auto"),
           ("cov_update_freq", 0), ("inv_update_freq", 1.5), ("inverse_method", "lu")],
}
CASES = [(cls, arg, value) for cls in (TENGraD, KFAC)
         for arg, value in COMMON_BAD + SPECIFIC_BAD[cls]]


@pytest.mark.parametrize("cls, arg, value", CASES,
                         ids=[f"{c.__name__}-{a}-{v!r}" for c, a, v in CASES])
def test_bad_argument_fails_at_construction_naming_argument_and_value(cls, arg, value):
    with pytest.raises(ValueError) as err:
        cls(**{arg: value})
    message = str(err.value)
    assert arg in message and repr(value).strip("'") in message, message


@pytest.mark.parametrize("cls", [TENGraD, KFAC])
def test_every_constructor_argument_has_a_bad_value_test(cls):
    """A new argument without validation (and a case above) makes this fail."""
    arguments = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    covered = {arg for arg, _ in COMMON_BAD + SPECIFIC_BAD[cls]}
    assert arguments == covered


@pytest.mark.parametrize("kwargs, name", [
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"damping": 0.0}, "damping"),
    ({"damping": "big"}, "damping"),
    ({"momentum": 1.0}, "momentum"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"fisher": "sampled"}, "fisher"),
    ({"curvature_update_freq": 0}, "curvature_update_freq"),
    ({"curvature_update_freq": 2.5}, "curvature_update_freq"),
    ({"kl_clip": 0.0}, "kl_clip"),
    ({"memory_budget": 10}, "memory_budget"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps"),
])
def test_bad_hyperparameters_fail_at_construction_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TENGraD(**kwargs)
