"""The curvature and directions stages of a step: from captured tensors to d = (F + λI)⁻¹ g.

For every bound block: its state prepared (and saved state restored into it, resume.py), this step's
per-sample output gradients (output_grads.py), its layer inputs and output gradients gathered over
replicas (distribute.py), its curvature (fresh or cached, by its own schedule), and its directions.
Variables without a block get their first-order direction (first_order.py). Blocks are only ever
called through their protocol (blocks/protocol.py).
"""

from __future__ import annotations

import tensorflow as tf

from tengrad_tf import binding, distribute, first_order, output_grads
from tengrad_tf.first_order import FIRST_ORDER_DAMPED, FIRST_ORDER_SGD
from tengrad_tf.step import Step


class Directions:
    """The blocks' stages of `PreconditionedOptimizer.apply` (a mixin of it)."""

    def _curvature(self, step: Step, pairs) -> None:
        """Every block's curvature for this step (and the network solve's), fresh or cached."""
        record = step.record
        # The losses of this optimizer's backward pass that reach its layers: another optimizer's
        # loss, or one that depends on other layers only, plays no part in its Fisher.
        step.losses = record.losses_reaching([c for _, calls in pairs for c in calls])
        # fisher="exact": R rows of output gradients per sample, so each block sees each input row
        # R times in a row (output_grads.py); its cache is sized for R·m.
        rows = output_grads.rows_per_sample(self.fisher, step.losses)
        for block, calls in pairs:  # a block refuses a Gram beyond its memory budget (cost.py)
            block.input_repeats = rows
            if rows > 1:  # its summary line depends on R too (its damping metric's form)
                self._treatments.update(binding.describe(block, calls))
        pairs = [(block, output_grads.repeat_inputs(calls, rows)) for block, calls in pairs]
        # Read in the forward pass's graph: it encloses this one when Keras's LossScaleOptimizer
        # calls apply inside a tf.cond branch (mixed_float16), and the true Fisher's sampled pass,
        # gated by `fresh`, must be built there (Record.as_default); the branch captures both.
        with record.as_default():
            # One read of the counter for the whole step: blocks build their schedule from this
            # tensor once (blocks.schedule.once_per_step) instead of once per use.
            step.counter = tf.convert_to_tensor(self.iterations)
            for block, calls in pairs:
                self._prepare(block, [c.inputs for c in calls])
            # Whether any block refreshes its curvature this step: gates the true Fisher's sampled
            # backward pass and the finiteness check of the curvature.
            step.fresh = tf.reduce_any([b.needs_output_grads(step.counter) for b, _ in pairs]
                                       or [False])
        with record.as_default(), tf.name_scope("tengrad_output_grads"):  # scopes mark profiles
            outs = output_grads.output_gradients(
                record, pairs, step.losses, self.fisher, step.scale, record.loss_scale_of(self),
                step.fresh, self._resume_state.sampling_seed, self.iterations)
        index = step.index()
        work = []
        for block, calls in pairs:
            ids = [index[id(v)] for v in block.variables]
            if not any(step.grads[i] is None for i in ids):
                work.append((block, ids, [c.inputs for c in calls], outs[id(block)]))
        if step.context is not None:
            # Every block's samples from every replica, in one collective (distribute.py, step 2).
            flat = [t for _, _, xs, gs in work for t in xs + gs]
            gathered = iter(distribute.gather_samples(step.context, flat, step.fresh))
            work = [(b, ids, [next(gathered) for _ in xs], [next(gathered) for _ in gs])
                    for b, ids, xs, gs in work]
        for block, ids, inputs, outputs in work:
            curvature, tries = block.curvature(step.counter, inputs, outputs)
            step.retries.append(tries)
            step.stores.append((block, curvature))
            step.parts.append((block, ids, curvature))
        if step.parts:
            self._network_curvature(step, work)
        # What preconditions: the curvature just found, or (lagged curvature) on an update step
        # the one cached before it; step.stores keeps the new one (base.FisherBlock.preconditioner).
        step.parts = [(b, ids, b.preconditioner(step.counter, c)) for b, ids, c in step.parts]

    def _prepare(self, holder, *args) -> None:
        """Ask a block (or the network solve) to create its state if it has none yet, and restore
        saved state into it right away (eagerly: the variables are made in tf.init_scope)."""
        if holder.prepare(*args):
            with tf.init_scope():
                self._adopt_state(holder)

    def _network_curvature(self, step: Step, work) -> None:
        """fisher_blocks="network": the one factorization of every block's Gram together."""
        if self._network is None:
            self._network = self._make_network_solve()
            if self._network is None:
                return  # one Fisher block per layer
        parts = step.parts
        self._prepare(self._network, parts[0][0].capacity)
        grams = [c["gram"] for _, _, c in parts]
        # m: this step's (the Grams may be padded), or the blocks' window of several batches.
        samples = parts[0][2].get("samples", tf.shape(work[0][3][0])[0])
        state, tries = self._network.curvature(step.fresh, grams, samples)
        step.retries.append(tries)
        block = parts[0][0]  # the blocks share one schedule
        solving = self._network.preconditioner(block.lags(step.counter), state)
        step.network = (self._network, solving, state)
        step.parts = [(b, ids, {**c, "damping": solving["damping"]}) for b, ids, c in parts]

    def _make_network_solve(self):
        """The network solve (blocks/network.py) when all blocks share one Fisher, else None."""
        return None

    def _directions(self, step: Step) -> None:
        """d = (F + λI)⁻¹ g per block; the first-order rule for every other variable."""
        grads = step.grads
        directions = list(grads)
        if step.network is not None:
            solve, state, _ = step.network
            parts = step.parts
            for (_, ids, _), ds in zip(parts, solve.precondition(
                    [(b, c) for b, _, c in parts], [[grads[i] for i in ids] for _, ids, _ in parts],
                    state)):
                for i, d in zip(ids, ds):
                    directions[i] = d
        else:
            for block, ids, curvature in step.parts:
                for i, d in zip(ids, block.precondition([grads[i] for i in ids], curvature)):
                    directions[i] = d
        preconditioned = {i for _, ids, _ in step.parts for i in ids}
        step.first_order = [i for i, g in enumerate(grads)
                            if g is not None and i not in preconditioned]
        # Read by update_step, which Keras's apply calls later in the same trace.
        self._first_order_indices = frozenset(
            self._get_variable_index(step.variables[i]) for i in step.first_order)
        if self.first_order == FIRST_ORDER_DAMPED:  # F = 0: (F + λI)⁻¹g at the current λ
            lam = self._damping_tensor()
            for i in step.first_order:
                directions[i] = grads[i] / tf.cast(lam, grads[i].dtype)
        elif self.first_order == FIRST_ORDER_SGD:
            trust = self._first_order_trust(tf.float64)
            for i in step.first_order:
                directions[i] = grads[i] * tf.cast(trust, grads[i].dtype)
        step.directions = directions

    def _first_order_trust(self, dtype):
        """The share of its step a variable without a block takes (first_order.trust): min(1,
        λ₀/λ) under adaptive damping, 1 with a fixed one."""
        if not self.adaptive_damping:
            return tf.constant(1.0, dtype)
        return first_order.trust(self.damping, self.damping_variable, dtype)
