"""Curvature blocks behind one protocol (protocol.py): TENGraD's exact `FisherBlock` for every layer
kind, K-FAC's `KroneckerBlock`, and the network's one solve of TENGraD's blocks together.

What a layer is (which kinds exist, their rows and gradient layout) is in `tengrad_tf.layers`. The
Fisher block (base.py) chooses what to cache and which Gram route to take (cost.py), forms them
(gram.py) with the pure functions of per_sample.py (Kronecker-structured and explicit per-sample
gradients) and tokens.py (lookup tables), and keeps them in its cache (cache.py). network.py
solves all blocks' Fisher at once; kronecker.py is K-FAC's block. Layers without a block are
first-order and the optimizer's summary says why.
"""

from __future__ import annotations

from tengrad_tf.blocks.base import FisherBlock
from tengrad_tf.blocks.cache import XlaCacheError
from tengrad_tf.blocks.cost import CacheKind
from tengrad_tf.blocks.protocol import CurvatureBlock

__all__ = ["CacheKind", "CurvatureBlock", "FisherBlock", "XlaCacheError"]
