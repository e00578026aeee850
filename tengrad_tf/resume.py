"""Saving and resuming the curvature: the optimizer's state that Keras does not know about.

Keras saves an optimizer's `variables` by index (.keras files, save_weights, BackupAndRestore). The
blocks' curvature state (TENGraD's cache, K-FAC's factors and inverses, the network solve's
factorization) is not among them: it is created at the first trace, after `build` and after a
load. It is saved under extra keys "curvature_<i>_<field>", where i is the index of the block's
kernel among the optimizer's variables (stable across processes and layer renames, like Keras's own
indices), and "curvature_network_<field>". A load keeps the arrays pending until the block has
prepared its state; the core then hands it to `_adopt_state`, which restores the arrays into it. For
tf.train.Checkpoint the same variables are tracked, under the same names, by a tf.Module child
`_resume_state`; tracking them when they are created restores them if `restore()` was called before
(TF's deferred restoration).

The true Fisher samples labels statelessly from (seed, step), so its seed ("sampling_seed") is the
only other state a resumed run needs to draw the labels the uninterrupted one would.

What this module does not do: decide what a block keeps (its `state_variables`), or when.
"""

from __future__ import annotations

import random

import numpy as np
import tensorflow as tf


class ResumableCurvature:
    """The save/load half of `PreconditionedOptimizer` (a mixin of Keras's Optimizer).

    Expects `_blocks` ({id(layer): block}) and `_network` (the network solve, or None) on self."""

    _STATE_PREFIX = "curvature_"
    _SEED_KEY = "sampling_seed"

    def _init_resume_state(self, seed) -> None:
        # seed=None draws one as Keras does for its layers (Python's `random`, fixed by
        # keras.utils.set_random_seed); it is saved with the optimizer, so a resumed run samples
        # what the original one would.
        base = random.randint(1, 10**9) if seed is None else int(seed)
        self._pending_state: dict[str, dict[str, np.ndarray]] = {}
        self._resume_state = tf.Module(name="resume_state")
        with tf.init_scope():
            self._resume_state.sampling_seed = tf.Variable(
                base, dtype=tf.int64, trainable=False, name=self._SEED_KEY)

    def _state_key(self, holder) -> str:
        key = getattr(holder, "key", None)  # the network solve's own key
        return key or f"{self._STATE_PREFIX}{self._get_variable_index(holder.variables[0])}"

    def _curvature_holders(self) -> list:
        """Every object with saved curvature state: the blocks, and the network solve."""
        return list(self._blocks.values()) + ([self._network] if self._network else [])

    def _adopt_state(self, holder) -> None:
        """Right after `holder` (a block, or the network solve) created its state variables:
        restore loaded arrays into them, and track them for tf.train.Checkpoint. Eagerly (the core
        calls it in tf.init_scope)."""
        key = self._state_key(holder)
        pending = self._pending_state.pop(key, None)
        if pending is not None:
            holder.load_state(pending)
        for field, variable in holder.state_variables.items():
            setattr(self._resume_state, f"{key}_{field}", variable)

    def _saved_block_state(self) -> dict[str, dict[str, np.ndarray]]:
        """{key: {field: array}} of every block, and of loaded state not yet bound to a block."""
        state = {k: dict(v) for k, v in self._pending_state.items()}
        for holder in self._curvature_holders():
            variables = holder.state_variables
            if variables:
                state[self._state_key(holder)] = {f: v.numpy() for f, v in variables.items()}
        return state

    def save_own_variables(self, store):
        super().save_own_variables(store)
        store[self._SEED_KEY] = self._resume_state.sampling_seed.numpy()
        for key, fields in self._saved_block_state().items():
            for field, value in fields.items():
                store[f"{key}_{field}"] = value

    def load_own_variables(self, store):
        keys = list(store.keys())
        indexed = {k: store[k] for k in keys if k.isdigit()}
        # Keras checks the count of its own (indexed) variables and skips the whole optimizer with
        # a warning on a mismatch; the curvature is then skipped as well, never loaded alone.
        super().load_own_variables(indexed)
        if len(indexed) != len(self.variables):
            return
        if self._SEED_KEY in keys:
            self._resume_state.sampling_seed.assign(store[self._SEED_KEY])
        loaded: dict[str, dict[str, np.ndarray]] = {}
        for k in keys:
            if k.startswith(self._STATE_PREFIX):
                index, field = k[len(self._STATE_PREFIX):].split("_", 1)
                loaded.setdefault(f"{self._STATE_PREFIX}{index}", {})[field] = np.asarray(store[k])
        self._pending_state = loaded
        for holder in self._curvature_holders():
            if not holder.state_variables:
                continue  # not prepared yet: it takes its pending state when it is
            # A file without curvature (saved before it was saved) leaves the block to recompute
            # on its next step, as a fresh one would; never the curvature of another step.
            arrays = self._pending_state.pop(self._state_key(holder), None)
            if arrays is None:
                holder.reset_state()
            else:
                holder.load_state(arrays)
