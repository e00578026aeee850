"""The one interface between the optimizer's core and a curvature block, for every kind of block.

TENGraD's exact `FisherBlock` (base.py) and K-FAC's `KroneckerBlock` (kronecker.py) implement it,
and name it as their base so that a reader finds the contract from either. Calls go one way: the
core asks, the block answers, and a block never calls back into the optimizer (what it must know, it
is told at construction: its hyperparameters, under their own names). Beyond the protocol, only
TENGraD's exact blocks offer `project` (Uᵀv, for the exact quadratic model of step_length.py),
`capacity` (for the network's one solve, network.py) and `refactor` (the cached factorization made
again for a new adaptive λ, by the damping adaptation of adaptive.py), which K-FAC has no use for.

One traced step, in the core's order:
  1. `prepare(inputs)`: create the block's state variables if it has none (eagerly, in
     tf.init_scope), sized for the step's inputs. The core then restores saved state into them
     and tracks them for checkpoints (resume.py).
  2. `needs_output_grads(step)`: whether this step refreshes the curvature (the only use of the
     per-sample output gradients, which the true Fisher pays a backward pass for). Pure.
  3. `curvature(step, inputs, output_grads)`: fresh or cached curvature, by the block's schedule,
     as a dict of tensors, and the damping retries it took. Assigns nothing.
  4. `preconditioner(step, curvature)`: the curvature that preconditions this step's gradients:
     `curvature` itself, or (TENGraD's lagged curvature) on an update step the one cached before.
  5. `precondition(grads, curvature)`: the block's directions.
  6. `commit(step, curvature)`: keep the curvature of step 3 (called only when the whole step is
     finite).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import keras
import tensorflow as tf


@runtime_checkable
class CurvatureBlock(Protocol):
    """A curvature block of one layer's parameters (kernel and bias together)."""

    layer: keras.layers.Layer
    #: The layer's [kernel, bias?], in this order: the variables one block preconditions.
    variables: list
    #: Set by the core before the first step (callbacks.Diagnostics): keep extra per-step numbers.
    diagnostics: bool

    def describe(self, input_shape) -> str:
        """One line for `summary()`: the block's kind, layer, sizes and what it caches."""

    def prepare(self, inputs: list[tf.Tensor]) -> bool:
        """Create the state variables for these inputs (one per call of the layer) unless they
        exist. True if this call created them."""

    @property
    def state_variables(self) -> dict[str, tf.Variable]:
        """{field: variable} of everything saved and resumed; {} before `prepare`."""

    def load_state(self, arrays: dict) -> None:
        """Set the state from saved arrays (eagerly), checking that they fit."""

    def reset_state(self) -> None:
        """Forget the curvature: the next step computes it afresh."""

    def needs_output_grads(self, step: tf.Tensor) -> tf.Tensor:
        """Bool tensor: whether `curvature` uses this step's output gradients."""

    def curvature(self, step: tf.Tensor, inputs: list[tf.Tensor], output_grads: list[tf.Tensor]
                  ) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        """(curvature, damping retries as an int32 tensor) for this step."""

    def preconditioner(self, step: tf.Tensor, curvature: dict[str, tf.Tensor]
                       ) -> dict[str, tf.Tensor]:
        """The curvature that preconditions this step (from `curvature`'s result)."""

    def precondition(self, grads: list[tf.Tensor], curvature: dict[str, tf.Tensor]
                     ) -> list[tf.Tensor]:
        """The directions of the block's variables from their gradients."""

    def commit(self, step: tf.Tensor, curvature: dict[str, tf.Tensor]) -> None:
        """Keep `curvature` for later steps, as the schedule says."""
