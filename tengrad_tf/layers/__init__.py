"""Layer helpers: what each kind of Keras layer is, in one place (see base.py).

`helper_class_for(layer)` is the registry that capture, TENGraD's blocks and K-FAC share. A layer
of a kind without a helper, or whose helper gives a reason, takes a first-order step (d = g), and
`first_order_reason` says why, naming the layer's class.
"""

from __future__ import annotations

from tengrad_tf.layers.base import (ExplicitHelper, Forward, KroneckerHelper, LayerHelper,
                                    Structure, TokensHelper, as_rows)
from tengrad_tf.layers.conv import (ConvHelper, ConvTransposeHelper, DepthwiseConvHelper,
                                    SeparableConvHelper, unfold)
from tengrad_tf.layers.dense import DenseHelper, EinsumDenseHelper
from tengrad_tf.layers.embedding import EmbeddingHelper
from tengrad_tf.layers.normalization import (BatchNormalizationHelper, GroupNormalizationHelper,
                                             LayerNormalizationHelper, RMSNormalizationHelper)
from tengrad_tf.layers.recurrent import RecurrentHelper

HELPERS: tuple[type[LayerHelper], ...] = (
    DenseHelper, EinsumDenseHelper, EmbeddingHelper, ConvHelper, DepthwiseConvHelper,
    SeparableConvHelper, ConvTransposeHelper, LayerNormalizationHelper, RMSNormalizationHelper,
    GroupNormalizationHelper, BatchNormalizationHelper, RecurrentHelper,
)


def helper_class_for(layer) -> type[LayerHelper] | None:
    for cls in HELPERS:
        if isinstance(layer, cls.layer_classes):
            return cls
    return None


def helper_for(layer) -> LayerHelper | None:
    cls = helper_class_for(layer)
    return None if cls is None else cls(layer)


def call_owner(cls: type) -> type:
    """The class in `cls`'s MRO that defines the `call` its instances run."""
    return next(k for k in cls.__mro__ if "call" in k.__dict__)


def captured_classes() -> list[type]:
    """The classes whose `call` capture replaces: for each Keras class a helper handles, the one
    that defines its `call` (Conv2D and Conv3D share BaseConv's; Conv1D has its own)."""
    out = []
    for helper in HELPERS:
        if helper.captures:
            for cls in helper.layer_classes:
                owner = call_owner(cls)
                if owner not in out:
                    out.append(owner)
    return out


def first_order_reason(layer) -> str:
    """Why a layer that ran in the step has no block, when capture recorded no reason for it."""
    helper = helper_class_for(layer)
    if helper is None:
        return "no exact block for this kind of layer (README, 'Layers': the kinds with one)"
    if not helper.captures:
        return helper.unsupported_reason(layer)
    if call_owner(type(layer)) not in captured_classes():
        parent = next(k for k in type(layer).__mro__ if k in helper.layer_classes)
        return (f"it overrides {parent.__name__}.call, so its computation is not the one an "
                "exact block knows")
    if not layer.trainable:
        return "the layer is frozen"
    return "its call was not captured in this step"


__all__ = [
    "BatchNormalizationHelper", "ConvHelper", "ConvTransposeHelper", "DenseHelper",
    "DepthwiseConvHelper", "EinsumDenseHelper", "EmbeddingHelper", "ExplicitHelper", "Forward",
    "GroupNormalizationHelper", "HELPERS", "KroneckerHelper", "LayerHelper",
    "LayerNormalizationHelper", "RMSNormalizationHelper", "RecurrentHelper",
    "SeparableConvHelper", "Structure",
    "TokensHelper", "as_rows", "call_owner", "captured_classes", "first_order_reason",
    "helper_class_for", "helper_for", "unfold",
]
