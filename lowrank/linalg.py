"""Linear algebra of factored (and dense) matrices, batched over leading axes.

Implements the operations that :mod:`lowrank.factored` declares (``svd``, ``svdvals``,
``eigvals``, ``eig``, ``norm``, ``trace``) for a :class:`~lowrank.FactoredMatrix` and for dense
arrays ``[..., l, r]`` (jax or NumPy). Factored inputs are never multiplied out: decompositions
work on ``m x m`` cores built from the factors. bfloat16/float16 inputs are computed in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from lowrank import eigensolver
from lowrank._deadlock import Serial
from lowrank._util import HIGHEST, check_real_float, mm, mT, pow2, unit_scale, upcast
from lowrank.factored import FactoredMatrix, eig, eigvals, norm, svd, svdvals, trace

Array = jax.Array
R = TypeVar("R")

__all__ = ["eig", "eigvals", "low_rank_approx", "norm", "svd", "svdvals", "trace"]


def _scale_back(y: Array, e: Array) -> Array:
    """``y * 2**e`` (real or complex), undoing :func:`~lowrank._util.unit_scale`.

    Done in two exact steps, so ``|e|`` may reach twice the exponent range without an
    intermediate overflow or underflow.
    """
    real = jnp.finfo(y.dtype).dtype
    a, b = pow2(e // 2, real), pow2(e - e // 2, real)
    if jnp.iscomplexobj(y):
        return jax.lax.complex(y.real * a * b, y.imag * a * b)
    return y * a * b


def _as_dense(x: Any, fn: str) -> Array:
    """A jax or NumPy array as a checked, upcast jax matrix ``[..., l, r]``."""
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"{fn}: expected a matrix [..., l, r], got shape {tuple(x.shape)}")
    check_real_float(x, fn, "matrix")
    return upcast(x)


def _register(
    generic: Callable[..., R], factored: Callable[[FactoredMatrix], R], dense: Callable[[Array], R]
) -> None:
    """Implement ``generic`` by ``factored`` and ``dense``.

    ``factored`` serves a FactoredMatrix, ``dense`` jax and NumPy arrays (checked to be real
    floating-point matrices); half precision is upcast.
    """
    name = getattr(generic, "__name__", "")
    generic.register(  # type: ignore[attr-defined]
        FactoredMatrix, lambda M: factored(jax.tree_util.tree_map(upcast, M))
    )
    for cls in (jax.Array, jax.core.Tracer, np.ndarray):
        generic.register(cls, lambda x: dense(_as_dense(x, name)))  # type: ignore[attr-defined]


def _require_square(shape: tuple[int, ...], fn: str) -> None:
    if shape[-1] != shape[-2]:
        raise ValueError(f"{fn} needs a square matrix (l == r), got shape {tuple(shape)}")


def _thin_svd(x: Array) -> tuple[Array, Array, Array]:
    """Thin SVD of a dense matrix.

    On CPU it uses LAPACK's QR iteration (gesvd), ~4x faster than the default divide and
    conquer (gesdd) on batches of small cores.
    """

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


def _factor_cholesky(run: Serial, M: FactoredMatrix) -> tuple[Array, Array]:
    """Lower ``L [2, *batch, m, m]`` with ``A^T A = L[0] L[0]^T``, ``B B^T = L[1] L[1]^T``.

    ``L[0]^T`` and ``L[1]^T`` are R factors of ``A`` and ``B^T``, accurate to about
    ``eps * cond`` relative to their norm. Also returns ``[*batch]`` conditioning estimates
    ``max diag(L) / min diag(L)`` (a lower bound on ``cond``; inf or NaN when a factor is
    numerically rank deficient).
    """
    gram = _stack_factors(M, mm(mT(M.A), M.A), mm(M.B, mT(M.B)))
    L = run(jnp.linalg.cholesky, gram)
    pivots = jnp.abs(jnp.diagonal(L, axis1=-2, axis2=-1))
    cond = jnp.max(pivots, axis=-1) / jnp.min(pivots, axis=-1)
    return L, jnp.max(cond, axis=0)


def _qr_core(run: Serial, M: FactoredMatrix, with_q: bool) -> tuple[Any, Any, Array]:
    """Householder QR of ``A`` and ``B^T`` and the core ``Ra @ Rb^T`` (the robust path)."""
    if with_q:
        Qa, Ra = run(jnp.linalg.qr, M.A)
        Qb, Rb = run(jnp.linalg.qr, mT(M.B))
        return Qa, Qb, mm(Ra, mT(Rb))
    Ra = run(jnp.linalg.qr, M.A, mode="r")
    Rb = run(jnp.linalg.qr, mT(M.B), mode="r")
    return None, None, mm(Ra, mT(Rb))


def _gram_path_applies(M: FactoredMatrix) -> bool:
    """Cholesky of the factors' Gram matrices needs ``m <= l`` and ``m <= r``."""
    return M.mdim <= min(M.ldim, M.rdim)


def _with_fallback(fast: Any, error: Array, limit: float, slow: Callable[[], Any]) -> Any:
    """``fast`` if every ``error`` is finite and at most ``limit``, else ``slow()`` for the batch.

    ``slow`` runs only when needed; under ``vmap`` the ``cond`` becomes a ``select`` that
    evaluates both, and the ``Serial`` that both share keeps the decompositions of ``slow`` after
    those of ``fast``.
    """
    ok = jnp.all(jnp.isfinite(error) & (error <= limit))
    return jax.lax.cond(ok, lambda: fast, slow)


# Limits above which the fast paths defer to Householder QR. Singular values from Cholesky
# R factors are accurate to ~eps * cond * max(S): cond <= 1e3 keeps that below 1e-4 in float32.
# Cholesky QR2 is accurate when its first pass is orthogonal to better than ~0.5.
_SVDVALS_MAX_COND = 1e3
_SVD_MAX_DEFECT = 0.5


@jax.custom_jvp
def _factored_svd(M: FactoredMatrix) -> tuple[Array, Array, Array]:
    """Thin SVD of a FactoredMatrix computed from its factors, never forming ``A @ B``.

    The factors are orthogonalised (Cholesky QR2, or Householder QR when a factor is too
    ill-conditioned for it) and the ``m x m`` core ``Ra @ Rb^T`` is decomposed. Gradients are
    finite for rank-deficient factors too (see :func:`_factored_svd_jvp`).
    """
    run = Serial()

    def householder() -> tuple[Array, Array, Array]:
        Qa, Qb, core = _qr_core(run, M, with_q=True)
        Uc, S, Vhc = run(_thin_svd, core)
        return mm(Qa, Uc), S, mm(Vhc, mT(Qb))

    if not _gram_path_applies(M):
        return householder()
    L1, _ = _factor_cholesky(run, M)
    eye = jnp.broadcast_to(jnp.eye(M.mdim, dtype=L1.dtype), L1.shape)
    # x L1^-T as a GEMM with the small inverse: much faster than a triangular solve on x.
    L1_inv = mT(run(_tri_solve, L1, eye, lower=True))
    Q1a, Q1b = mm(M.A, L1_inv[0]), mm(mT(M.B), L1_inv[1])
    gram2 = _stack_factors(M, mm(mT(Q1a), Q1a), mm(mT(Q1b), Q1b))
    L2 = run(jnp.linalg.cholesky, gram2)
    R = mT(mm(L1, L2))  # A = (Q1a L2a^-T) R[0],  B^T = (Q1b L2b^-T) R[1]
    Uc, S, Vhc = run(_thin_svd, mm(R[0], mT(R[1])))
    rotations = run(_tri_solve, mT(L2), jnp.stack([Uc, mT(Vhc)]), lower=False)
    U, Vh = mm(Q1a, rotations[0]), mT(mm(Q1b, rotations[1]))
    defect = jnp.max(jnp.abs(gram2 - eye), axis=(-2, -1))
    return _with_fallback((U, S, Vh), defect, _SVD_MAX_DEFECT, householder)


def _tangent_times_v(M: FactoredMatrix, dM: FactoredMatrix, V: Array) -> Array:
    """``dX V`` for ``dX = dA B + A dB``, the tangent of ``X = A B``, without forming it."""
    return mm(dM.A, mm(M.B, V)) + mm(M.A, mm(dM.B, V))


@_factored_svd.defjvp
def _factored_svd_jvp(
    primals: tuple[FactoredMatrix], tangents: tuple[FactoredMatrix]
) -> tuple[tuple[Array, Array, Array], tuple[Array, Array, Array]]:
    """Compute the thin-SVD derivative from the factors.

    The derivative is ``jnp.linalg.svd``'s, with ``I - U U^T`` terms on both sides.

    Autodiff through the algorithm would differentiate a Cholesky or QR of a singular Gram
    matrix or factor (NaN for a zero-ablated head). The singular values' derivative
    ``u_i^T dX v_i`` needs only the primal vectors; in the vectors' derivatives the
    ``1 / s_i`` and ``1 / (s_j^2 - s_i^2)`` of numerically zero or tied values (where the
    vectors are arbitrary) are set to zero.
    """
    (M,), (dM,) = primals, tangents
    U, S, Vh = _factored_svd(M)
    V = mT(Vh)
    dXV = _tangent_times_v(M, dM, V)
    dXtU = _tangent_times_v(M.T, dM.T, U)
    dP = mm(mT(U), dXV)
    dS = jnp.diagonal(dP, axis1=-2, axis2=-1)
    # On S / max(S) in [0, 1], so that the inverses overflow only where the result does.
    top = jnp.where(S[..., :1] > 0, S[..., :1], 1)
    s = S / top
    eps = max(M.ldim, M.rdim) * float(jnp.finfo(S.dtype).eps)
    inv_s = _inverse_or_zero(jnp.where(s > eps, s, 0)) / top
    s_row, s_col = s[..., None, :], s[..., :, None]
    tied = jnp.abs(s_row - s_col) <= eps
    F = _inverse_or_zero(jnp.where(tied, 0, (s_row - s_col) * (s_row + s_col))) / top[..., None]
    omega_u = F * (dP * s_row + s_col * mT(dP))  # U^T dU
    omega_v = F * (s_col * dP + mT(dP) * s_row)  # V^T dV
    dU = mm(U, omega_u) + (dXV - mm(U, dP)) * inv_s[..., None, :]
    dV = mm(V, omega_v) + (dXtU - mm(V, mT(dP))) * inv_s[..., None, :]
    return (U, S, Vh), (dU, dS, mT(dV))


@jax.custom_jvp
def _dense_svdvals(x: Array) -> Array:
    # Square it up with a QR first: LAPACK's gesdd, as jaxlib calls it, allocates U [l, l] even
    # without vectors (275 GB for a 262144 x 768 embedding grid).
    if x.shape[-2] < x.shape[-1]:
        x = mT(x)
    if x.shape[-2] > x.shape[-1]:
        x = jnp.linalg.qr(x, mode="r")
    return jnp.linalg.svd(x, compute_uv=False)


@_dense_svdvals.defjvp
def _dense_svdvals_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    """``ds_i = u_i^T dx v_i``: the QR's derivative is NaN for a rank-deficient ``x``."""
    (x,), (dx,) = primals, tangents
    U, S, Vh = _thin_svd(x)
    return S, jnp.sum(U * mm(dx, mT(Vh)), axis=-2)


@jax.custom_jvp
def _factored_svdvals(M: FactoredMatrix) -> Array:
    """Singular values of a FactoredMatrix, computed from its factors.

    They come from the Cholesky factors of the Gram matrices ``A^T A`` and ``B B^T``
    (``m x m``, matmul-fast) when both factors are well conditioned, else from Householder QR.
    Differentiated as ``ds_i = u_i^T dX v_i`` (finite for rank-deficient factors).
    """
    run = Serial()

    def householder() -> Array:
        _, _, core = _qr_core(run, M, with_q=False)
        return run(jnp.linalg.svd, core, compute_uv=False)

    if not _gram_path_applies(M):
        return householder()
    L, cond = _factor_cholesky(run, M)
    S = run(jnp.linalg.svd, mm(mT(L[0]), L[1]), compute_uv=False)
    return _with_fallback(S, cond, _SVDVALS_MAX_COND, householder)


@_factored_svdvals.defjvp
def _factored_svdvals_jvp(
    primals: tuple[FactoredMatrix], tangents: tuple[FactoredMatrix]
) -> tuple[Array, Array]:
    # One SVD with vectors (values from it too: a second decomposition could overlap it).
    (M,), (dM,) = primals, tangents
    U, S, Vh = _factored_svd(M)
    return S, jnp.sum(U * _tangent_times_v(M, dM, mT(Vh)), axis=-2)


def _eigvals(x: Array) -> Array:
    """Eigenvalues of dense square matrices.

    Uses LAPACK's ``geev`` on CPU; the batched pure-JAX solver elsewhere (XLA's ``eig`` does
    not exist on TPU and runs one matrix at a time on GPU).
    """

    def lapack(x: Array) -> Array:
        # jaxlib's geev returns wrongly scaled float32 eigenvalues for matrices of norm above
        # ~5e11 or below ~1e-12: give it max-abs ~1. (The pure-JAX solver scales by itself.)
        x, e = unit_scale(x)
        return _scale_back(jnp.linalg.eigvals(x), e[..., None])

    def pure_jax(x: Array) -> Array:
        return eigensolver.solve(x).values

    return jax.lax.platform_dependent(x, cpu=lapack, default=pure_jax)


def _eig(x: Array) -> tuple[Array, Array]:
    """Eigenvalues and unit right eigenvectors; backends (and scaling) as in :func:`_eigvals`."""

    def lapack(x: Array) -> tuple[Array, Array]:
        x, e = unit_scale(x)
        w, v = jnp.linalg.eig(x)
        return _scale_back(w, e[..., None]), v

    def pure_jax(x: Array) -> tuple[Array, Array]:
        result = eigensolver.solve(x, vectors=True)
        assert result.vectors is not None
        return result.values, result.vectors

    return jax.lax.platform_dependent(x, cpu=lapack, default=pure_jax)


def _dense_eigvals(x: Array) -> Array:
    _require_square(x.shape, "eigvals")
    return _eigvals(x)


def _small_square(M: FactoredMatrix, fn: str) -> tuple[Array, bool]:
    """The smaller of ``B @ A`` (``m x m``) and ``A @ B`` (``l x l``), and which it is."""
    _require_square(M.shape, fn)
    if M.mdim <= M.ldim:
        return mm(M.B, M.A), True
    return mm(M.A, M.B), False


def _factored_eigvals(M: FactoredMatrix) -> Array:
    small, _ = _small_square(M, "eigvals")
    return _eigvals(small)


def _dense_eig(x: Array) -> tuple[Array, Array]:
    _require_square(x.shape, "eig")
    return _eig(x)


def _factored_eig(M: FactoredMatrix) -> tuple[Array, Array]:
    """Eigenvalues and eigenvectors of a FactoredMatrix via the smaller square product.

    If ``B A v = w v`` then ``A B (A v) = w (A v)``: the eigenvectors of ``A @ B`` for nonzero
    eigenvalues are ``A v`` (normalised; zero where ``A v`` vanishes).
    """
    small, is_BA = _small_square(M, "eig")
    w, v = _eig(small)
    if not is_BA:
        return w, v
    vecs = mm(M.A.astype(v.dtype), v)
    length = jnp.linalg.norm(vecs, axis=-2, keepdims=True)
    return w, vecs / jnp.where(length > 0, length, 1).astype(vecs.dtype)


def _inverse_or_zero(x: Array) -> Array:
    """``1 / x`` where ``x != 0``, else 0 (a double ``where``: no NaN in the backward pass)."""
    nonzero = x != 0
    return jnp.where(nonzero, 1 / jnp.where(nonzero, x, 1), 0)


def _dense_norm_and_grad(x: Array) -> tuple[Array, Array]:
    """``||x||_F`` and its gradient ``x / ||x||_F`` (zero at ``x = 0``).

    Both are computed on ``x`` scaled by a power of two: squares of entries beyond ~1e19 or
    below ~1e-19 would over/underflow.
    """
    u, e = unit_scale(x)
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
    """``||AB||_F`` and a function for its gradients.

    Computed on factors scaled by powers of two so that nothing over- or underflows unless the
    result does.

    Uses ``||AB||_F^2 = sum((A^T A) * (B B^T))`` (two ``m x m`` Gram matrices) unless
    multiplying out is cheaper (``m`` larger than ``l`` or ``r``).
    """
    (A, ea), (B, eb) = unit_scale(A), unit_scale(B)
    l, m = A.shape[-2:]
    r = B.shape[-1]
    use_gram = m * m * (l + r) <= l * m * r
    if use_gram:
        gram_a, gram_b = mm(mT(A), A), mm(B, mT(B))
        sq = jnp.sum(gram_a * gram_b, axis=(-2, -1))
    else:
        AB = mm(A, B)
        sq = jnp.sum(jnp.square(AB), axis=(-2, -1))
    unit_norm = jnp.sqrt(jnp.maximum(sq, 0))

    def grads() -> tuple[Array, Array]:
        """``A B B^T / ||AB||`` and ``A^T A B / ||AB||`` (zero where ``AB = 0``)."""
        if use_gram:
            ABBt, AtAB = mm(A, gram_b), mm(gram_a, B)
        else:
            ABBt, AtAB = mm(AB, mT(B)), mm(mT(A), AB)
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


def _dense_trace(x: Array) -> Array:
    _require_square(x.shape, "trace")
    return jnp.trace(x, axis1=-2, axis2=-1)


def _factored_trace(M: FactoredMatrix) -> Array:
    _require_square(M.shape, "trace")
    return jnp.einsum("...ij,...ji->...", M.A, M.B, precision=HIGHEST)


_register(svd, factored=_factored_svd, dense=_thin_svd)
_register(svdvals, factored=_factored_svdvals, dense=_dense_svdvals)
_register(eigvals, factored=_factored_eigvals, dense=_dense_eigvals)
_register(eig, factored=_factored_eig, dense=_dense_eig)
_register(norm, factored=lambda M: _factored_norm(M.A, M.B), dense=_dense_norm)
_register(trace, factored=_factored_trace, dense=_dense_trace)


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
