"""Tests for tengrad_tf.data: real offline sources where present, TFDS mocks for downloads.

Which source each test used (real Debian/npz files or TFDS mock data) is printed, stored as a
``data_source`` user property (junit xml) and summarised at the end of the module's run.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tengrad_tf import data

# Upstream sha256 of the Fashion-MNIST downloads (as registered in TFDS's fashion_mnist.txt).
UPSTREAM_SHA256 = {
    "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}
DEBIAN_DIR = Path(os.environ.get(data.ENV_FASHION_MNIST_DEBIAN_DIR) or data.DEBIAN_FASHION_MNIST_DIR)
HAVE_DEBIAN = all((DEBIAN_DIR / f).is_file() for f in UPSTREAM_SHA256)
NO_DEBIAN_REASON = (f"Fashion-MNIST Debian files not found in {DEBIAN_DIR}: "
                    "`apt-get install -y dataset-fashion-mnist` to run the real offline path")


def _cifar_npz_dir() -> Path:
    # Tests only: fall back to the shared folder beside the repo; the package never looks there.
    env = os.environ.get(data.ENV_CIFAR_NPZ_DIR)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


NPZ_DIR = _cifar_npz_dir()

_SOURCES: list[str] = []


def _record(request, msg: str) -> None:
    print(f"[data source] {msg}")
    request.node.user_properties.append(("data_source", msg))
    _SOURCES.append(f"{request.node.name}: {msg}")


@pytest.fixture(scope="module", autouse=True)
def _summarise_sources(request):
    yield
    plugins = request.config.pluginmanager
    reporter, capman = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")
    if reporter and capman and _SOURCES:
        with capman.global_and_fixture_disabled():  # teardown output is captured otherwise
            reporter.write_line("")
            for line in _SOURCES:
                reporter.write_line(f"[data source] {line}")


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch):
    # No test may fall back on the developer's ~/tensorflow_datasets or a real download.
    monkeypatch.delenv(data.ENV_DATA_DIR, raising=False)
    monkeypatch.setenv("HOME", "/nonexistent-home-for-tests")


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory):
    """A data dir with Fashion-MNIST prepared once from the Debian files (timed)."""
    if not HAVE_DEBIAN:
        pytest.skip(NO_DEBIAN_REASON)
    d = tmp_path_factory.mktemp("tfds_fmnist")
    t0 = time.perf_counter()
    with mock.patch.object(data, "_network_available", side_effect=AssertionError("no network")):
        builder = data.prepare("fashion_mnist", d, debian_dir=DEBIAN_DIR)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    with mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare",
                           side_effect=AssertionError("must reuse the prepared data")):
        again = data.prepare("fashion_mnist", d, debian_dir="/nonexistent")
    reuse = time.perf_counter() - t0
    print(f"fashion_mnist first preparation {first:.2f}s, reuse {reuse:.4f}s")
    assert again.info.full_name == builder.info.full_name
    return d, first, reuse


def _npz_or_skip(fname: str) -> Path:
    if not (NPZ_DIR / fname).is_file():
        pytest.skip(f"{fname} not found in {NPZ_DIR} (set {data.ENV_CIFAR_NPZ_DIR}); "
                    "real CIFAR npz path not tested")
    return NPZ_DIR


def _scan(ds) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
    """One pass: label counts and per-channel pixel mean/std of a batched (x, y) dataset."""
    s = s2 = n = 0
    labels = []
    shape = None
    for x, y in ds:
        assert x.dtype == tf.float32 and y.dtype == tf.int64
        shape = tuple(x.shape[1:])
        x = x.numpy().astype(np.float64)
        s, s2, n = s + x.sum((0, 1, 2)), s2 + (x * x).sum((0, 1, 2)), n + x[..., 0].size
        labels.append(y.numpy())
    mean = s / n
    return np.bincount(np.concatenate(labels)), mean, np.sqrt(s2 / n - mean**2), shape


# ----------------------------------------------------------------------------- no data needed


def test_info_and_default_data_dir(monkeypatch):
    assert data.info("cifar100").num_classes == 100
    assert data.info("fashion_mnist").input_shape == (28, 28, 1)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.info("imagenet")
    monkeypatch.setenv(data.ENV_DATA_DIR, "/some/where")
    assert data.default_data_dir() == Path("/some/where")
    monkeypatch.delenv(data.ENV_DATA_DIR)
    assert data.default_data_dir() == Path("/nonexistent-home-for-tests/tensorflow_datasets")


def test_network_probe_never_hangs():
    t0 = time.perf_counter()
    assert data._network_available("192.0.2.1", 443, timeout=0.5) is False  # TEST-NET-1
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist", "cifar10", "cifar100"])
def test_offline_without_data_raises_fast(name, tmp_path, monkeypatch, request):
    monkeypatch.setenv(data.ENV_FASHION_MNIST_DEBIAN_DIR, str(tmp_path / "no-debian"))
    monkeypatch.delenv(data.ENV_CIFAR_NPZ_DIR, raising=False)
    monkeypatch.setattr(data, "_network_available", lambda *a, **k: False)
    _record(request, "none (empty data dir, network blocked)")
    t0 = time.perf_counter()
    with mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare",
                           side_effect=AssertionError("no download may be attempted")):
        with pytest.raises(data.DataUnavailableError) as err:
            data.load(name, "train", 8, data_dir=tmp_path / "tfds")
    assert time.perf_counter() - t0 < 10.0
    msg = str(err.value)
    assert "unreachable" in msg and data.ENV_DATA_DIR in msg and "network" in msg
    hint = {"fashion_mnist": "apt-get install -y dataset-fashion-mnist",
            "cifar10": data.ENV_CIFAR_NPZ_DIR, "cifar100": data.ENV_CIFAR_NPZ_DIR}.get(name, "")
    assert hint in msg


# ----------------------------------------------------------------------------- download path (mock)


def test_download_path_with_mock_data(tmp_path, monkeypatch, request):
    monkeypatch.setenv(data.ENV_FASHION_MNIST_DEBIAN_DIR, str(tmp_path / "no-debian"))
    monkeypatch.delenv(data.ENV_CIFAR_NPZ_DIR, raising=False)
    monkeypatch.setattr(data, "_network_available", lambda *a, **k: True)
    _record(request, "tfds.testing.mock_data (random examples; download mocked)")
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        real_dl = tfds.core.DatasetBuilder.download_and_prepare  # the mock's no-op
        with mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare",
                               autospec=True, side_effect=real_dl) as dl:
            for name in ("mnist", "fashion_mnist", "cifar10", "cifar100"):
                spec = data.info(name)
                batches = list(data.load(name, "train", 16, data_dir=tmp_path, seed=0))
                assert [int(x.shape[0]) for x, _ in batches] == [16, 16, 8]
                for x, y in batches:
                    assert tuple(x.shape[1:]) == spec.input_shape and x.dtype == tf.float32
                    assert y.dtype == tf.int64
                    assert 0 <= int(tf.reduce_min(y)) and int(tf.reduce_max(y)) < spec.num_classes
                drop = list(data.load(name, "test", 16, data_dir=tmp_path, drop_remainder=True))
                assert len(drop) == 2
        assert dl.call_count == 8  # every load went through TFDS's download step


def test_augmentation_seeded_and_varies_per_epoch(tmp_path, monkeypatch, request):
    monkeypatch.delenv(data.ENV_CIFAR_NPZ_DIR, raising=False)
    monkeypatch.setattr(data, "_network_available", lambda *a, **k: True)
    _record(request, "tfds.testing.mock_data")
    with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):
        plain = next(iter(data.load("cifar10", "train", 32, data_dir=tmp_path, shuffle=False,
                                    augment=False)))[0].numpy()
        ds = data.load("cifar10", "train", 32, data_dir=tmp_path, shuffle=False, seed=3)
        epoch1, epoch2 = (next(iter(ds))[0].numpy() for _ in range(2))
        again = next(iter(data.load("cifar10", "train", 32, data_dir=tmp_path, shuffle=False,
                                    seed=3)))[0].numpy()
    np.testing.assert_array_equal(epoch1, again)  # reproducible with a seed
    assert not np.array_equal(epoch1, epoch2)  # fresh crops/flips every epoch
    assert not np.array_equal(epoch1, plain)  # on by default for the CIFAR train split


# ----------------------------------------------------------------------------- Fashion-MNIST (real)


@pytest.mark.skipif(not HAVE_DEBIAN, reason=NO_DEBIAN_REASON)
def test_restored_debian_files_match_upstream_sha256(tmp_path, request):
    _record(request, f"real Debian files in {DEBIAN_DIR}")
    registered = {i.filename: i.checksum
                  for i in tfds.builder_cls("fashion_mnist").url_infos.values()}
    assert registered == UPSTREAM_SHA256
    assert hashlib.sha256((DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes()).hexdigest() \
        != UPSTREAM_SHA256["t10k-labels-idx1-ubyte.gz"]  # why the restore is needed at all
    paths = data.restore_fashion_mnist_gzip(DEBIAN_DIR, tmp_path)
    for p in paths:
        raw = p.read_bytes()
        assert hashlib.sha256(raw).hexdigest() == UPSTREAM_SHA256[p.name]
        assert raw[3] == 0x08 and raw[10:10 + len(p.stem) + 1] == p.stem.encode() + b"\0"
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    assert gzip.decompress(labels.read_bytes()) == gzip.decompress(
        (DEBIAN_DIR / labels.name).read_bytes())


def test_fashion_mnist_offline_real(fmnist_dir, request):
    d, first, reuse = fmnist_dir
    _record(request, f"real Debian files in {DEBIAN_DIR} -> stock TFDS fashion_mnist "
                     f"(prepared in {first:.1f}s, reuse {reuse * 1e3:.1f}ms)")
    assert data.num_examples("fashion_mnist", "train", d) == 60000
    assert data.num_examples("fashion_mnist", "test", d) == 10000
    assert data.num_examples("fashion_mnist", "train[:10%]", d) == 6000
    counts, mean, std, shape = _scan(
        data.load("fashion_mnist", "train", 10000, data_dir=d, shuffle=False, cache=False))
    assert shape == (28, 28, 1)
    assert counts.tolist() == [6000] * 10
    assert abs(mean[0]) < 0.01 and abs(std[0] - 1.0) < 0.01, (mean, std)
    counts, *_ = _scan(data.load("fashion_mnist", "test", 5000, data_dir=d))
    assert counts.tolist() == [1000] * 10
    # The stock TFDS path reads the same prepared data.
    ds = tfds.load("fashion_mnist", split="test", data_dir=os.fspath(d), as_supervised=True)
    assert ds.cardinality().numpy() == 10000


def test_fashion_mnist_train_batches_shuffled(fmnist_dir, request):
    d, *_ = fmnist_dir
    _record(request, "real Debian files (prepared data reused)")
    ds = data.load("fashion_mnist", "train[:2000]", 500, data_dir=d, seed=0)
    (x, y), = ds.take(1)
    assert x.shape == (500, 28, 28, 1) and y.shape == (500,)
    assert len(np.unique(y.numpy())) == 10  # shuffled, not the file order's first 500


# ----------------------------------------------------------------------------- CIFAR npz (real)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds_cifar")


def test_cifar10_from_npz_real(cifar_dir, request):
    npz = _npz_or_skip("cifar10.npz")
    _record(request, f"real {npz / 'cifar10.npz'}")
    t0 = time.perf_counter()
    builder = data.prepare("cifar10", cifar_dir, npz_dir=npz)
    print(f"cifar10 preparation from npz {time.perf_counter() - t0:.2f}s")
    assert builder.name == "cifar10"
    assert data.num_examples("cifar10", "train", cifar_dir) == 50000  # reused, no npz needed
    assert data.num_examples("cifar10", "test", cifar_dir) == 10000
    counts, mean, std, shape = _scan(
        data.load("cifar10", "train", 10000, data_dir=cifar_dir, shuffle=False, augment=False,
                  cache=False))
    assert shape == (32, 32, 3) and counts.tolist() == [5000] * 10
    np.testing.assert_allclose(mean, 0.0, atol=0.01)
    np.testing.assert_allclose(std, 1.0, atol=0.01)
    # Stock features, stock name: plain tfds.load finds it.
    ex = next(iter(tfds.load("cifar10", split="test", data_dir=os.fspath(cifar_dir))))
    assert set(ex) == {"id", "image", "label"}
    assert tfds.builder("cifar10", data_dir=os.fspath(cifar_dir)).info.features[
        "label"].names[0] == "airplane"


def test_cifar100_subset_from_npz_is_labelled_honestly(cifar_dir, request):
    npz = _npz_or_skip("cifar100_small.npz")
    _record(request, f"real {npz / 'cifar100_small.npz'} (subset)")
    builder = data.prepare("cifar100", cifar_dir, npz_dir=npz)
    assert builder.name == "cifar100_small" and "SUBSET" in builder.info.description
    assert set(builder.info.features) == {"id", "image", "label", "coarse_label"}
    assert data.num_examples("cifar100", "train", cifar_dir) == 10000
    assert data.num_examples("cifar100", "test", cifar_dir) == 2000
    counts, _, _, shape = _scan(data.load("cifar100", "test", 1000, data_dir=cifar_dir))
    assert shape == (32, 32, 3) and counts.tolist() == [20] * 100
    (x, y), = data.load("cifar100", "train", 64, data_dir=cifar_dir, seed=1).take(1)
    assert x.shape == (64, 32, 32, 3) and int(tf.reduce_max(y)) < 100
