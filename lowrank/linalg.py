"""Linear algebra of factored (and dense) matrices, batched over leading axes.

Every function accepts a :class:`~lowrank.FactoredMatrix` or a dense array ``[..., l, r]``.
Factored inputs are never multiplied out: decompositions work on ``m x m`` cores built from
the factors. bfloat16/float16 inputs are computed in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from lowrank.factored import FactoredMatrix

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST
R = TypeVar("R")

__all__ = ["eig", "eigvals", "low_rank_approx", "norm", "svd", "svdvals", "trace"]


def _mm(x: Array, y: Array) -> Array:
    return jnp.matmul(x, y, precision=HIGHEST)


def _mT(x: Array) -> Array:
    return jnp.swapaxes(x, -1, -2)


def _compute_dtype(dtype: Any) -> Any:
    return jnp.float32 if dtype in (jnp.bfloat16, jnp.float16) else dtype


def _upcast(M: FactoredMatrix) -> FactoredMatrix:
    dtype = _compute_dtype(M.dtype)
    if dtype == M.dtype:
        return M
    return FactoredMatrix(M.A.astype(dtype), M.B.astype(dtype))


def _as_dense(x: Any, fn: str) -> Array:
    if isinstance(x, np.ndarray):
        x = jnp.asarray(x)
    if not isinstance(x, jax.Array):
        raise TypeError(f"{fn}: expected a FactoredMatrix or an array, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"{fn}: expected a matrix [..., l, r], got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{fn}: expected a real floating-point matrix, got dtype {x.dtype} "
            f"(shape {tuple(x.shape)})"
        )
    return x.astype(_compute_dtype(x.dtype))


def _dispatch(
    dense_impl: Callable[..., R],
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Route a ``FactoredMatrix`` to the decorated function and arrays to ``dense_impl``."""

    def decorate(factored_impl: Callable[..., R]) -> Callable[..., R]:
        @functools.wraps(factored_impl)
        def wrapper(M: Any, *args: Any, **kwargs: Any) -> R:
            if isinstance(M, FactoredMatrix):
                return factored_impl(_upcast(M), *args, **kwargs)
            return dense_impl(_as_dense(M, factored_impl.__name__), *args, **kwargs)

        return wrapper

    return decorate


def _require_square(shape: tuple[int, ...], fn: str) -> None:
    if shape[-1] != shape[-2]:
        raise ValueError(f"{fn} needs a square matrix (l == r), got shape {tuple(shape)}")


def _after(x: Array, *deps: Array) -> Array:
    """``x``, made data-dependent on ``deps`` so XLA cannot compute it before them.

    jaxlib's CPU LAPACK kernels split a batch over XLA's intra-op thread pool and block on it;
    two such calls running at once on a 2-core machine can deadlock (see DESIGN.md). Chaining
    each decomposition's input to the previous one's outputs makes them run one at a time.
    An ``optimization_barrier`` does not do this: it aliases buffers and adds no dependency.
    """
    tie = sum(jnp.reshape(d, (-1,))[0].astype(x.dtype) for d in deps)
    return x + 0 * tie


def _core_qr(M: FactoredMatrix, with_q: bool) -> tuple[Any, Any, Array]:
    """QR of ``A`` and ``B^T`` (one after the other) and the core ``Ra @ Rb^T``."""
    if with_q:
        Qa, Ra = jnp.linalg.qr(M.A)
        Qb, Rb = jnp.linalg.qr(_after(_mT(M.B), Qa, Ra))
        return Qa, Qb, _after(_mm(Ra, _mT(Rb)), Qb)
    Ra = jnp.linalg.qr(M.A, mode="r")
    Rb = jnp.linalg.qr(_after(_mT(M.B), Ra), mode="r")
    return None, None, _mm(Ra, _mT(Rb))


def _dense_svd(x: Array) -> tuple[Array, Array, Array]:
    return tuple(jnp.linalg.svd(x, full_matrices=False))  # type: ignore[return-value]


@_dispatch(_dense_svd)
def svd(M: FactoredMatrix) -> tuple[Array, Array, Array]:
    """Thin SVD ``A @ B == U @ diag(S) @ Vh``, computed from the factors.

    Returns:
        ``U: [..., l, k]``, ``S: [..., k]`` (descending), ``Vh: [..., k, r]`` with
        ``k = min(l, m, r)``. ``Vh`` holds the right singular vectors as rows; the
        TransformerLens-style ``V`` (columns) is ``FactoredMatrix.V``.
    """
    Qa, Qb, core = _core_qr(M, with_q=True)
    Uc, S, Vhc = jnp.linalg.svd(core, full_matrices=False)
    return _mm(Qa, Uc), S, _mm(Vhc, _mT(Qb))


def _dense_svdvals(x: Array) -> Array:
    return jnp.linalg.svd(x, compute_uv=False)


@_dispatch(_dense_svdvals)
def svdvals(M: FactoredMatrix) -> Array:
    """Singular values ``[..., min(l, m, r)]`` in descending order."""
    _, _, core = _core_qr(M, with_q=False)
    return jnp.linalg.svd(core, compute_uv=False)


def _dense_eigvals(x: Array) -> Array:
    _require_square(x.shape, "eigvals")
    return jnp.linalg.eigvals(x)


def _small_square(M: FactoredMatrix, fn: str) -> tuple[Array, bool]:
    """The smaller of ``B @ A`` (``m x m``) and ``A @ B`` (``l x l``), and which it is."""
    _require_square(M.shape, fn)
    if M.mdim <= M.ldim:
        return _mm(M.B, M.A), True
    return _mm(M.A, M.B), False


@_dispatch(_dense_eigvals)
def eigvals(M: FactoredMatrix) -> Array:
    """Eigenvalues of a square ``A @ B`` without forming it, unsorted, complex.

    They are the eigenvalues of ``B @ A`` (``m x m``): the nonzero spectrum of ``A @ B``
    plus zeros. When ``m > l`` the ``l x l`` product is used instead, so the result has
    ``min(l, m)`` entries.
    """
    small, _ = _small_square(M, "eigvals")
    return jnp.linalg.eigvals(small)


def _dense_eig(x: Array) -> tuple[Array, Array]:
    _require_square(x.shape, "eig")
    return tuple(jnp.linalg.eig(x))  # type: ignore[return-value]


@_dispatch(_dense_eig)
def eig(M: FactoredMatrix) -> tuple[Array, Array]:
    """Eigenvalues ``[..., k]`` and unit right eigenvectors ``[..., l, k]`` of ``A @ B``.

    If ``B A v = w v`` then ``A B (A v) = w (A v)``: the eigenvectors of ``A @ B`` for nonzero
    eigenvalues are ``A v``. For zero eigenvalues ``A v`` may vanish; those columns are zero.
    """
    small, is_BA = _small_square(M, "eig")
    w, v = jnp.linalg.eig(small)
    if not is_BA:
        return w, v
    vecs = _mm(M.A.astype(v.dtype), v)
    length = jnp.linalg.norm(vecs, axis=-2, keepdims=True)
    return w, vecs / jnp.where(length > 0, length, 1).astype(vecs.dtype)


def _dense_norm(x: Array) -> Array:
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1)))


@_dispatch(_dense_norm)
def norm(M: FactoredMatrix) -> Array:
    """Frobenius norm ``||A @ B||_F: [...]`` without an SVD.

    Uses ``||AB||_F^2 = sum((A^T A) * (B B^T))`` (two ``m x m`` Gram matrices) unless
    multiplying out is cheaper (``m`` larger than ``l`` or ``r``).
    """
    l, m, r = M.ldim, M.mdim, M.rdim
    if m * m * (l + r) <= l * m * r:
        gram_a = _mm(_mT(M.A), M.A)
        gram_b = _mm(M.B, _mT(M.B))
        sq = jnp.sum(gram_a * gram_b, axis=(-2, -1))
        return jnp.sqrt(jnp.maximum(sq, 0))
    return _dense_norm(_mm(M.A, M.B))


def _dense_trace(x: Array) -> Array:
    _require_square(x.shape, "trace")
    return jnp.trace(x, axis1=-2, axis2=-1)


@_dispatch(_dense_trace)
def trace(M: FactoredMatrix) -> Array:
    """Trace of a square ``A @ B``: ``sum_ij A_ij B_ji``."""
    _require_square(M.shape, "trace")
    return jnp.einsum("...ij,...ji->...", M.A, M.B, precision=HIGHEST)


def low_rank_approx(M: FactoredMatrix | Array, k: int) -> FactoredMatrix:
    """Best rank-``k`` approximation (Eckart-Young) as ``FactoredMatrix(U_k S_k, Vh_k)``."""
    U, S, Vh = svd(M)
    available = S.shape[-1]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= available:
        raise ValueError(
            f"low_rank_approx: k must be an integer in 1..{available} (the rank bound of a "
            f"matrix of shape {tuple(M.shape)}), got {k!r}"
        )
    return FactoredMatrix(U[..., :k] * S[..., None, :k], Vh[..., :k, :])
