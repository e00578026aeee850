"""Tests for tengrad_tf.offline: the byte-exact restore of Debian's Fashion-MNIST gzip headers.

The restore of the real Debian files, and preparing from them and from CIFAR npz arrays, are tested
through data.prepare in test_data.py.
"""

from __future__ import annotations

import gzip

import numpy as np

from tengrad_tf import offline


def test_gzip_header_restore_synthetic():
    # Same deflate stream; one header as upstream wrote it, one as Debian rewrote it.
    payload = np.arange(5000, dtype=np.uint8).tobytes()
    upstream = gzip.compress(payload, compresslevel=6, mtime=1504176606)
    upstream = upstream[:3] + b"\x08" + upstream[4:10] + b"train-labels-idx1-ubyte\0" + upstream[10:]
    debian = upstream[:3] + b"\x00" + b"\xed\x0a\xda\x5e" + upstream[8:10] + upstream[34:]
    restored = offline._restore_gzip_header(debian, "train-labels-idx1-ubyte.gz")
    assert restored == upstream
    assert gzip.decompress(restored) == payload
    assert offline._restore_gzip_header(upstream, "train-labels-idx1-ubyte.gz") == upstream
