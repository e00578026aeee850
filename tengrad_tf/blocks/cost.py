"""The cost model of a Fisher block: what to cache between updates, and which Gram route is cheaper.

Pure functions of the layer's helper (its structure and dimensions) and P, the patch rows per sample
(None when dynamic). The flop counts are those of docs/DESIGN.md:
  * cache: the explicit per-sample gradient J (D_in·D_out per sample) or the factors (Â, G),
    P(D_in + D_out), by what the steps between updates cost (`cache_kind`); for lookup tables the
    token ids and G, P(D + 1), against V·D; layers with explicit uᵢ (and grouped convolutions)
    cache J; small blocks their inverse.
  * route: F costs m²P²(D_in + D_out), E costs mPD_inD_out + m²D_inD_out, so F is cheaper below a
    threshold on the batch size m.
"""

from __future__ import annotations

import enum
import math

from tengrad_tf.layers import Structure


class CacheKind(str, enum.Enum):
    FACTORS = "factors"  # Â (m, P, D_in) and G (m, P, D_out)
    PER_SAMPLE = "per-sample gradients"  # J (m, *matrix): (m, D_in, D_out) for Kronecker layers
    TOKENS = "token ids and output gradients"  # (m, P) ids and G (m, P, D): lookup tables
    INVERSE = "the explicit inverse (F + λI)⁻¹"  # (d, d): small blocks only


def is_kronecker(helper) -> bool:
    """One Kronecker structure (Dense, EinsumDense, convolutions): routes F and E both exist."""
    return helper.structure is Structure.KRONECKER and helper.groups == 1


# Every step between curvature updates projects on the cache twice (Uᵀv, U s). From factors that
# is m·P·D_in·D_out multiply-adds each, from J a pass over its m·D_in·D_out elements. On this
# project's 2-core CPU, one element read cost as much as 8 to 16 multiply-adds (m = 128; D_in·D_out
# from 8k to 56k; docs/DESIGN.md, "Routes and cache"), so J is the cheaper cache from P = 12
# positions on, even where it is the larger one.
J_POSITIONS = 12
# ...but J may then hold at most this many times the memory of the factors it replaces: a wide
# Dense layer on short sequences keeps its factors.
J_MEMORY_RATIO = 8


# Under adaptive damping a new λ rebuilds a small block's explicit inverse from its J (m·d² products
# through the Gram), where a factored cache refactorizes its m × m Gram (m³/3). On MobileNetV2 (105
# blocks, m = 128) every change of λ took 158 ms with the inverse kept up to d = 1,024, 96 ms with
# this bound and 38 ms with none kept (benchmarks/refactor_cost.py). So under adaptive damping the
# inverse is kept only for d ≤ this times m: about where its one d × d product per step stops
# beating the factored Uᵀv, solve and U s (measured crossovers: d ≈ 150 at m = 32, 550 at
# m = 128; docs/performance.md, "The explicit inverse under adaptive damping").
ADAPTIVE_INVERSE_RATIO = 4


def keeps_inverse(size: int, limit: int, rows: int | None, adaptive_damping: bool) -> bool:
    """Whether a block of `size` parameters caches its explicit inverse: d ≤ `limit`
    (blocks.base.DIRECT_MAX_DIM) and, under adaptive damping with a known number of Gram `rows`
    m, d ≤ ADAPTIVE_INVERSE_RATIO·m too."""
    if size > limit:
        return False
    return not (adaptive_damping and rows is not None and size > ADAPTIVE_INVERSE_RATIO * rows)


def cache_kind(helper, p: int | None, inverse: bool) -> CacheKind:
    """What to keep between curvature updates. `inverse`: the block may keep its explicit inverse
    (it is small, and nothing needs its per-sample gradients between updates). Kronecker layers
    keep J when it is the smaller cache, or when it makes the steps between updates cheaper
    (P ≥ J_POSITIONS) at no more than J_MEMORY_RATIO times the factors' memory."""
    if inverse:
        return CacheKind.INVERSE
    d = helper.size
    if helper.structure is Structure.TOKENS:
        return (CacheKind.TOKENS if p is None or p * (helper.d_out + 1) <= d
                else CacheKind.PER_SAMPLE)
    if not is_kronecker(helper):
        return CacheKind.PER_SAMPLE
    if p is None:
        return CacheKind.FACTORS
    factors = p * (helper.d_in + helper.d_out)
    if d < factors or (p >= J_POSITIONS and d <= J_MEMORY_RATIO * factors):
        return CacheKind.PER_SAMPLE
    return CacheKind.FACTORS


def factored_threshold(helper, p: int | None, cache: CacheKind) -> float:
    """Route F is cheaper than route E iff m < this threshold (inf: always; 0: never).

    If J must be cached anyway, E's first term is paid by both routes and drops out of the
    comparison. Layers that are not one Kronecker structure have route E only.
    """
    if not is_kronecker(helper):
        return 0.0
    if p is None or p == 1:
        return math.inf
    dd = helper.d_in * helper.d_out
    f_per_m2 = p * p * (helper.d_in + helper.d_out)
    e_per_m = 0 if cache is CacheKind.PER_SAMPLE else p * dd
    if f_per_m2 <= dd:
        return math.inf
    return e_per_m / (f_per_m2 - dd)


def route(d: int, cache: CacheKind, threshold: float) -> str:
    """How the curvature is computed, in words, for `summary()`."""
    if cache is CacheKind.INVERSE:
        return f"direct {d}×{d} solve when the batch has at least {d} samples, else Woodbury"
    if cache is CacheKind.TOKENS:
        return "Gram from token matches"
    if threshold == math.inf:
        return "Gram route F"
    if threshold < 1:
        return "Gram route E"
    return f"Gram route F for batch < {threshold:.0f}, else E"


def chunk(memory_budget: int, intermediate: int, held: int = 0, item_bytes: int = 4
          ) -> int | None:
    """Samples per chunk so that one chunk's intermediate stays within the memory budget, for an
    intermediate of `intermediate` elements per sample (`item_bytes` each); None (one piece) where
    that is at most twice `held`, the elements per sample of the tensors it is computed from and
    into, which the step holds whole anyway: a Dense layer's rows are its input and a bias column.
    Chunks would cut that peak by less than 3×, and each chunk loop is a while loop that the first
    step traces and grappler optimizes (17% of a small Transformer's first step, 11 blocks)."""
    if intermediate <= 2 * held:
        return None
    return max(1, memory_budget // max(1, item_bytes * intermediate))


def elements_per_sample(shape) -> int:
    """Elements of one sample of a tensor of `shape`; 0 where a dimension is dynamic (then nothing
    counts as held by `chunk`)."""
    dims = shape[1:]
    return 0 if None in dims else math.prod(dims)


def check_repeated_gram(layer_name: str, rows: int | None, repeats: int, memory_budget: int
                        ) -> None:
    """fisher="exact" repeats each sample's rows once per class (`repeats`), which multiplies the
    Gram's rows, its memory by repeats². Refuse, before any of it is traced, a block whose float64
    Gram of `rows` rows (its cache's capacity; None: dynamic, not checked) alone exceeds the
    memory budget."""
    if repeats == 1 or rows is None or rows * rows * 8 <= memory_budget:
        return
    raise ValueError(
        f"fisher='exact', layer '{layer_name}': {repeats} rows per sample (the loss's classes) "
        f"make a {rows} × {rows} Gram, {rows * rows * 8 / 2**20:.0f} MiB in float64, more than "
        f"memory_budget={memory_budget} bytes. Use fisher='true' (one sampled label per sample), "
        "a smaller batch, or a larger memory_budget.")
