"""What a preconditioned optimizer reports: each variable's treatment, and the step rule's numbers.

`summary()` and `treatments()` say, per trainable variable, which block preconditions it (its
layer, cache and Gram route) or why it takes a first-order step; a warning names the first-order
layers once per set. `diagnostics()` reads what the last step did (callbacks.Diagnostics logs it).

What this module does not do: decide any of it (binding.py, the step in preconditioned.py).
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("tengrad_tf")
_WARNING_LOCK = threading.Lock()


class Reporting:
    """The reporting half of `PreconditionedOptimizer` (a mixin of Keras's Optimizer).

    Expects `_treatments` ({variable path: treatment}), `_warned_first_order`, `_blocks` and the
    step rule's variables of `build` on self."""

    def _warn_first_order(self, owners: list[str]) -> None:
        """Warn once per optimizer for a given set of first-order layers: fit may trace its step
        more than once, and replicas of a MirroredStrategy trace it concurrently, one thread
        each."""
        first_order = [p for p, t in self._treatments.items() if t.startswith("first-order")]
        with _WARNING_LOCK:
            if not first_order or frozenset(first_order) == self._warned_first_order:
                return
            self._warned_first_order = frozenset(first_order)
            logger.warning("%s: %d of %d variables have no curvature block and take a first-order "
                           "step (first_order=%r): %s. optimizer.summary() lists why.",
                           type(self).__name__, len(first_order), len(self._treatments),
                           self.first_order, ", ".join(owners))

    def diagnostics(self) -> dict[str, float]:
        """What the step rule did at the last step, as Python floats (callbacks.Diagnostics):
        damping λ (TENGraD's blocks of m samples take λ·√(damping_batch_size / m)), the step's
        coefficients of d and of the previous step (learning_rate="auto"),
        the reduction ratio ρ of the last damping adaptation, the KL clip's factor ν, the norm of
        the direction, the counters, and each block's condition number of its damped Gram (of the
        last curvature update)."""
        if not self.built:
            return {}
        values = {
            "damping": float(self.damping_variable.numpy()) if self.adaptive_damping
            else float(getattr(self, "damping", float("nan"))),
            "step_size": float(self.step_coefficients.numpy()[0]),
            "momentum_coefficient": float(self.step_coefficients.numpy()[1]),
            "reduction_ratio": float(self.reduction_ratio.numpy()),
            "kl_factor": float(self.kl_factor.numpy()),
            "direction_norm": float(self.direction_norm.numpy()),
            "skipped_steps": int(self.skipped_steps.numpy()),
            "damping_retries": int(self.damping_retries.numpy()),
        }
        if self.adaptive_damping:
            values["rejected_steps"] = int(self.rejected_steps.numpy())
        for block in self._blocks.values():
            if getattr(block, "condition", None) is not None:
                values[f"condition/{block.layer.name}"] = float(block.condition.numpy())
        return values

    def treatments(self) -> dict[str, str]:
        """{variable path: how the last traced step treated it}. Empty before the first step."""
        return dict(self._treatments)

    def summary(self, print_fn=print) -> str:
        """A table of every trainable variable and its treatment (block, or first-order and why)."""
        if not self._treatments:
            text = (f"{type(self).__name__}: not bound yet (the treatment of each variable is "
                    "known after one step).")
        else:
            width = max(len(p) for p in self._treatments)
            lines = [f"{'variable'.ljust(width)}  treatment"]
            lines += [f"{p.ljust(width)}  {t}" for p, t in self._treatments.items()]
            text = "\n".join(lines)
        if print_fn:
            print_fn(text)
        return text
