"""Products of several factors, associated in the cheapest order.

Circuits are chains like ``W_E @ W_V @ W_O @ W_U`` whose factors have very different sizes
and batch axes (``W_E`` is shared, ``W_V`` is per head). The order of the multiplications
decides whether the product costs seconds or hours; these functions pick it by dynamic
programming on the shapes, counting the batch size of every partial product.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank._util import HIGHEST

Array = jax.Array
Order = Any  # an int (one factor) or a pair of Orders

__all__ = ["chain_matmul", "chain_order", "cyclic_core"]


def _check_chain(factors: Sequence[Any], fn: str) -> None:
    if not factors:
        raise ValueError(f"{fn}: needs at least one factor")
    for i, x in enumerate(factors):
        if x.ndim < 2:
            raise ValueError(f"{fn}: factor {i} must be a matrix [..., n, k], got {x.shape}")
    for i, (x, y) in enumerate(zip(factors[:-1], factors[1:], strict=True)):
        if x.shape[-1] != y.shape[-2]:
            raise ValueError(
                f"{fn}: factors {i} and {i + 1} do not chain: shapes {tuple(x.shape)} and "
                f"{tuple(y.shape)} (need x.shape[-1] == y.shape[-2])"
            )


def chain_order(shapes: Sequence[tuple[int, ...]]) -> tuple[Order, int]:
    """Cheapest association of a matrix chain and its multiply-add count.

    Args:
        shapes: the factors' shapes ``[..., n_i, n_{i+1}]``; leading axes broadcast.

    Returns:
        ``(order, cost)``: ``order`` is a factor index or a pair ``(left, right)`` of orders.
    """
    n = len(shapes)
    dims = [s[-2] for s in shapes] + [shapes[-1][-1]]

    @functools.cache
    def batch(i: int, j: int) -> int:
        return math.prod(np.broadcast_shapes(*(s[:-2] for s in shapes[i : j + 1])))

    @functools.cache
    def best(i: int, j: int) -> tuple[Order, int]:
        if i == j:
            return i, 0
        options = []
        for k in range(i, j):
            (left, c1), (right, c2) = best(i, k), best(k + 1, j)
            step = batch(i, j) * dims[i] * dims[k + 1] * dims[j + 1]
            options.append(((left, right), c1 + c2 + step))
        return min(options, key=lambda option: option[1])

    return best(0, n - 1)


def chain_matmul(*factors: Array, precision: Any = HIGHEST) -> Array:
    """``factors[0] @ factors[1] @ ...`` in the cheapest order (leading axes broadcast)."""
    _check_chain(factors, "chain_matmul")
    order, _ = chain_order([tuple(x.shape) for x in factors])

    def evaluate(o: Order) -> Array:
        if isinstance(o, int):
            return factors[o]
        return jnp.matmul(evaluate(o[0]), evaluate(o[1]), precision=precision)

    return evaluate(order)


def cyclic_core(*factors: Array, precision: Any = HIGHEST) -> Array:
    """The smallest square matrix with the nonzero spectrum of ``factors[0] @ ... @ factors[-1]``.

    For a square product, ``X1 X2 ... Xn`` and its cyclic rotations ``Xk ... Xn X1 ... Xk-1``
    share their nonzero eigenvalues (and trace). The rotation starting at the narrowest
    boundary is the smallest; it is multiplied out in the cheapest order.
    """
    _check_chain(factors, "cyclic_core")
    if factors[0].shape[-2] != factors[-1].shape[-1]:
        raise ValueError(
            "cyclic_core: the product must be square, got a chain from "
            f"{factors[0].shape[-2]} rows to {factors[-1].shape[-1]} columns"
        )
    boundaries = [x.shape[-2] for x in factors]  # boundary k sits before factor k
    start = int(np.argmin(boundaries))
    rotated = factors[start:] + factors[:start]
    return chain_matmul(*rotated, precision=precision)
