"""The figure of docs/step.md: what callbacks.Diagnostics shows while TENGraD starts from a damping
far too small (λ₀ = 1e-4) on the small CNN of benchmarks/damping.py (3C1F width 16, batch 32).

    python benchmarks/diagnostics_figure.py                  # writes docs/diagnostics.png

It trains `--steps` steps and plots, per step, the training loss, the damping λ, the reduction
ratio ρ of the adaptation steps, the KL clip's factor and the rejected steps, from the values the
callback puts in the batch logs (the same ones it writes to TensorBoard).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tengrad_tf import TENGraD, callbacks, data, models  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--damping", type=float, default=1e-4)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs",
                                                      "diagnostics.png"))
    args = parser.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keras.utils.set_random_seed(0)
    model = models.build_model("3c1f", (28, 28, 1), 10, width=16, hidden=128)
    model.compile(optimizer=TENGraD(damping=args.damping),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rows = []
    keep = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: rows.append(
        dict(logs)))
    train = data.load("fashion_mnist", "train", 32, seed=0, shuffle=False)
    model.fit(train, steps_per_epoch=args.steps, epochs=1, verbose=0,
              callbacks=[callbacks.Diagnostics(), keep])
    steps = range(1, len(rows) + 1)
    fig, axes = plt.subplots(4, 1, figsize=(7, 9), sharex=True)
    axes[0].plot(steps, [r["loss"] for r in rows])
    axes[0].set_ylabel("training loss\n(running mean)")
    axes[1].semilogy(steps, [r["damping"] for r in rows])
    axes[1].set_ylabel("damping λ")
    axes[2].plot(steps, [r["reduction_ratio"] for r in rows], ".")
    axes[2].axhspan(0.25, 0.75, color="0.9")
    axes[2].set_ylim(-1, 2)
    axes[2].set_ylabel("reduction ratio ρ")
    axes[3].plot(steps, [r["kl_factor"] for r in rows], label="KL clip factor ν")
    axes[3].plot(steps, [r["rejected_steps"] / max(1, rows[-1]["rejected_steps"]) for r in rows],
                 label=f"rejected steps (of {rows[-1]['rejected_steps']})")
    axes[3].legend()
    axes[3].set_xlabel("step")
    fig.suptitle(f"TENGraD(damping={args.damping:g}), small CNN, Fashion-MNIST, batch 32")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"figure written to {args.out}")


if __name__ == "__main__":
    main()
