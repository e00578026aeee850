"""One `fit` step of TENGraD against the float64 per-sample reference (tests/reference.py).

Shared by the tests of every layer kind: lr 0.125, damping 0.05 (fixed), no momentum or KL clip,
d = g for variables without a block, fresh curvature, the empirical Fisher or the true Fisher at known sampled labels (the
`fixed_sampled_labels` fixture), compared at rtol 1e-9.
"""

from __future__ import annotations

import numpy as np

from tests import reference
from tests.helpers import DAMPING, LR, per_sample_sce, plain, sce, weights


def fit_matches_reference(model, x, y, fisher_type, sampled_labels, classes=3, blocks=None,
                          per_sample_loss=per_sample_sce, metrics=None, **optimizer):
    """One fit step on the whole batch; asserts every variable moved by −lr·d of the reference
    (a block for each layer with an exact block, d = g elsewhere). Returns the optimizer.

    `sampled_labels`: the `fixed_sampled_labels` fixture's dict (used when fisher_type="true").
    `metrics`: the reference's damping metrics ({first variable's path: D}, reference.py)."""
    y_fisher = y
    if fisher_type == "true":
        y_fisher = (np.asarray(y) + 1) % classes
        sampled_labels["y"] = y_fisher
    expected, _ = reference.reference_directions(model, x, y, y_fisher, per_sample_loss, DAMPING,
                                                 blocks=blocks, metrics=metrics)
    before = weights(model)
    opt = plain(**{**dict(learning_rate=LR, damping=DAMPING, fisher=fisher_type,
                          first_order="sgd"), **optimizer})
    model.compile(optimizer=opt, loss=sce())
    model.fit(x, y, batch_size=len(y), epochs=1, shuffle=False, verbose=0)
    after = weights(model)
    for path, d in expected.items():
        np.testing.assert_allclose(after[path], before[path] - LR * d, rtol=1e-9, atol=1e-12,
                                   err_msg=path)
    return opt


def treatment(opt, layer) -> str:
    return opt.treatments()[layer.trainable_weights[0].path]
