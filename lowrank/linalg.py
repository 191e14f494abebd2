"""Linear algebra of factored (and dense) matrices, batched over leading axes.

Every function accepts a :class:`~lowrank.FactoredMatrix` or a dense array ``[..., l, r]``.
Factored inputs are never multiplied out: decompositions work on ``m x m`` cores built from
the factors. bfloat16/float16 inputs are computed in float32.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from lowrank import eigensolver
from lowrank.factored import FactoredMatrix

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST
R = TypeVar("R")

__all__ = [
    "eig",
    "eigvals",
    "lapack_one_matrix_at_a_time",
    "low_rank_approx",
    "norm",
    "svd",
    "svdvals",
    "trace",
]

_tracing = threading.local()


@contextlib.contextmanager
def lapack_one_matrix_at_a_time() -> Iterator[None]:
    """Functions traced in this context loop over their batch, one matrix per LAPACK call.

    jaxlib's CPU LAPACK kernels split a batch over XLA's intra-op thread pool and block on it.
    When several CPU devices run such kernels at once (a program sharded over a multi-device
    CPU mesh) the blocked waiters can hold every pool thread: a deadlock. A kernel
    given a single matrix runs inline. :func:`lowrank.sharding.sharded` enters this context on
    CPU meshes; it changes nothing on other platforms.
    """
    previous = getattr(_tracing, "per_matrix", False)
    _tracing.per_matrix = True
    try:
        yield
    finally:
        _tracing.per_matrix = previous


def _per_matrix(fn: Callable[..., R]) -> Callable[..., R]:
    """``fn(*matrices, **kwargs)``, looped over the broadcast batch axes of its matrix
    arguments inside :func:`lapack_one_matrix_at_a_time`."""

    @functools.wraps(fn)
    def wrapper(*matrices: Array, **kwargs: Any) -> R:
        batch = jnp.broadcast_shapes(*(m.shape[:-2] for m in matrices))
        if not getattr(_tracing, "per_matrix", False) or math.prod(batch) <= 1:
            return fn(*matrices, **kwargs)
        flat = [
            jnp.broadcast_to(m, batch + m.shape[-2:]).reshape(-1, *m.shape[-2:]) for m in matrices
        ]
        out = jax.lax.map(lambda ms: fn(*ms, **kwargs), flat)
        return jax.tree_util.tree_map(lambda y: y.reshape(batch + y.shape[1:]), out)

    return wrapper


def _mm(x: Array, y: Array) -> Array:
    return jnp.matmul(x, y, precision=HIGHEST)


def _mT(x: Array) -> Array:
    return jnp.swapaxes(x, -1, -2)


def _compute_dtype(dtype: Any) -> Any:
    return jnp.float32 if dtype in (jnp.bfloat16, jnp.float16) else dtype


def _pow2(e: Array, dtype: Any) -> Array:
    """Exactly ``2.0**e`` for integer ``e`` in the normal exponent range of ``dtype``."""
    info = jnp.finfo(dtype)
    bits = (e + (info.maxexp - 1)).astype(f"int{info.bits}") << info.nmant
    return jax.lax.bitcast_convert_type(bits, dtype)


def _unit_scale(x: Array) -> tuple[Array, Array]:
    """``(x * 2**-e, e)`` per matrix, ``e`` chosen (without gradient) so that the largest entry
    lies in ``[0.5, 1)``: exact, and ``e = 0`` for zero or non-finite matrices."""
    info = jnp.finfo(x.dtype)
    amax = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=(-2, -1)))
    _, e = jnp.frexp(jnp.where(jnp.isfinite(amax), amax, 0))
    e = jnp.clip(e, info.minexp, info.maxexp - 2)
    return x * _pow2(-e, x.dtype)[..., None, None], e


def _scale_back(y: Array, e: Array) -> Array:
    """``y * 2**e`` (real or complex) in two exact steps, so ``|e|`` may reach twice the
    exponent range without an intermediate overflow or underflow."""
    real = jnp.finfo(y.dtype).dtype
    a, b = _pow2(e // 2, real), _pow2(e - e // 2, real)
    if jnp.iscomplexobj(y):
        return jax.lax.complex(y.real * a * b, y.imag * a * b)
    return y * a * b


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


class _Serial:
    """Runs LAPACK-backed operations one after another by threading a data dependency.

    jaxlib's CPU LAPACK kernels (qr, svd, eig, eigh, potrf, trsm) split a batch over XLA's
    intra-op thread pool and block on it; two such calls running at once on a 2-core machine
    can deadlock. Each call made through ``_Serial`` takes an input that depends
    on the previous call's outputs, so XLA cannot overlap them. ``optimization_barrier`` does
    not do this: it aliases buffers and adds no dependency.
    """

    def __init__(self) -> None:
        self._last: list[Array] = []

    def __call__(self, fn: Callable[..., Any], x: Array, *args: Any, **kwargs: Any) -> Any:
        if self._last:
            # 0 * isnan(...) is an exact zero (NaN inputs must not poison later calls) that XLA
            # cannot fold away, so ``x`` now depends on the previous outputs.
            tie = sum(jnp.isnan(jnp.reshape(d, (-1,))[0]).astype(x.dtype) for d in self._last)
            x = x + 0 * tie
        out = _per_matrix(fn)(x, *args, **kwargs)
        self._last = [leaf for leaf in jax.tree_util.tree_leaves(out) if leaf.size]
        return out


@_per_matrix
def _thin_svd(x: Array) -> tuple[Array, Array, Array]:
    """Thin SVD; on CPU with LAPACK's QR iteration (gesvd), ~4x faster than the default
    divide and conquer (gesdd) on batches of small cores."""

    def qr_iteration(x: Array) -> tuple[Array, Array, Array]:
        algorithm = jax.lax.linalg.SvdAlgorithm.QR
        return jax.lax.linalg.svd(x, full_matrices=False, algorithm=algorithm)  # type: ignore[return-value]

    def default(x: Array) -> tuple[Array, Array, Array]:
        return tuple(jnp.linalg.svd(x, full_matrices=False))  # type: ignore[return-value]

    return jax.lax.platform_dependent(x, cpu=qr_iteration, default=default)


def _tri_solve(L: Array, rhs: Array, *, lower: bool) -> Array:
    return jax.scipy.linalg.solve_triangular(L, rhs, lower=lower)


def _stack_factors(M: FactoredMatrix, a: Array, b: Array) -> Array:
    """``[2, *batch, ...]``: per-factor ``m x m`` arrays of ``A`` and ``B^T`` in one batch."""
    lead = M.batch_shape
    return jnp.stack([jnp.broadcast_to(x, (*lead, *x.shape[-2:])) for x in (a, b)])


def _factor_cholesky(run: _Serial, M: FactoredMatrix) -> tuple[Array, Array]:
    """Lower ``L [2, *batch, m, m]`` with ``A^T A = L[0] L[0]^T``, ``B B^T = L[1] L[1]^T``.

    ``L[0]^T`` and ``L[1]^T`` are R factors of ``A`` and ``B^T``, accurate to about
    ``eps * cond`` relative to their norm. Also returns ``[*batch]`` conditioning estimates
    ``max diag(L) / min diag(L)`` (a lower bound on ``cond``; inf or NaN when a factor is
    numerically rank deficient).
    """
    gram = _stack_factors(M, _mm(_mT(M.A), M.A), _mm(M.B, _mT(M.B)))
    L = run(jnp.linalg.cholesky, gram)
    pivots = jnp.abs(jnp.diagonal(L, axis1=-2, axis2=-1))
    cond = jnp.max(pivots, axis=-1) / jnp.min(pivots, axis=-1)
    return L, jnp.max(cond, axis=0)


def _qr_core(run: _Serial, M: FactoredMatrix, with_q: bool) -> tuple[Any, Any, Array]:
    """Householder QR of ``A`` and ``B^T`` and the core ``Ra @ Rb^T`` (the robust path)."""
    if with_q:
        Qa, Ra = run(jnp.linalg.qr, M.A)
        Qb, Rb = run(jnp.linalg.qr, _mT(M.B))
        return Qa, Qb, _mm(Ra, _mT(Rb))
    Ra = run(jnp.linalg.qr, M.A, mode="r")
    Rb = run(jnp.linalg.qr, _mT(M.B), mode="r")
    return None, None, _mm(Ra, _mT(Rb))


def _gram_path_applies(M: FactoredMatrix) -> bool:
    """Cholesky of the factors' Gram matrices needs ``m <= l`` and ``m <= r``."""
    return M.mdim <= min(M.ldim, M.rdim)


def _with_fallback(run: _Serial, fast: Any, error: Array, limit: float, slow: Callable) -> Any:
    """``fast`` if every ``error`` is finite and at most ``limit``, else ``slow()`` for the batch.

    ``slow`` runs only when needed; under ``vmap`` the ``cond`` becomes a ``select`` that
    evaluates both, and ``run`` keeps the decompositions of ``slow`` after those of ``fast``.
    """
    ok = jnp.all(jnp.isfinite(error) & (error <= limit))
    run._last = [leaf for leaf in jax.tree_util.tree_leaves(fast) if leaf.size]
    return jax.lax.cond(ok, lambda: fast, slow)


# Limits above which the fast paths defer to Householder QR. Singular values from Cholesky
# R factors are accurate to ~eps * cond * max(S): cond <= 1e3 keeps that below 1e-4 in float32.
# Cholesky QR2 is accurate when its first pass is orthogonal to better than ~0.5.
_SVDVALS_MAX_COND = 1e3
_SVD_MAX_DEFECT = 0.5


@_dispatch(_thin_svd)
def svd(M: FactoredMatrix) -> tuple[Array, Array, Array]:
    """Thin SVD ``A @ B == U @ diag(S) @ Vh``, computed from the factors.

    The factors are orthogonalised (Cholesky QR2, or Householder QR when a factor is too
    ill-conditioned for it) and the ``m x m`` core ``Ra @ Rb^T`` is decomposed; ``A @ B`` is
    never formed. Gradients are finite for rank-deficient factors too (see
    :func:`_factored_svd_jvp`).

    Returns:
        ``U: [..., l, k]``, ``S: [..., k]`` (descending), ``Vh: [..., k, r]`` with
        ``k = min(l, m, r)``. ``Vh`` holds the right singular vectors as rows; the
        TransformerLens-style ``V`` (columns) is ``FactoredMatrix.V``.
    """
    return _factored_svd(M)


@jax.custom_jvp
def _factored_svd(M: FactoredMatrix) -> tuple[Array, Array, Array]:
    run = _Serial()

    def householder() -> tuple[Array, Array, Array]:
        Qa, Qb, core = _qr_core(run, M, with_q=True)
        Uc, S, Vhc = run(_thin_svd, core)
        return _mm(Qa, Uc), S, _mm(Vhc, _mT(Qb))

    if not _gram_path_applies(M):
        return householder()
    L1, _ = _factor_cholesky(run, M)
    eye = jnp.broadcast_to(jnp.eye(M.mdim, dtype=L1.dtype), L1.shape)
    # x L1^-T as a GEMM with the small inverse: much faster than a triangular solve on x.
    L1_inv = _mT(run(_tri_solve, L1, eye, lower=True))
    Q1a, Q1b = _mm(M.A, L1_inv[0]), _mm(_mT(M.B), L1_inv[1])
    gram2 = _stack_factors(M, _mm(_mT(Q1a), Q1a), _mm(_mT(Q1b), Q1b))
    L2 = run(jnp.linalg.cholesky, gram2)
    R = _mT(_mm(L1, L2))  # A = (Q1a L2a^-T) R[0],  B^T = (Q1b L2b^-T) R[1]
    Uc, S, Vhc = run(_thin_svd, _mm(R[0], _mT(R[1])))
    rotations = run(_tri_solve, _mT(L2), jnp.stack([Uc, _mT(Vhc)]), lower=False)
    U, Vh = _mm(Q1a, rotations[0]), _mT(_mm(Q1b, rotations[1]))
    defect = jnp.max(jnp.abs(gram2 - eye), axis=(-2, -1))
    return _with_fallback(run, (U, S, Vh), defect, _SVD_MAX_DEFECT, householder)


def _tangent_times_v(M: FactoredMatrix, dM: FactoredMatrix, V: Array) -> Array:
    """``dX V`` for ``dX = dA B + A dB``, the tangent of ``X = A B``, without forming it."""
    return _mm(dM.A, _mm(M.B, V)) + _mm(M.A, _mm(dM.B, V))


@_factored_svd.defjvp
def _factored_svd_jvp(
    primals: tuple[FactoredMatrix], tangents: tuple[FactoredMatrix]
) -> tuple[tuple[Array, Array, Array], tuple[Array, Array, Array]]:
    """The thin-SVD derivative (as ``jnp.linalg.svd``'s, with ``I - U U^T`` terms on both sides)
    from the factors.

    Autodiff through the algorithm would differentiate a Cholesky or QR of a singular Gram
    matrix or factor (NaN for a zero-ablated head). The singular values' derivative
    ``u_i^T dX v_i`` needs only the primal vectors; in the vectors' derivatives the
    ``1 / s_i`` and ``1 / (s_j^2 - s_i^2)`` of numerically zero or tied values (where the
    vectors are arbitrary) are set to zero.
    """
    (M,), (dM,) = primals, tangents
    U, S, Vh = _factored_svd(M)
    V = _mT(Vh)
    dXV = _tangent_times_v(M, dM, V)
    dXtU = _tangent_times_v(M.T, dM.T, U)
    dP = _mm(_mT(U), dXV)
    dS = jnp.diagonal(dP, axis1=-2, axis2=-1)
    # On S / max(S) in [0, 1], so that the inverses overflow only where the result does.
    top = jnp.where(S[..., :1] > 0, S[..., :1], 1)
    s = S / top
    eps = max(M.ldim, M.rdim) * float(jnp.finfo(S.dtype).eps)
    inv_s = _inverse_or_zero(jnp.where(s > eps, s, 0)) / top
    s_row, s_col = s[..., None, :], s[..., :, None]
    tied = jnp.abs(s_row - s_col) <= eps
    F = _inverse_or_zero(jnp.where(tied, 0, (s_row - s_col) * (s_row + s_col))) / top[..., None]
    omega_u = F * (dP * s_row + s_col * _mT(dP))  # U^T dU
    omega_v = F * (s_col * dP + _mT(dP) * s_row)  # V^T dV
    dU = _mm(U, omega_u) + (dXV - _mm(U, dP)) * inv_s[..., None, :]
    dV = _mm(V, omega_v) + (dXtU - _mm(V, _mT(dP))) * inv_s[..., None, :]
    return (U, S, Vh), (dU, dS, _mT(dV))


@jax.custom_jvp
@_per_matrix
def _dense_svdvals(x: Array) -> Array:
    # Square it up with a QR first: LAPACK's gesdd, as jaxlib calls it, allocates U [l, l] even
    # without vectors (275 GB for a 262144 x 768 embedding grid).
    if x.shape[-2] < x.shape[-1]:
        x = _mT(x)
    if x.shape[-2] > x.shape[-1]:
        x = jnp.linalg.qr(x, mode="r")
    return jnp.linalg.svd(x, compute_uv=False)


@_dense_svdvals.defjvp
def _dense_svdvals_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    """``ds_i = u_i^T dx v_i``: the QR's derivative is NaN for a rank-deficient ``x``."""
    (x,), (dx,) = primals, tangents
    U, S, Vh = _thin_svd(x)
    return S, jnp.sum(U * _mm(dx, _mT(Vh)), axis=-2)


@_dispatch(_dense_svdvals)
def svdvals(M: FactoredMatrix) -> Array:
    """Singular values ``[..., min(l, m, r)]`` in descending order.

    Computed from the Cholesky factors of the Gram matrices ``A^T A`` and ``B B^T`` (``m x m``,
    matmul-fast) when both factors are well conditioned, else from Householder QR.
    Differentiated as ``ds_i = u_i^T dX v_i`` (finite for rank-deficient factors).
    """
    return _factored_svdvals(M)


@jax.custom_jvp
def _factored_svdvals(M: FactoredMatrix) -> Array:
    run = _Serial()

    def householder() -> Array:
        _, _, core = _qr_core(run, M, with_q=False)
        return run(jnp.linalg.svd, core, compute_uv=False)

    if not _gram_path_applies(M):
        return householder()
    L, cond = _factor_cholesky(run, M)
    S = run(jnp.linalg.svd, _mm(_mT(L[0]), L[1]), compute_uv=False)
    return _with_fallback(run, S, cond, _SVDVALS_MAX_COND, householder)


@_factored_svdvals.defjvp
def _factored_svdvals_jvp(
    primals: tuple[FactoredMatrix], tangents: tuple[FactoredMatrix]
) -> tuple[Array, Array]:
    # One SVD with vectors (values from it too: a second decomposition could overlap it).
    (M,), (dM,) = primals, tangents
    U, S, Vh = _factored_svd(M)
    return S, jnp.sum(U * _tangent_times_v(M, dM, _mT(Vh)), axis=-2)


@_per_matrix
def _eigvals(x: Array) -> Array:
    """LAPACK's ``geev`` on CPU; the batched pure-JAX solver elsewhere (XLA's ``eig`` does not
    exist on TPU and runs one matrix at a time on GPU)."""

    def lapack(x: Array) -> Array:
        # jaxlib's geev returns wrongly scaled float32 eigenvalues for matrices of norm above
        # ~5e11 or below ~1e-12: give it max-abs ~1. (The pure-JAX solver scales by itself.)
        x, e = _unit_scale(x)
        return _scale_back(jnp.linalg.eigvals(x), e[..., None])

    return jax.lax.platform_dependent(x, cpu=lapack, default=eigensolver.eigvals)


@_per_matrix
def _eig(x: Array) -> tuple[Array, Array]:
    """Eigenvalues and unit right eigenvectors; backends (and scaling) as in :func:`_eigvals`."""

    def lapack(x: Array) -> tuple[Array, Array]:
        x, e = _unit_scale(x)
        w, v = jnp.linalg.eig(x)
        return _scale_back(w, e[..., None]), v

    return jax.lax.platform_dependent(x, cpu=lapack, default=eigensolver.eig)


def _dense_eigvals(x: Array) -> Array:
    _require_square(x.shape, "eigvals")
    return _eigvals(x)


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
    return _eigvals(small)


def _dense_eig(x: Array) -> tuple[Array, Array]:
    _require_square(x.shape, "eig")
    return _eig(x)


@_dispatch(_dense_eig)
def eig(M: FactoredMatrix) -> tuple[Array, Array]:
    """Eigenvalues ``[..., k]`` and unit right eigenvectors ``[..., l, k]`` of ``A @ B``.

    If ``B A v = w v`` then ``A B (A v) = w (A v)``: the eigenvectors of ``A @ B`` for nonzero
    eigenvalues are ``A v``. For zero eigenvalues ``A v`` may vanish; those columns are zero.
    """
    small, is_BA = _small_square(M, "eig")
    w, v = _eig(small)
    if not is_BA:
        return w, v
    vecs = _mm(M.A.astype(v.dtype), v)
    length = jnp.linalg.norm(vecs, axis=-2, keepdims=True)
    return w, vecs / jnp.where(length > 0, length, 1).astype(vecs.dtype)


def _inverse_or_zero(x: Array) -> Array:
    """``1 / x`` where ``x != 0``, else 0 (a double ``where``: no NaN in the backward pass)."""
    nonzero = x != 0
    return jnp.where(nonzero, 1 / jnp.where(nonzero, x, 1), 0)


def _dense_norm_and_grad(x: Array) -> tuple[Array, Array]:
    """``||x||_F`` and its gradient ``x / ||x||_F`` (zero at ``x = 0``), computed on ``x``
    scaled by a power of two: squares of entries beyond ~1e19 or below ~1e-19 over/underflow."""
    u, e = _unit_scale(x)
    unit_norm = jnp.sqrt(jnp.sum(jnp.square(u), axis=(-2, -1)))
    return _scale_back(unit_norm, e), u * _inverse_or_zero(unit_norm)[..., None, None]


@jax.custom_jvp
def _dense_norm(x: Array) -> Array:
    return _dense_norm_and_grad(x)[0]


@_dense_norm.defjvp
def _dense_norm_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    # Closed-form gradient: autodiff through the scaling would multiply the cotangent by the
    # norm's scale first and underflow (or overflow) inside the backward pass.
    norm, grad = _dense_norm_and_grad(*primals)
    return norm, jnp.sum(grad * tangents[0], axis=(-2, -1))


def _factored_norm_and_grads(A: Array, B: Array) -> tuple[Array, Callable[[], tuple[Array, Array]]]:
    """``||AB||_F`` and a function for its gradients, on factors scaled by powers of two so
    that nothing over- or underflows unless the result does.

    Uses ``||AB||_F^2 = sum((A^T A) * (B B^T))`` (two ``m x m`` Gram matrices) unless
    multiplying out is cheaper (``m`` larger than ``l`` or ``r``).
    """
    (A, ea), (B, eb) = _unit_scale(A), _unit_scale(B)
    l, m = A.shape[-2:]
    r = B.shape[-1]
    use_gram = m * m * (l + r) <= l * m * r
    if use_gram:
        gram_a, gram_b = _mm(_mT(A), A), _mm(B, _mT(B))
        sq = jnp.sum(gram_a * gram_b, axis=(-2, -1))
    else:
        AB = _mm(A, B)
        sq = jnp.sum(jnp.square(AB), axis=(-2, -1))
    unit_norm = jnp.sqrt(jnp.maximum(sq, 0))

    def grads() -> tuple[Array, Array]:
        """``A B B^T / ||AB||`` and ``A^T A B / ||AB||`` (zero where ``AB = 0``)."""
        if use_gram:
            ABBt, AtAB = _mm(A, gram_b), _mm(gram_a, B)
        else:
            ABBt, AtAB = _mm(AB, _mT(B)), _mm(_mT(A), AB)
        inv = _inverse_or_zero(unit_norm)[..., None, None]
        return (
            _scale_back(ABBt * inv, eb[..., None, None]),
            _scale_back(AtAB * inv, ea[..., None, None]),
        )

    return _scale_back(unit_norm, ea + eb), grads


@jax.custom_jvp
def _factored_norm(A: Array, B: Array) -> Array:
    return _factored_norm_and_grads(A, B)[0]


@_factored_norm.defjvp
def _factored_norm_jvp(
    primals: tuple[Array, Array], tangents: tuple[Array, Array]
) -> tuple[Array, Array]:
    # As in _dense_norm_jvp; the gradients are computed only here.
    norm, grads = _factored_norm_and_grads(*primals)
    (grad_A, grad_B), (dA, dB) = grads(), tangents
    return norm, jnp.sum(grad_A * dA, axis=(-2, -1)) + jnp.sum(grad_B * dB, axis=(-2, -1))


@_dispatch(_dense_norm)
def norm(M: FactoredMatrix) -> Array:
    """Frobenius norm ``||A @ B||_F: [...]`` without an SVD, accurate wherever it is
    representable.

    Uses ``||AB||_F^2 = sum((A^T A) * (B B^T))`` (two ``m x m`` Gram matrices) unless
    multiplying out is cheaper (``m`` larger than ``l`` or ``r``). Its gradient at
    ``A @ B = 0`` is zero (a subgradient).
    """
    return _factored_norm(M.A, M.B)


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
