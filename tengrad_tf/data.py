"""TFDS input pipelines for the TENGraD experiments that also work offline.

What it does:

* ``load()`` returns batched ``(image, label)`` pipelines (float32 images normalised with the
  usual per-channel mean/std, int64 labels, prefetched) for ``fashion_mnist``, ``mnist``,
  ``cifar10`` and ``cifar100``, with the standard CIFAR training augmentation (4-pixel padded
  random crop + horizontal flip).
* Data is prepared once into an ordinary TFDS data dir (``$TENGRAD_DATA_DIR`` or
  ``~/tensorflow_datasets``) and reused afterwards; ``tfds.load(name, data_dir=...)`` reads it too.
* Offline sources (offline.py), tried before any download:
  - Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, restored byte for byte into
    the upstream files and handed to the *stock* TFDS builder, so the prepared dataset is exactly
    the stock one.
  - CIFAR-10/100 from ``.npz`` arrays in ``$TENGRAD_CIFAR_NPZ_DIR`` (``cifar10.npz``: the full
    set, prepared under the stock name ``cifar10``; ``cifar100_small.npz``: a 100/20-per-class
    subset, prepared under the distinct name ``cifar100_small`` so it is never mistaken for the
    full CIFAR-100). Both reuse the stock TFDS features.
* With no prepared data and no offline source, TFDS downloads as usual when the network is up;
  when it is not, ``DataUnavailableError`` is raised at once instead of TFDS retrying for minutes.

What it does not do: it ships no data, never fetches anything but TFDS's own downloads, has no
offline source for MNIST, and does no validation split or other augmentation policies.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import tempfile
import threading
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tengrad_tf import offline
from tengrad_tf.offline import (DEBIAN_FASHION_MNIST_DIR, ENV_CIFAR_NPZ_DIR,
                                ENV_FASHION_MNIST_DEBIAN_DIR, DataUnavailableError,
                                restore_fashion_mnist_gzip)

log = logging.getLogger(__name__)

ENV_DATA_DIR = "TENGRAD_DATA_DIR"

# The offline sources' settings, error and restore are offline.py's; importable from here too.
__all__ = ["DEBIAN_FASHION_MNIST_DIR", "ENV_CIFAR_NPZ_DIR", "ENV_DATA_DIR",
           "ENV_FASHION_MNIST_DEBIAN_DIR", "DataUnavailableError", "DatasetSpec",
           "default_data_dir", "info", "load", "num_examples", "prepare",
           "restore_fashion_mnist_gzip", "synthetic_text"]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Static facts about a supported dataset (no data access needed)."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment_train: bool  # default for ``load(..., augment=None)`` on train splits
    download_host: tuple[str, int]  # host TFDS downloads from; probed before downloading


_SPECS = {
    "fashion_mnist": DatasetSpec("fashion_mnist", 10, (28, 28, 1), (0.2860,), (0.3530,), False,
                                 ("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80)),
    "mnist": DatasetSpec("mnist", 10, (28, 28, 1), (0.1307,), (0.3081,), False,
                         ("storage.googleapis.com", 443)),
    "cifar10": DatasetSpec("cifar10", 10, (32, 32, 3), (0.4914, 0.4822, 0.4465),
                           (0.2470, 0.2435, 0.2616), True, ("www.cs.toronto.edu", 443)),
    "cifar100": DatasetSpec("cifar100", 100, (32, 32, 3), (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762), True, ("www.cs.toronto.edu", 443)),
}


def info(name: str) -> DatasetSpec:
    """Return num_classes, input shape, normalisation constants etc. of a supported dataset."""
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; supported: {sorted(_SPECS)}") from None


def default_data_dir() -> Path:
    """``$TENGRAD_DATA_DIR`` if set, else the TFDS default ``~/tensorflow_datasets``."""
    return Path(os.environ.get(ENV_DATA_DIR) or "~/tensorflow_datasets").expanduser()


# ----------------------------------------------------------------------------- preparation


def _network_available(host: str, port: int, timeout: float = 3.0) -> bool:
    """True if a TCP connection to host:port opens within ``timeout`` seconds.

    Runs in a daemon thread because DNS resolution ignores socket timeouts and could block.
    """
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    return Path(builder.data_dir, "dataset_info.json").exists()


def _offline_prepare(builder: tfds.core.DatasetBuilder, manual_dir: Path | None = None) -> None:
    # Scratch download/extract dirs: nothing is fetched, and the extracted copies are not kept.
    with tempfile.TemporaryDirectory(prefix="tengrad_tfds_") as tmp:
        cfg = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False,
                                           extract_dir=Path(tmp, "extracted"))
        builder.download_and_prepare(download_dir=tmp, download_config=cfg)


def _unavailable(name: str, data_dir: Path, host: tuple[str, int]) -> DataUnavailableError:
    how = {
        "fashion_mnist": f"`apt-get install -y dataset-fashion-mnist` (or set "
                         f"{ENV_FASHION_MNIST_DEBIAN_DIR} to a folder with the four idx .gz files)",
        "cifar10": f"set {ENV_CIFAR_NPZ_DIR} (or npz_dir=) to a folder holding cifar10.npz",
        "cifar100": f"set {ENV_CIFAR_NPZ_DIR} (or npz_dir=) to a folder holding cifar100_small.npz "
                    "(a 10000/2000-image subset)",
    }.get(name, "no offline source exists for this dataset")
    return DataUnavailableError(
        f"{name} is not prepared in {data_dir} and {host[0]}:{host[1]} is unreachable, so TFDS "
        f"cannot download it. To get the data: {how}; or run once with network access; or set "
        f"{ENV_DATA_DIR} to a TFDS data dir where it is already prepared.")


def prepare(name: str, data_dir: str | os.PathLike | None = None, *,
            npz_dir: str | os.PathLike | None = None,
            debian_dir: str | os.PathLike | None = None) -> tfds.core.DatasetBuilder:
    """Make sure ``name`` is prepared in ``data_dir`` and return the builder that reads it.

    Order: already prepared (the only step on later runs) > offline source (Debian files for
    Fashion-MNIST, npz for CIFAR) > TFDS download if the host answers > ``DataUnavailableError``.
    For ``cifar100`` the builder may be ``cifar100_small`` (check ``builder.name``) when only the
    npz subset is available.
    """
    spec = info(name)
    data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
    builder = tfds.builder(name, data_dir=os.fspath(data_dir))
    if _is_prepared(builder):
        return builder

    if name == "fashion_mnist":
        manual = data_dir / "manual" / "fashion_mnist"
        if not all((manual / f).is_file() for f in offline.FASHION_MNIST_FILES):
            if (deb := offline.debian_fashion_mnist_dir(debian_dir)) is not None:
                offline.restore_fashion_mnist_gzip(deb, manual)
        if all((manual / f).is_file() for f in offline.FASHION_MNIST_FILES):
            # The stock DownloadManager takes a file named like the registered download from
            # manual_dir, checks its sha256 and skips the download: the stock builder, offline.
            _offline_prepare(builder, manual)
            return builder

    if name in offline.NPZ_BUILDERS:
        cls, fname = offline.NPZ_BUILDERS[name]
        npz_builder = cls(data_dir=os.fspath(data_dir))
        npz = Path(npz_dir or os.environ.get(ENV_CIFAR_NPZ_DIR) or "/nonexistent") / fname
        if not _is_prepared(npz_builder) and npz.is_file():
            npz_builder.npz_path = npz
            _offline_prepare(npz_builder)
        if _is_prepared(npz_builder):
            if npz_builder.name != name:
                log.warning("%s: using the prepared subset %s (%d train examples)", name,
                            npz_builder.name, npz_builder.info.splits["train"].num_examples)
            # Re-open from disk, as every later run will: label names etc. come from the files.
            if npz_builder.name == name:
                return tfds.builder(name, data_dir=os.fspath(data_dir))
            return tfds.builder_from_directory(os.fspath(npz_builder.data_dir))

    # Probe first: offline, TFDS's download retries would otherwise stall for minutes.
    if not _network_available(*spec.download_host):
        raise _unavailable(name, data_dir, spec.download_host)
    builder.download_and_prepare()
    return builder


def num_examples(name: str, split: str, data_dir: str | os.PathLike | None = None, *,
                 npz_dir: str | os.PathLike | None = None,
                 debian_dir: str | os.PathLike | None = None) -> int:
    """Number of examples in ``split`` (TFDS slicing such as ``'train[:10%]'`` allowed).

    Prepares the data if needed; counts what is actually on disk (e.g. 10000 for the
    ``cifar100_small`` train split).
    """
    builder = prepare(name, data_dir, npz_dir=npz_dir, debian_dir=debian_dir)
    return int(builder.info.splits[split].num_examples)


# ----------------------------------------------------------------------------- pipelines


def _augment(image: tf.Tensor, label: tf.Tensor, seeds: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    # Zero padding on uint8 pixels then crop back, as in the standard CIFAR recipe.
    shape = tf.shape(image)
    padded = tf.pad(image, [[4, 4], [4, 4], [0, 0]])
    image = tf.image.stateless_random_crop(padded, shape, seed=seeds[:2])
    image = tf.image.stateless_random_flip_left_right(image, seed=seeds[2:])
    return image, label


def load(name: str, split: str, batch_size: int, *,
         data_dir: str | os.PathLike | None = None,
         shuffle: bool | None = None,
         augment: bool | None = None,
         drop_remainder: bool = False,
         seed: int | None = None,
         cache: bool = True,
         shuffle_buffer: int | None = None,
         npz_dir: str | os.PathLike | None = None,
         debian_dir: str | os.PathLike | None = None) -> tf.data.Dataset:
    """Batched ``(image float32 [B,H,W,C] normalised, label int64 [B])`` pipeline, prefetched.

    Args:
      name: ``fashion_mnist``, ``mnist``, ``cifar10`` or ``cifar100``.
      split: a TFDS split, e.g. ``'train'``, ``'test'``, ``'train[:90%]'``.
      batch_size: examples per batch.
      data_dir: TFDS data dir; default ``$TENGRAD_DATA_DIR`` or ``~/tensorflow_datasets``.
      shuffle: shuffle files and examples (reshuffled every epoch); default: train splits only.
      augment: CIFAR padded random crop + flip; default: train splits of CIFAR only.
      drop_remainder: drop the last partial batch.
      seed: makes shuffling and augmentation reproducible.
      cache: keep the decoded uint8 images in memory after the first epoch (all four datasets
        fit easily; avoids re-decoding PNGs every epoch).
      shuffle_buffer: default is the whole split, i.e. a uniform shuffle.
      npz_dir, debian_dir: offline sources, overriding the environment variables.
    """
    spec = info(name)
    is_train = split.startswith("train")
    shuffle = is_train if shuffle is None else shuffle
    augment = (is_train and spec.augment_train) if augment is None else augment
    builder = prepare(name, data_dir, npz_dir=npz_dir, debian_dir=debian_dir)

    read_config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=False)
    ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=shuffle,
                            read_config=read_config)
    if cache:
        ds = ds.cache()
    if shuffle:
        n = int(ds.cardinality())
        ds = ds.shuffle(shuffle_buffer or (n if n > 0 else 10_000), seed=seed,
                        reshuffle_each_iteration=True)
    if augment:
        # Stateless ops fed by a seeded stream that changes every epoch: reproducible with
        # ``seed`` yet different crops each epoch (stateful op seeds would repeat per epoch).
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(4)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda xy, s: _augment(xy[0], xy[1], s), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=tf.data.AUTOTUNE)

    mean = tf.constant(spec.mean, tf.float32)
    std = tf.constant(spec.std, tf.float32)

    def normalize(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return (tf.cast(x, tf.float32) / 255.0 - mean) / std, tf.cast(y, tf.int64)

    ds = ds.map(normalize, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def synthetic_text(n: int, *, vocab_size: int = 2000, length: int = 40, classes: int = 4,
                   keywords: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A learnable sequence-classification task for text models (Embedding, Conv1D, attention).

    Each class owns `keywords` token ids (ids 1 … classes·keywords; 0 is left free for padding).
    A sequence is `length` filler tokens drawn from the rest of the vocabulary, with 2–5
    keywords of its class and fewer keywords of other classes written at random positions; its
    label is the class with the most keywords, so a model must find and count them. Returns
    (tokens int32 (n, length), labels int64 (n,)), the same for the same seed.
    """
    if classes * keywords + 1 >= vocab_size:
        raise ValueError(f"vocab_size={vocab_size} leaves no filler tokens beside "
                         f"{classes}×{keywords} keywords")
    rng = np.random.default_rng(seed)
    tokens = rng.integers(classes * keywords + 1, vocab_size, size=(n, length))
    labels = rng.integers(0, classes, size=n)
    for i in range(n):
        own = rng.integers(2, 6)
        others = rng.integers(0, own)  # strictly fewer than the label's own keywords
        kinds = [labels[i]] * own + list(rng.choice(
            [c for c in range(classes) if c != labels[i]], size=others))
        where = rng.choice(length, size=len(kinds), replace=False)
        tokens[i, where] = [1 + c * keywords + rng.integers(keywords) for c in kinds]
    return tokens.astype(np.int32), labels.astype(np.int64)
