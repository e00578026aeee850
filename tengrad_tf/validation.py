"""Argument checks for the optimizers' constructors: fail at construction, naming the argument.

Keras's base optimizer accepts almost any value and fails (or misbehaves) only inside the first
traced step; these checks say what was wrong and what is allowed before anything is built. Each
optimizer checks its own arguments with `check`; `validate_common` checks those every
preconditioned optimizer shares.
"""

from __future__ import annotations

import math
from typing import Any

import keras

from tengrad_tf import fisher
from tengrad_tf.first_order import FIRST_ORDER_RULES

#: learning_rate="auto" (and momentum="auto"): chosen by the quadratic model (adaptive.py).
AUTO = "auto"


def check(name: str, value, ok: bool, allowed: str):
    """Raise ValueError naming the argument, its value and what is allowed."""
    if not ok:
        raise ValueError(f"invalid {name}={value!r}; {allowed}.")


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_int(x, low: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def validate_common(args: dict[str, Any]) -> None:
    """Check the hyperparameters every preconditioned optimizer shares."""
    lr = args["learning_rate"]
    check("learning_rate", lr,
          callable(lr) or isinstance(lr, keras.optimizers.schedules.LearningRateSchedule)
          or (is_number(lr) and lr > 0) or lr == AUTO,
          'expected a float > 0, a LearningRateSchedule, a callable or "auto"')
    mu = args["momentum"]
    check("momentum", mu, (is_number(mu) and 0 <= mu < 1) or (mu == AUTO and lr == AUTO),
          'expected a float in [0, 1), or "auto" with learning_rate="auto"')
    wd = args["weight_decay"]
    check("weight_decay", wd, wd is None or (is_number(wd) and wd >= 0),
          "expected None or a float >= 0")
    check("fisher", args["fisher"], args["fisher"] in fisher.FISHER_TYPES,
          f"expected one of {fisher.FISHER_TYPES}")
    check("first_order", args["first_order"], args["first_order"] in FIRST_ORDER_RULES,
          f"expected one of {FIRST_ORDER_RULES}")
    fo_lr = args["first_order_learning_rate"]
    check("first_order_learning_rate", fo_lr, is_number(fo_lr) and fo_lr > 0, "expected a float > 0")
    kl = args["kl_clip"]
    check("kl_clip", kl, kl is None or (is_number(kl) and kl > 0), "expected None or a float > 0")
    check("max_consecutive_skips", args["max_consecutive_skips"],
          is_int(args["max_consecutive_skips"], 1), "expected an int >= 1")
    check("seed", args["seed"], args["seed"] is None or is_int(args["seed"], 0),
          "expected None or an int >= 0")
    # Keras's base optimizer accepts any value for these and fails (or misbehaves) only later.
    for name in ("clipnorm", "clipvalue", "global_clipnorm", "loss_scale_factor"):
        value = args[name]
        check(name, value, value is None or (is_number(value) and value > 0),
              "expected None or a float > 0")
    check("use_ema", args["use_ema"], isinstance(args["use_ema"], bool), "expected True or False")
    ema = args["ema_momentum"]
    check("ema_momentum", ema, is_number(ema) and 0 <= ema <= 1, "expected a float in [0, 1]")
    freq = args["ema_overwrite_frequency"]
    check("ema_overwrite_frequency", freq, freq is None or is_int(freq, 1),
          "expected None or an int >= 1")
    gas = args["gradient_accumulation_steps"]
    check("gradient_accumulation_steps", gas, gas is None,
          "the curvature is that of one batch, so gradient accumulation is not supported; "
          "use a larger batch_size instead")
