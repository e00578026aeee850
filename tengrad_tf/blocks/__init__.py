"""Exact Fisher blocks, one class per layer kind, behind the interface of `FisherBlock`.

`block_class_for(layer)` is the registry the capture and the optimizer share: it says which block
class (if any) handles a layer. Layers of other kinds are first-order (d = g) and the optimizer's
summary says so.
"""

from __future__ import annotations

from tengrad_tf.blocks.base import CacheKind, FisherBlock, XlaCacheError
from tengrad_tf.blocks.conv import ConvBlock
from tengrad_tf.blocks.dense import DenseBlock

BLOCK_CLASSES: tuple[type[FisherBlock], ...] = (DenseBlock, ConvBlock)


def block_class_for(layer) -> type[FisherBlock] | None:
    for cls in BLOCK_CLASSES:
        if isinstance(layer, cls.layer_classes):
            return cls
    return None


__all__ = ["BLOCK_CLASSES", "CacheKind", "ConvBlock", "DenseBlock", "FisherBlock", "XlaCacheError", "block_class_for"]
