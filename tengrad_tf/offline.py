"""The offline sources of data.py: Fashion-MNIST from Debian's package, CIFAR from .npz arrays.

* Fashion-MNIST from the Debian package ``dataset-fashion-mnist``. Debian rewrote the gzip headers
  of the four upstream files; ``restore_fashion_mnist_gzip`` restores them byte for byte and checks
  them against the checksums TFDS registers, so that the *stock* TFDS builder takes them as
  manually downloaded files and the prepared dataset is exactly the stock one.
* CIFAR-10/100 from ``.npz`` arrays: TFDS builders that generate the stock CIFAR features from the
  arrays instead of the binary tarball (``cifar10.npz``: the full set, under the stock name;
  ``cifar100_small.npz``: a subset, under the distinct name ``cifar100_small``).

What this module does not do: decide when a source is used (data.prepare), or fetch anything.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import cifar as _tfds_cifar

ENV_CIFAR_NPZ_DIR = "TENGRAD_CIFAR_NPZ_DIR"
ENV_FASHION_MNIST_DEBIAN_DIR = "TENGRAD_FASHION_MNIST_DEBIAN_DIR"
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# Upstream gzip MTIMEs of the Fashion-MNIST files (Debian reset them); train vs t10k files.
_FASHION_MNIST_MTIME = {"train": 1504176606, "t10k": 1504176627}
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


class DataUnavailableError(RuntimeError):
    """The dataset is not prepared, no offline source exists and the network is unreachable."""


# ----------------------------------------------------------------------------- Fashion-MNIST


def _registered_url_infos(name: str) -> dict[str, "tfds.core.download.checksums.UrlInfo"]:
    """TFDS's registered checksums for the stock builder, keyed by file name."""
    return {i.filename: i for i in (tfds.builder_cls(name).url_infos or {}).values()}


def _restore_gzip_header(raw: bytes, filename: str) -> bytes:
    """Put back the FNAME field and MTIME that Debian's repack dropped (RFC 1952 header)."""
    if raw[:3] != b"\x1f\x8b\x08":
        raise ValueError(f"{filename}: not a deflate gzip file")
    flg = raw[3]
    if flg & 0x08:  # already carries a name: leave untouched, the checksum decides
        return raw
    if flg & 0x1F:  # FTEXT/FHCRC/FEXTRA/FCOMMENT would move where FNAME goes; Debian sets none
        raise ValueError(f"{filename}: unexpected gzip flags {flg:#04x}")
    mtime = _FASHION_MNIST_MTIME[filename.split("-", 1)[0]]
    # XFL and OS (bytes 8-9) are kept: Debian left them as upstream had them (0, 3=Unix).
    name = filename[: -len(".gz")].encode("latin-1") + b"\0"
    return raw[:3] + bytes([flg | 0x08]) + struct.pack("<I", mtime) + raw[8:10] + name + raw[10:]


def restore_fashion_mnist_gzip(src_dir: str | os.PathLike,
                               dst_dir: str | os.PathLike) -> list[Path]:
    """Copy Debian's Fashion-MNIST ``.gz`` files to ``dst_dir`` with the upstream gzip header.

    Every written file is verified against the sha256 that TFDS registers for the upstream
    download; a mismatch raises ``DataUnavailableError`` and leaves no file behind.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    expected = _registered_url_infos("fashion_mnist")
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for fname in FASHION_MNIST_FILES:
        target, want = dst / fname, expected[fname].checksum
        if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == want:
            out.append(target)
            continue
        data = _restore_gzip_header((src / fname).read_bytes(), fname)
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            raise DataUnavailableError(
                f"{src / fname}: restored gzip has sha256 {got}, TFDS expects {want}; "
                "the Debian package no longer matches the upstream Fashion-MNIST files")
        tmp = target.with_suffix(".tmp")  # write-then-rename: never leave a half file
        tmp.write_bytes(data)
        tmp.replace(target)
        out.append(target)
    return out


def debian_fashion_mnist_dir(debian_dir: str | os.PathLike | None) -> Path | None:
    d = Path(debian_dir or os.environ.get(ENV_FASHION_MNIST_DEBIAN_DIR) or DEBIAN_FASHION_MNIST_DIR)
    return d if all((d / f).is_file() for f in FASHION_MNIST_FILES) else None


# ----------------------------------------------------------------------------- CIFAR from npz


class _NpzCifarMixin:
    """Generates the stock CIFAR features from ``.npz`` arrays instead of the binary tarball."""

    npz_path: Path  # set on the instance before download_and_prepare
    _NOTE = ""

    def _info(self) -> tfds.core.DatasetInfo:
        stock = super()._info()  # type: ignore[misc]
        return tfds.core.DatasetInfo(
            builder=self, description=stock.description + self._NOTE, features=stock.features,
            supervised_keys=stock.supervised_keys, homepage=stock.homepage,
            citation=stock.citation)

    def _split_generators(self, dl_manager):  # noqa: ARG002 - nothing to download
        arrays = dict(np.load(self.npz_path))
        self.info.features["label"].names = [str(s) for s in arrays["label_names"]]
        if "coarse_label" in self.info.features:
            names = arrays["coarse_label_names"]
            self.info.features["coarse_label"].names = [str(s) for s in names]
        return {tfds.Split.TRAIN: self._generate_examples("train_", arrays, "train"),
                tfds.Split.TEST: self._generate_examples("test_", arrays, "test")}

    def _generate_examples(self, prefix: str, arrays: dict, split: str) -> Iterator:
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        coarse = arrays.get(f"y_{split}_coarse") if "coarse_label" in self.info.features else None
        for i in range(len(x)):
            ex = {"id": f"{prefix}{i:05d}", "image": x[i], "label": int(y[i])}
            if coarse is not None:
                ex["coarse_label"] = int(coarse[i])
            yield i, ex


class _Cifar10Npz(_NpzCifarMixin, _tfds_cifar.Cifar10, skip_registration=True):
    # Same name and version as the stock builder: the npz holds the complete, unaltered set,
    # so ``tfds.load('cifar10', data_dir=...)`` must find it afterwards.
    name = "cifar10"
    _NOTE = ("\n\nGenerated offline from cifar10.npz (full set; file order shuffled, "
             "ids renumbered).")


class _Cifar100SmallNpz(_NpzCifarMixin, _tfds_cifar.Cifar100, skip_registration=True):
    # A distinct name and version: this is a subset, and must never pass for the stock cifar100.
    name = "cifar100_small"
    VERSION = tfds.core.Version("1.0.0")
    _NOTE = ("\n\nSUBSET generated offline from cifar100_small.npz: 100 train / 20 test images per "
             "fine class (10000 / 2000), not the full 50000 / 10000.")


NPZ_BUILDERS = {"cifar10": (_Cifar10Npz, "cifar10.npz"),
                 "cifar100": (_Cifar100SmallNpz, "cifar100_small.npz")}
