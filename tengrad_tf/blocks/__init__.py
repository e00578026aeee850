"""TENGraD's exact Fisher blocks: one generic `FisherBlock` for every layer kind.

What a layer is (which kinds exist, their rows and gradient layout) is in `tengrad_tf.layers`; the
block decides what to cache and forms the Gram, Uᵀv and U s with the pure functions of
per_sample.py (Kronecker-structured and explicit per-sample gradients) and tokens.py (lookup
tables). Layers without a block are first-order (d = g) and the optimizer's summary says why.
"""

from __future__ import annotations

from tengrad_tf.blocks.base import CacheKind, FisherBlock, XlaCacheError

__all__ = ["CacheKind", "FisherBlock", "XlaCacheError"]
