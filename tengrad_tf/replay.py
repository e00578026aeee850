"""The step's loss on the same batch at the new weights: h(θ + s), for adaptive damping.

Levenberg–Marquardt damping compares the loss change a step achieved with the change the quadratic
model predicted, on the same batch: ρ = (h(θ + s) − h(θ)) / M(s). Inside Keras `fit` the optimizer
has no model and no batch, but capture has both: the outermost model calls of the step
(`ModelCall`, with their inputs) and the Keras losses (with labels, sample weights and
their weights in the differentiated loss). After the update, `LossReplay.evaluate` calls those
models again on the same inputs, feeding each call's new outputs to the calls that consumed its old
ones (a GAN's discriminator on the generator's output), and evaluates the same losses on the new
predictions. Cost: one forward pass, on the steps that adapt the damping. Only the calls that
depend on the optimizer's own variables are made again; the others keep their outputs. In a GAN
step that updates the generator first, the discriminator's replay used to call the updated
generator again, so its ρ measured both steps (from 0.1 to −29 within three steps on a toy GAN,
without any Dropout).

A call made again may run through trainable variables that are not the optimizer's (the
discriminator, in the generator's replay; two optimizers sharing one model), and another optimizer
of the step may already have updated them. Then h(θ), too, is replayed before the update
(`replays_baseline`), so both sides of h(θ + s) − h(θ) see the same values of those variables, and
ρ measures this optimizer's step alone, whichever optimizer applies first. Against the recorded
loss, a toy GAN step that applied the discriminator first gave the generator ρ from −150 to
−3·10⁷ within six steps: the discriminator's change of the loss over the generator's M(s), which
shrank as λ rose tenfold at each check. The cost is a second forward pass on the steps that adapt the
damping, only where such variables exist; a model that one optimizer trains whole (`fit`) has none.

The replay draws the step's own random numbers: before each call, the state of every
`keras.random.SeedGenerator` of its model (Dropout, GaussianNoise, random augmentation layers) is
set back to its value before the step's call, so the masks and the noise are the same. With fresh
masks, h(θ + s) − h(θ) was dominated by the change of mask: on a Fashion-MNIST CNN with Dropout
0.25 (batch 64) it was of the order of the loss's spread between masks while M(s) was ~1e-3, ρ was
in the thousands or negative, half the steps were taken back and λ rose to 10³–10⁴, where training
stopped. Random draws that do not come from a model's SeedGenerator (a custom layer calling
`tf.random` directly, or Keras's random ops with `seed=None`, which use the global generator) are
still fresh in the replay.

h is Σₗ wₗ·lossₗ(y_true, y_pred, sample_weight), wₗ the loss's weight in the differentiated total
(compile's loss_weights), plus the models' `losses` (regularization and activity losses), as `fit`
computes its training loss. The replay leaves no trace: every non-trainable variable of the models
(BatchNorm's moving statistics, random-seed states) is restored afterwards, and capture records
nothing (no tape records).

Where the step cannot be replayed exactly — a loss whose predictions are not a model's output, or a
model called on a tensor computed from another model's output by ops in between — `LossReplay.of`
returns the reason instead, and the optimizer reports it; it never evaluates a different loss.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import tensorflow as tf

from tengrad_tf import capture
from tengrad_tf.record import LossCall, ModelCall, StepView, depends_on


@dataclasses.dataclass(eq=False)
class LossReplay:
    model_calls: list[ModelCall]
    losses: list[LossCall]
    weights: list[tf.Tensor]  # float64 weight of each loss in the differentiated total
    # h(θ) is replayed too: a call made again runs through trainable variables that are not the
    # optimizer's, which another optimizer may have updated since the step's forward pass.
    replays_baseline: bool = False

    @classmethod
    def of(cls, record: StepView, losses: list[LossCall],
           weight: Callable[[LossCall], tf.Tensor], variables) -> "LossReplay | str":
        """The replay of the step's loss, or the reason it cannot be replayed exactly.
        `variables`: the optimizer's; only the calls that depend on them are made again."""
        calls = [c for c in record.record.model_calls if c.model is not None]
        if not losses:
            return "no Keras loss of this optimizer's backward pass was recorded"
        if not calls:
            return "no Keras model was called under the tape in this step"
        outputs = {id(t) for c in calls for t in tf.nest.flatten(c.outputs)}
        for loss in losses:
            if not all(id(t) in outputs for t in tf.nest.flatten(loss.y_pred)):
                return (f"the predictions of loss '{loss.loss.name}' are not a model's outputs "
                        "(computed from them by other ops)")
        produced = []  # ops of the outputs of the calls so far
        for c in calls:
            for t in tf.nest.flatten((c.args, c.kwargs)):
                if (tf.is_symbolic_tensor(t) and id(t) not in outputs and produced
                        and depends_on([t], set(produced))):
                    return (f"model '{c.model.name}' was called on a tensor computed from another "
                            "model's output by ops in between")
            produced += [t.op for t in tf.nest.flatten(c.outputs) if tf.is_symbolic_tensor(t)]
        # A call of a model without the optimizer's variables, on inputs no call made again, keeps
        # its outputs: another optimizer of the step (a GAN's, for the generator) may already
        # have updated that model, and h(θ + s) moves this optimizer's variables alone.
        own, again, remade = {id(v) for v in variables}, [], set()
        for c in calls:
            if (any(id(v) in own for v in c.model.trainable_variables)
                    or any(id(t) in remade for t in tf.nest.flatten((c.args, c.kwargs)))):
                again.append(c)
                remade |= {id(t) for t in tf.nest.flatten(c.outputs)}
        if not again:
            return "no Keras model called under the tape in this step holds its variables"
        foreign = any(id(v) not in own for c in again for v in c.model.trainable_variables)
        return cls(again, losses, [weight(loss) for loss in losses], replays_baseline=foreign)

    def models(self) -> list:
        unique = {}
        for c in self.model_calls:
            unique.setdefault(id(c.model), c.model)
        return list(unique.values())

    def penalties(self) -> tf.Tensor:
        """Σ of the models' `losses` at the variables' current values, float64."""
        terms = [tf.reduce_sum(tf.cast(t, tf.float64)) for model in self.models()
                 for t in model.losses]
        return tf.add_n(terms) if terms else tf.constant(0.0, tf.float64)

    def recorded(self) -> tf.Tensor:
        """h(θ): the step's own loss values (call before the update, for the penalties)."""
        return tf.add_n([w * tf.cast(tf.reduce_sum(loss.value), tf.float64)
                         for loss, w in zip(self.losses, self.weights)]) + self.penalties()

    def baseline(self, inputs: list[tf.Tensor] | None = None) -> tf.Tensor:
        """h(θ) as h(θ + s) will be compared with it (call before the update): replayed where
        `replays_baseline`, else the recorded loss. `inputs` as in `evaluate`."""
        return self.evaluate(inputs) if self.replays_baseline else self.recorded()

    def inputs(self) -> list[tf.Tensor]:
        """The tensors the replay reads that come from outside it: the models' inputs (not the
        outputs of an earlier call), the labels, sample weights and loss weights. Under
        tf.distribute each replica has its own; `evaluate(inputs)` takes a replica's."""
        outputs = {id(t) for c in self.model_calls for t in tf.nest.flatten(c.outputs)}
        leaves = tf.nest.flatten([(c.args, c.kwargs) for c in self.model_calls])
        leaves += tf.nest.flatten([(loss.y_true, loss.sample_weight) for loss in self.losses])
        leaves += [value for c in self.model_calls for _, value in c.random_states]
        seen, out = set(), []
        for t in leaves + self.weights:
            if tf.is_tensor(t) and id(t) not in outputs and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        return out

    def evaluate(self, inputs: list[tf.Tensor] | None = None) -> tf.Tensor:
        """h at the variables' current values, on the step's inputs (or on `inputs`, in the
        order of `inputs()`), leaving no state changed."""
        new = {} if inputs is None else {id(old): fresh for old, fresh in zip(self.inputs(),
                                                                               inputs)}

        def now(t):
            return new.get(id(t), t) if tf.is_tensor(t) else t

        saved = [(v, tf.identity(v.value)) for model in self.models()
                 for v in model.non_trainable_variables]
        previous = [t for _, t in saved]  # what the next call's random states wait for
        with tf.control_dependencies(previous):
            for c in self.model_calls:
                # The random states as the step's call found them, after the previous call ran.
                with tf.control_dependencies([t for t in tf.nest.flatten(previous)
                                              if tf.is_tensor(t)]):
                    rewound = [v.assign(now(value)) for v, value in c.random_states]
                with tf.control_dependencies(rewound):
                    args, kwargs = tf.nest.map_structure(now, (c.args, c.kwargs))
                    outputs = c.model(*args, **kwargs)
                new.update({id(old): fresh for old, fresh in zip(tf.nest.flatten(c.outputs),
                                                                tf.nest.flatten(outputs))})
                previous = outputs
            total = tf.add_n([now(w) * tf.cast(tf.reduce_sum(capture.unrecorded_loss(
                loss.loss, now(loss.y_true), tf.nest.map_structure(now, loss.y_pred),
                tf.nest.map_structure(now, loss.sample_weight))), tf.float64)
                for loss, w in zip(self.losses, self.weights)])
            total = total + self.penalties()
        with tf.control_dependencies([total]):
            restores = [v.assign(value) for v, value in saved]
        with tf.control_dependencies(restores):
            return tf.identity(total)
