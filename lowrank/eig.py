"""Batched nonsymmetric eigenvalue solver in pure JAX (CPU, GPU and TPU).

``jnp.linalg.eig`` lowers to LAPACK's ``geev``: it has no TPU lowering and on GPU it runs one
matrix at a time. This module computes eigenvalues (and right eigenvectors) of a whole batch
``[..., n, n]`` of real matrices with one fixed-shape program built from elementwise ops,
dynamic slices and small matrix-vector products, so it compiles for every backend and
vectorises across the batch.

Algorithm (the textbook one, as in LAPACK's ``dgeev`` -> ``dgehrd`` + ``dlahqr`` + ``dtrevc``):

1. Non-finite matrices are set aside (their results are NaN) and each matrix is scaled by a
   power of two so that its largest entry lies in ``[0.5, 1)``.
2. Householder reduction to upper Hessenberg form: ``n - 2`` sequential steps, each a rank-one
   update of the whole batch.
3. Francis double-shift QR iteration with the Ahues-Tisseur deflation test and LAPACK's
   exceptional shifts (every 10th sweep without a deflation). All matrices of the batch move
   in lock step: one sweep chases a bulge from row ``k0`` to row ``k1`` and at step ``k`` every
   matrix applies its own 3x3 reflector to rows and columns ``k..k+2`` (the identity when
   ``k`` lies outside its unreduced blocks). Every unreduced diagonal block of every matrix
   gets its own double shift and is swept in the same pass, so a matrix that splits in the
   middle converges in both halves at once. A sweep costs ``k1 - k0 + 2`` sequential steps,
   each of ``O(batch * n)`` work.
4. Eigenvalues are read off the 1x1 and 2x2 diagonal blocks of the real Schur form (2x2 blocks
   with a scaled, cancellation-free formula). For eigenvectors the Schur vectors are
   accumulated, the 2x2 blocks are triangularised by a block-diagonal unitary matrix (one
   matmul: the blocks are disjoint), and the triangular system is solved for all eigenvectors
   at once by back substitution (``n - 1`` steps) with LAPACK's ``smin`` guard and
   per-column rescaling against overflow.

The loops are ``lax.while_loop``/``lax.fori_loop`` with a hard cap, so the solver always
terminates; matrices that do not converge within the cap (never seen on ordinary input) are
flagged and their results are NaN.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
HIGHEST = lax.Precision.HIGHEST

__all__ = ["eig", "eig_with_info", "eigvals", "eigvals_with_info"]

DEFAULT_MAX_ITERATIONS = 40
"""Default cap on QR sweeps of one matrix without a deflation (LAPACK's EISPACK-style cap is 30;
exceptional shifts happen at sweeps 10, 20, 30 and 40)."""

_EXCEPTIONAL_PERIOD = 10  # LAPACK's KEXSH
_EXC_DIAG = 0.75  # LAPACK's DAT1
_EXC_OFFDIAG = -0.4375  # LAPACK's DAT2


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------


def _check_input(a: Any, fn: str) -> Array:
    """``a`` as a float array ``[..., n, n]`` in its compute dtype, or a clear error."""
    if isinstance(a, (np.ndarray, np.generic, list, tuple, float, int)):
        a = jnp.asarray(a)
    if not isinstance(a, jax.Array):
        raise TypeError(f"{fn}: expected an array a [..., n, n], got {type(a).__name__}")
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(
            f"{fn}: expected a square matrix a [..., n, n], got shape {tuple(a.shape)}"
        )
    if jnp.issubdtype(a.dtype, jnp.complexfloating):
        raise TypeError(
            f"{fn}: complex input is not supported, got dtype {a.dtype} "
            f"(shape {tuple(a.shape)}); pass a real floating-point matrix"
        )
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(
            f"{fn}: expected a real floating-point matrix a [..., n, n], got dtype {a.dtype} "
            f"(shape {tuple(a.shape)})"
        )
    if a.dtype in (jnp.bfloat16, jnp.float16):
        a = a.astype(jnp.float32)
    return a


def _check_max_iterations(max_iterations: int | None, fn: str) -> int:
    if max_iterations is None:
        return DEFAULT_MAX_ITERATIONS
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, (int, np.integer)):
        raise TypeError(f"{fn}: max_iterations must be an int or None, got {max_iterations!r}")
    if max_iterations < 1:
        raise ValueError(f"{fn}: max_iterations must be >= 1, got {max_iterations}")
    return int(max_iterations)


def _complex_dtype(dtype: Any) -> Any:
    return jnp.complex128 if dtype == jnp.float64 else jnp.complex64


def _prepare(a: Array) -> tuple[Array, Array, Array]:
    """Zero out non-finite matrices and scale each by a power of two to max-abs in [0.5, 1).

    Returns the scaled batch, the scale factors ``[B]`` and the finiteness mask ``[B]``.
    """
    finite = jnp.all(jnp.isfinite(a), axis=(-2, -1))
    a = jnp.where(finite[:, None, None], a, 0)
    amax = jnp.max(jnp.abs(a), axis=(-2, -1))
    _, exponent = jnp.frexp(jnp.where(amax > 0, amax, 1))
    scale = jnp.ldexp(jnp.ones_like(amax), exponent)
    return a / scale[:, None, None], scale, finite


# --------------------------------------------------------------------------------------------
# Small numerical kernels (vectorised over any leading axes)
# --------------------------------------------------------------------------------------------


def _householder(alpha: Array, rest: Array) -> tuple[Array, Array, Array]:
    """Reflector ``I - tau v v^T`` mapping ``(alpha, rest)`` to ``(beta, 0, ...)``, ``v[0] = 1``.

    Args:
        alpha: ``[...]`` first component.
        rest: ``[..., m]`` remaining components.

    Returns:
        ``v_rest [..., m]`` (components after the leading 1), ``tau [...]``, ``beta [...]``.
        When ``rest`` is negligible (zero after scaling) the reflector is the identity.
    """
    big = jnp.maximum(jnp.abs(alpha), jnp.max(jnp.abs(rest), axis=-1))
    safe = jnp.where(big > 0, big, 1)
    alpha_s = alpha / safe
    rest_s = rest / safe[..., None]
    rest_sq = jnp.sum(rest_s * rest_s, axis=-1)
    beta_s = -jnp.copysign(jnp.sqrt(alpha_s * alpha_s + rest_sq), alpha_s)
    reflect = rest_sq > 0
    denom = jnp.where(reflect, alpha_s - beta_s, 1)
    tau = jnp.where(reflect, (beta_s - alpha_s) / jnp.where(reflect, beta_s, 1), 0)
    v_rest = jnp.where(reflect[..., None], rest_s / denom[..., None], 0)
    beta = jnp.where(reflect, beta_s * safe, alpha)
    return v_rest, tau, beta


def _householder3(x0: Array, x1: Array, x2: Array) -> tuple[Array, Array, Array, Array]:
    """:func:`_householder` for 3-vectors given as three ``[...]`` arrays (elementwise only).

    Returns ``v1, v2`` (``v = (1, v1, v2)``), ``tau`` and ``beta``.
    """
    big = jnp.maximum(jnp.abs(x0), jnp.maximum(jnp.abs(x1), jnp.abs(x2)))
    safe = jnp.where(big > 0, big, 1)
    a, b, c = x0 / safe, x1 / safe, x2 / safe
    rest_sq = b * b + c * c
    beta_s = -jnp.copysign(jnp.sqrt(a * a + rest_sq), a)
    reflect = rest_sq > 0
    denom = jnp.where(reflect, a - beta_s, 1)
    tau = jnp.where(reflect, (beta_s - a) / jnp.where(reflect, beta_s, 1), 0)
    v1 = jnp.where(reflect, b / denom, 0)
    v2 = jnp.where(reflect, c / denom, 0)
    beta = jnp.where(reflect, beta_s * safe, x0)
    return v1, v2, tau, beta


def _eig2x2(a: Array, b: Array, c: Array, d: Array) -> tuple[Array, Array, Array, Array]:
    """Eigenvalues ``(re1, im1, re2, im2)`` of ``[[a, b], [c, d]]``, scaled and stable.

    Real pairs use ``d + p + sign(p) sqrt(p^2 + bc)`` and the product formula for the other
    root (no cancellation); complex pairs are ``(a + d) / 2 +- i sqrt(-(p^2 + bc))`` with the
    positive imaginary part first.
    """
    big = jnp.maximum(jnp.maximum(jnp.abs(a), jnp.abs(b)), jnp.maximum(jnp.abs(c), jnp.abs(d)))
    safe = jnp.where(big > 0, big, 1)
    a, b, c, d = a / safe, b / safe, c / safe, d / safe
    p = 0.5 * (a - d)
    bcmax = jnp.maximum(jnp.abs(b), jnp.abs(c))
    bcmis = jnp.minimum(jnp.abs(b), jnp.abs(c)) * jnp.sign(b) * jnp.sign(c)
    sc = jnp.maximum(jnp.abs(p), bcmax)
    sc_safe = jnp.where(sc > 0, sc, 1)
    z = (p / sc_safe) * p + (bcmax / sc_safe) * bcmis  # (p^2 + bc) / sc
    root = jnp.sqrt(sc) * jnp.sqrt(jnp.abs(z))
    is_real = z >= 0
    zz = p + jnp.copysign(root, p)
    r1 = d + zz
    r2 = d - jnp.where(zz != 0, (bcmax / jnp.where(zz != 0, zz, 1)) * bcmis, 0)
    mid = 0.5 * (a + d)
    re1 = jnp.where(is_real, r1, mid) * safe
    re2 = jnp.where(is_real, r2, mid) * safe
    im1 = jnp.where(is_real, 0, root) * safe
    return re1, im1, re2, -im1


# --------------------------------------------------------------------------------------------
# Hessenberg reduction
# --------------------------------------------------------------------------------------------


def _hessenberg(a: Array, want_q: bool) -> tuple[Array, Array | None]:
    """Householder reduction ``a = Q H Q^T`` of a batch ``[B, n, n]`` (``n - 2`` steps)."""
    _, n, _ = a.shape
    idx = jnp.arange(n, dtype=jnp.int32)
    q = jnp.broadcast_to(jnp.eye(n, dtype=a.dtype), a.shape) if want_q else None

    def step(j: Array, carry: tuple[Array, Array | None]) -> tuple[Array, Array | None]:
        h, q = carry
        j = j.astype(jnp.int32)
        x = lax.dynamic_index_in_dim(h, j, axis=2, keepdims=False)  # column j, [B, n]
        alpha = lax.dynamic_index_in_dim(x, j + 1, axis=1, keepdims=False)
        below = idx > j + 1
        v_rest, tau, beta = _householder(alpha, jnp.where(below, x, 0))
        v = jnp.where(idx == j + 1, 1, jnp.where(below, v_rest, 0))
        # Materialise (v, tau) so XLA does not recompute them inside the big update.
        vt = lax.optimization_barrier(jnp.concatenate([v, tau[:, None]], axis=1))
        v, tau = vt[:, :n], vt[:, n]
        # (I - tau v v^T) H (I - tau v v^T) in one pass over H.
        w = jnp.einsum("bi,bij->bj", v, h, precision=HIGHEST)  # v^T H
        u = jnp.einsum("bij,bj->bi", h, v, precision=HIGHEST)  # H v
        c = jnp.sum(v * u, axis=1)  # v^T H v
        tv = tau[:, None] * v
        w = w - (tau * c)[:, None] * v
        h = h - tv[:, :, None] * w[:, None, :] - u[:, :, None] * tv[:, None, :]
        new_col = jnp.where(idx == j + 1, beta[:, None], jnp.where(idx > j + 1, 0, x))
        h = jnp.where((idx == j)[None, None, :], new_col[:, :, None], h)
        if q is not None:
            u = jnp.einsum("bij,bj->bi", q, v, precision=HIGHEST)
            q = q - u[:, :, None] * tv[:, None, :]
        return h, q

    if n < 3:
        return a, q
    return lax.fori_loop(0, n - 2, step, (a, q))


# --------------------------------------------------------------------------------------------
# Francis double-shift QR
# --------------------------------------------------------------------------------------------


class _Plan(NamedTuple):
    """What each matrix does at each bulge position ``k`` in the coming sweep (``[B, n]``)."""

    kind: Array  # 0 idle, 1 first reflector of a block, 2 chase (3 rows), 3 last chase (2 rows)
    v0: Array  # [B, n, 3] first column of (H - s1)(H - s2) for a block starting at row k
    k0: Array  # [] first position any matrix is active at
    k1: Array  # [] one past the last such position


_IDLE, _FIRST, _CHASE, _LAST = 0, 1, 2, 3


class _QRState(NamedTuple):
    h: Array  # [B, n + 1, n + 1] (one zero row/column of padding)
    z: Array | None  # [B, n, n + 1]
    kdefl: Array  # [B] sweeps since the last deflation
    nsplit: Array  # [B] number of zero subdiagonal entries (deflations so far)
    failed: Array  # [B] gave up after too many sweeps without a deflation
    sweeps: Array  # [] sweeps done
    steps: Array  # [] bulge-chasing steps done (sequential loop iterations)
    more: Array  # [] some matrix still has an unreduced block of size >= 3


def _bands(h: Array, n: int) -> tuple[Array, Array, Array]:
    """Diagonal ``d``, subdiagonal ``e[i] = h[i+1, i]``, superdiagonal ``f[i] = h[i, i+1]``.

    ``h`` may be padded beyond ``n``; the padding is ignored.
    """
    d = jnp.diagonal(h, axis1=1, axis2=2)[:, :n]
    e = jnp.diagonal(h, offset=-1, axis1=1, axis2=2)[:, : n - 1]
    f = jnp.diagonal(h, offset=1, axis1=1, axis2=2)[:, : n - 1]
    return d, e, f


def _negligible(d: Array, e: Array, f: Array) -> Array:
    """LAPACK's (Ahues-Tisseur) test of which subdiagonal entries ``e [B, n-1]`` are negligible."""
    n = d.shape[1]
    finfo = jnp.finfo(d.dtype)
    ulp = float(finfo.eps)
    smlnum = float(finfo.tiny) * (n / ulp)
    ae = jnp.abs(e)
    hkk, hk1 = d[:, 1:], d[:, :-1]  # h[k, k], h[k-1, k-1] for k = i + 1
    tst = jnp.abs(hk1) + jnp.abs(hkk)
    zeros = jnp.zeros_like(ae[:, :1])
    before = jnp.concatenate([zeros, ae[:, :-1]], axis=1)  # h[k-1, k-2]
    after = jnp.concatenate([ae[:, 1:], zeros], axis=1)  # h[k+1, k]
    tst = jnp.where(tst == 0, before + after, tst)
    ab = jnp.maximum(ae, jnp.abs(f))
    ba = jnp.minimum(ae, jnp.abs(f))
    aa = jnp.maximum(jnp.abs(hkk), jnp.abs(hk1 - hkk))
    bb = jnp.minimum(jnp.abs(hkk), jnp.abs(hk1 - hkk))
    s = aa + ab
    s = jnp.where(s > 0, s, 1)
    fine = ba * (ab / s) <= jnp.maximum(smlnum, ulp * (bb * (aa / s)))
    return (ae <= smlnum) | ((ae <= ulp * tst) & fine)


def _blocks(e: Array, n: int) -> tuple[Array, Array]:
    """First and last row ``[B, n]`` of the diagonal block holding each row (splits: ``e == 0``)."""
    idx = jnp.arange(n, dtype=jnp.int32)
    split = jnp.concatenate([jnp.ones_like(e[:, :1], dtype=bool), e == 0], axis=1)  # row i starts
    last = jnp.concatenate([e == 0, jnp.ones_like(e[:, :1], dtype=bool)], axis=1)  # row i ends
    start = lax.cummax(jnp.where(split, idx, 0), axis=1)
    end = lax.cummin(jnp.where(last, idx, n - 1), axis=1, reverse=True)
    return start, end


def _shift_vectors(d: Array, e: Array, f: Array, end: Array, kdefl: Array) -> Array:
    """First column of ``(H - s1)(H - s2)`` for a block starting at each row ``l``: ``[B, n, 3]``.

    ``s1, s2`` are the eigenvalues of the block's trailing 2x2 (Francis double shift), or
    LAPACK's exceptional shifts when ``kdefl`` is a multiple of 10.
    """
    n = d.shape[1]
    pad = jnp.zeros_like(d[:, :2])

    def take(x: Array, i: Array) -> Array:
        return jnp.take_along_axis(x, jnp.clip(i, 0, x.shape[1] - 1), axis=1)

    m = end
    dm, dm1 = take(d, m), take(d, m - 1)
    em1, em2 = take(e, m - 1), take(e, m - 2)  # h[m, m-1], h[m-1, m-2]
    fm1 = take(f, m - 1)  # h[m-1, m]
    e_ext = jnp.concatenate([e, pad], axis=1)[:, : n + 1]
    d_ext = jnp.concatenate([d, pad], axis=1)
    f_ext = jnp.concatenate([f, pad], axis=1)
    hll, hl1l1 = d, d_ext[:, 1 : n + 1]
    hl1l, hl2l1 = e_ext[:, :n], e_ext[:, 1 : n + 1]  # h[l+1, l], h[l+2, l+1]
    hll1 = f_ext[:, :n]  # h[l, l+1]

    bottom = (kdefl % (2 * _EXCEPTIONAL_PERIOD) == 0)[:, None]
    top = (kdefl % _EXCEPTIONAL_PERIOD == 0)[:, None] & ~bottom
    s_bot = jnp.abs(em1) + jnp.abs(em2)
    s_top = jnp.abs(hl1l) + jnp.abs(hl2l1)
    s_exc = jnp.where(bottom, s_bot, s_top)
    diag_exc = _EXC_DIAG * s_exc + jnp.where(bottom, dm, hll)
    exceptional = bottom | top
    h11 = jnp.where(exceptional, diag_exc, dm1)
    h12 = jnp.where(exceptional, _EXC_OFFDIAG * s_exc, fm1)
    h21 = jnp.where(exceptional, s_exc, em1)
    h22 = jnp.where(exceptional, diag_exc, dm)

    # Shifts as in dlahqr: a complex pair, or the real eigenvalue closer to h22 used twice.
    s = jnp.abs(h11) + jnp.abs(h12) + jnp.abs(h21) + jnp.abs(h22)
    ss = jnp.where(s > 0, s, 1)
    g11, g12, g21, g22 = h11 / ss, h12 / ss, h21 / ss, h22 / ss
    tr = 0.5 * (g11 + g22)
    det = (g11 - tr) * (g22 - tr) - g12 * g21
    rtdisc = jnp.sqrt(jnp.abs(det))
    cplx = det >= 0
    r1, r2 = tr + rtdisc, tr - rtdisc
    closer = jnp.where(jnp.abs(r1 - g22) <= jnp.abs(r2 - g22), r1, r2)
    rt1r = jnp.where(cplx, tr, closer) * s
    rt2r = rt1r
    rt1i = jnp.where(cplx, rtdisc, 0) * s
    rt2i = -rt1i

    # First column of the shift polynomial, scaled to avoid overflow (dlahqr).
    sv = jnp.abs(hll - rt2r) + jnp.abs(rt2i) + jnp.abs(hl1l)
    sv = jnp.where(sv > 0, sv, 1)
    h21s = hl1l / sv
    v1 = h21s * hll1 + (hll - rt1r) * ((hll - rt2r) / sv) - rt1i * (rt2i / sv)
    v2 = h21s * (hll + hl1l1 - rt1r - rt2r)
    v3 = h21s * hl2l1
    v = jnp.stack([v1, v2, v3], axis=-1)
    vs = jnp.sum(jnp.abs(v), axis=-1, keepdims=True)
    return v / jnp.where(vs > 0, vs, 1)


def _plan_sweep(state: _QRState, n: int, max_iterations: int) -> tuple[_QRState, _Plan]:
    """Deflate negligible subdiagonals, find the unreduced blocks and their shifts."""
    h = state.h
    d, e, f = _bands(h, n)
    e = jnp.where(_negligible(d, e, f), 0, e)
    rows = jnp.arange(n - 1, dtype=jnp.int32)
    h = h.at[:, rows + 1, rows].set(e)
    start, end = _blocks(e, n)
    nsplit = jnp.sum(e == 0, axis=1, dtype=jnp.int32)
    kdefl = jnp.where(nsplit > state.nsplit, 0, state.kdefl)
    unreduced = (end - start) >= 2
    busy = jnp.any(unreduced, axis=1) & ~state.failed
    kdefl = jnp.where(busy, kdefl + 1, kdefl)
    failed = state.failed | (busy & (kdefl > max_iterations))
    active = unreduced & ~failed[:, None]
    v0 = _shift_vectors(d, e, f, end, kdefl)
    idx = jnp.arange(n, dtype=jnp.int32)
    kind = jnp.where(
        start == idx, _FIRST, jnp.where(idx + 2 <= end, _CHASE, jnp.where(idx < end, _LAST, _IDLE))
    )
    kind = jnp.where(active, kind, _IDLE).astype(jnp.int32)
    k0 = jnp.min(jnp.where(kind == _FIRST, idx, n)).astype(jnp.int32)
    k1 = jnp.max(jnp.where(kind != _IDLE, idx + 1, 0)).astype(jnp.int32)
    new_state = state._replace(h=h, kdefl=kdefl, nsplit=nsplit, failed=failed, more=jnp.any(active))
    return new_state, _Plan(kind=kind, v0=v0, k0=k0, k1=k1)


def _reflect(x: Array, v1: Array, v2: Array, tau: Array, axis: int) -> Array:
    """Apply ``I - tau v v^T`` with ``v = (1, v1, v2)`` along ``axis`` (size 3) of ``x [B, ., .]``.

    Written out term by term: XLA compiles this far better than a size-3 reduction.
    """
    x0, x1, x2 = (lax.index_in_dim(x, i, axis=axis, keepdims=False) for i in range(3))
    b = (slice(None), None)
    s = (x0 + v1[b] * x1 + v2[b] * x2) * tau[b]
    return jnp.stack([x0 - s, x1 - s * v1[b], x2 - s * v2[b]], axis=axis)


def _bulge_step(k: Array, h: Array, z: Array | None, plan: _Plan) -> tuple[Array, Array | None]:
    """Apply every matrix's reflector at rows/columns ``k..k+2`` (identity where idle)."""
    width = h.shape[-1]
    batch = h.shape[0]
    k = k.astype(jnp.int32)
    kind = lax.dynamic_index_in_dim(plan.kind, k, axis=1, keepdims=False)
    v0 = lax.dynamic_index_in_dim(plan.v0, k, axis=1, keepdims=False)
    zero = jnp.zeros((), jnp.int32)
    bulge = lax.dynamic_slice(h, (zero, k, jnp.maximum(k - 1, 0)), (batch, 3, 1))[:, :, 0]
    first = kind == _FIRST
    x0 = jnp.where(first, v0[:, 0], bulge[:, 0])
    x1 = jnp.where(first, v0[:, 1], bulge[:, 1])
    x2 = jnp.where(first, v0[:, 2], jnp.where(kind == _LAST, 0, bulge[:, 2]))
    v1, v2, tau, beta = _householder3(x0, x1, x2)
    tau = jnp.where(kind == _IDLE, 0, tau)
    # Materialise the reflectors before H is updated in place: otherwise XLA fuses their
    # computation into the update kernels, which then need a full copy of H per step.
    refl = lax.optimization_barrier(jnp.stack([v1, v2, tau, beta]))
    v1, v2, tau, beta = refl[0], refl[1], refl[2], refl[3]

    rows = _reflect(lax.dynamic_slice_in_dim(h, k, 3, axis=1), v1, v2, tau, axis=1)
    # The chased bulge column becomes (beta, 0, 0) exactly.
    chased = (kind >= _CHASE)[:, None, None] & (jnp.arange(width, dtype=jnp.int32) == k - 1)
    new_col = jnp.where(jnp.arange(3) == 0, beta[:, None], 0)
    rows = jnp.where(chased, new_col[:, :, None], rows)
    h = lax.dynamic_update_slice_in_dim(h, rows, k, axis=1)

    cols = lax.dynamic_slice_in_dim(h, k, 3, axis=2)  # [B, n + 1, 3]
    h = lax.dynamic_update_slice_in_dim(h, _reflect(cols, v1, v2, tau, axis=2), k, axis=2)
    if z is not None:
        zc = lax.dynamic_slice_in_dim(z, k, 3, axis=2)
        z = lax.dynamic_update_slice_in_dim(z, _reflect(zc, v1, v2, tau, axis=2), k, axis=2)
    return h, z


def _francis_qr(
    h: Array, z: Array | None, max_iterations: int
) -> tuple[Array, Array | None, Array, Array]:
    """Real Schur form of a Hessenberg batch ``[B, n, n]`` (and ``z @ Q`` when ``z`` is given).

    Returns ``T [B, n, n]`` (quasi-triangular, exact zeros between diagonal blocks), the
    updated ``z``, the number of sweeps and of bulge steps done ``[2]`` and the failure flags
    ``[B]``.
    """
    batch, n, _ = h.shape
    if n < 3:
        return h, z, jnp.zeros((2,), jnp.int32), jnp.zeros((batch,), bool)
    hp = jnp.pad(h, ((0, 0), (0, 1), (0, 1)))
    zp = None if z is None else jnp.pad(z, ((0, 0), (0, 0), (0, 1)))
    zeros = jnp.zeros((batch,), jnp.int32)
    state = _QRState(
        h=hp,
        z=zp,
        kdefl=zeros,
        nsplit=zeros,
        failed=jnp.zeros((batch,), bool),
        sweeps=jnp.zeros((), jnp.int32),
        steps=jnp.zeros((), jnp.int32),
        more=jnp.ones((), bool),
    )
    # Every sweep either deflates or counts towards some matrix's cap: a hard bound.
    cap = n * (max_iterations + 1) + 1

    def sweep(state: _QRState) -> _QRState:
        state, plan = _plan_sweep(state, n, max_iterations)

        def body(k: Array, carry: tuple[Array, Array | None]) -> tuple[Array, Array | None]:
            return _bulge_step(k, carry[0], carry[1], plan)

        h, z = lax.fori_loop(plan.k0, plan.k1, body, (state.h, state.z))
        return state._replace(
            h=h, z=z, sweeps=state.sweeps + 1, steps=state.steps + jnp.maximum(plan.k1 - plan.k0, 0)
        )

    def cond(state: _QRState) -> Array:
        return state.more & (state.sweeps < cap)

    state = lax.while_loop(cond, sweep, state)
    z_out = None if state.z is None else state.z[:, :, :n]
    counts = jnp.stack([state.sweeps, state.steps])
    return state.h[:, :n, :n], z_out, counts, state.failed


# --------------------------------------------------------------------------------------------
# Reading off eigenvalues and eigenvectors
# --------------------------------------------------------------------------------------------


def _schur_eigvals(t: Array) -> tuple[Array, Array, Array]:
    """Eigenvalues ``(re, im) [B, n]`` of a quasi-triangular batch and whether all blocks <= 2."""
    _, n, _ = t.shape
    d = jnp.diagonal(t, axis1=1, axis2=2)
    if n == 1:
        return d, jnp.zeros_like(d), jnp.ones(d.shape[:1], bool)
    _, e, f = _bands(t, n)
    start, end = _blocks(e, n)
    small = jnp.all(end - start <= 1, axis=1)
    re1, im1, re2, im2 = _eig2x2(d[:, :-1], f, e, d[:, 1:])
    pad = jnp.zeros_like(d[:, :1])
    idx = jnp.arange(n, dtype=jnp.int32)
    pair_top = (end - start == 1) & (start == idx)
    pair_bot = (end - start == 1) & (end == idx)
    re = jnp.where(pair_top, jnp.concatenate([re1, pad], axis=1), d)
    im = jnp.where(pair_top, jnp.concatenate([im1, pad], axis=1), 0)
    re = jnp.where(pair_bot, jnp.concatenate([pad, re2], axis=1), re)
    im = jnp.where(pair_bot, jnp.concatenate([pad, im2], axis=1), im)
    return re, im, small


def _triangularise_blocks(t: Array, w: Array) -> Array:
    """Unitary ``U [B, n, n]`` with ``U^H T U`` upper triangular, for quasi-triangular ``T``.

    Each 2x2 block ``[[a, b], [c, d]]`` at rows ``i, i+1`` gets the rotation whose first column is
    its unit eigenvector for ``w[i]``; the blocks are disjoint, so ``U`` is block diagonal.
    """
    _, n, _ = t.shape
    cdtype = w.dtype
    d = jnp.diagonal(t, axis1=1, axis2=2)
    _, e, f = _bands(t, n)
    start, end = _blocks(e, n)
    idx = jnp.arange(n, dtype=jnp.int32)
    top = ((end - start == 1) & (start == idx))[:, :-1]  # [B, n - 1]
    a, b, c, dd = d[:, :-1], f, e, d[:, 1:]
    lam = w[:, :-1]
    # Two expressions for the same eigenvector; take the larger for accuracy.
    p1, p2 = b.astype(cdtype), lam - a.astype(cdtype)
    q1, q2 = lam - dd.astype(cdtype), c.astype(cdtype)
    norm_p = jnp.sqrt(jnp.abs(p1) ** 2 + jnp.abs(p2) ** 2)
    nq = jnp.sqrt(jnp.abs(q1) ** 2 + jnp.abs(q2) ** 2)
    use_p = norm_p > nq
    nrm = jnp.maximum(norm_p, nq)
    nrm = jnp.where(nrm > 0, nrm, 1).astype(cdtype)
    x1 = jnp.where(use_p, p1, q1) / nrm
    x2 = jnp.where(use_p, p2, q2) / nrm
    one = jnp.ones_like(x1)
    zero = jnp.zeros_like(x1)
    diag_top = jnp.where(top, x1, one)
    sub = jnp.where(top, x2, zero)  # U[i+1, i]
    sup = jnp.where(top, -jnp.conj(x2), zero)  # U[i, i+1]
    diag_bot = jnp.where(top, jnp.conj(x1), one)  # U[i+1, i+1]
    ones = jnp.ones_like(w[:, :1])
    diag = jnp.concatenate([diag_top, ones], axis=1) * jnp.concatenate([ones, diag_bot], axis=1)
    u = jnp.zeros(t.shape, cdtype)
    u = u.at[:, idx, idx].set(diag)
    u = u.at[:, idx[:-1] + 1, idx[:-1]].set(sub)
    u = u.at[:, idx[:-1], idx[:-1] + 1].set(sup)
    return u


def _triangular_eigvecs(t: Array, w: Array) -> Array:
    """Right eigenvectors ``X [B, n, n]`` (columns) of upper triangular ``t`` with diagonal ``w``.

    Back substitution for all eigenvectors at once, row by row from the bottom. Tiny pivots
    ``t_ii - w_k`` are replaced by ``smin = ulp * ||t||_F`` (as in LAPACK's ``trevc``) and a
    column is rescaled whenever a new entry exceeds one, so nothing overflows.
    """
    _, n, _ = t.shape
    rdtype = jnp.real(t).dtype
    finfo = jnp.finfo(rdtype)
    tnorm = jnp.sqrt(jnp.sum(jnp.abs(t) ** 2, axis=(1, 2)))
    smin = jnp.maximum(float(finfo.eps) * tnorm, float(finfo.tiny))  # [B]
    idx = jnp.arange(n, dtype=jnp.int32)
    diag = jnp.diagonal(t, axis1=1, axis2=2)
    x = jnp.broadcast_to(jnp.eye(n, dtype=t.dtype), t.shape)

    def step(j: Array, x: Array) -> Array:
        i = n - 2 - j.astype(jnp.int32)
        row = lax.dynamic_index_in_dim(t, i, axis=1, keepdims=False)  # [B, n]
        row = jnp.where(idx > i, row, 0)
        s = jnp.einsum("bj,bjk->bk", row, x, precision=HIGHEST)
        tii = lax.dynamic_index_in_dim(diag, i, axis=1)  # [B, 1]
        denom = tii - w
        small = jnp.abs(denom) < smin[:, None]
        denom = jnp.where(small, smin[:, None].astype(t.dtype), denom)
        xi = jnp.where(idx > i, -s / denom, jnp.where(idx == i, 1, 0))
        mag = jnp.abs(xi)
        rescale = jnp.where(mag > 1, 1 / jnp.where(mag > 1, mag, 1), 1).astype(t.dtype)
        x = x * rescale[:, None, :]
        return lax.dynamic_update_index_in_dim(x, xi * rescale, i, axis=1)

    return lax.fori_loop(0, n - 1, step, x)


# --------------------------------------------------------------------------------------------
# Drivers
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(1, 2))
def _solve(a: Array, want_vectors: bool, max_iterations: int) -> tuple[Array, Array | None, Array]:
    """Eigenvalues ``[B, n]``, eigenvectors ``[B, n, n]`` or None, converged ``[B]``.

    Jitted so that eager calls run one compiled program (inlined under an outer ``jit``).
    """
    batch, n, _ = a.shape
    cdtype = _complex_dtype(a.dtype)
    a, scale, finite = _prepare(a)
    h, q = _hessenberg(a, want_vectors)
    t, z, _, failed = _francis_qr(h, q, max_iterations)
    re, im, small = _schur_eigvals(t)
    converged = finite & ~failed & small
    nan = jnp.array(jnp.nan, dtype=re.dtype)
    w_unit = lax.complex(re, im)  # eigenvalues of the scaled matrix
    w = lax.complex(re * scale[:, None], im * scale[:, None])
    w = jnp.where(converged[:, None], w, lax.complex(nan, nan))
    if not want_vectors:
        return w, None, converged
    assert z is not None
    u = _triangularise_blocks(t, w_unit)
    tc = jnp.einsum("bji,bjk,bkl->bil", jnp.conj(u), t.astype(cdtype), u, precision=HIGHEST)
    tc = jnp.triu(tc, 1) + jax.vmap(jnp.diag)(w_unit)
    zc = jnp.einsum("bij,bjk->bik", z.astype(cdtype), u, precision=HIGHEST)
    x = _triangular_eigvecs(tc, w_unit)
    v = jnp.einsum("bij,bjk->bik", zc, x, precision=HIGHEST)
    v = _normalise_columns(v)
    v = jnp.where(converged[:, None, None], v, lax.complex(nan, nan))
    return w, v, converged


def _normalise_columns(v: Array) -> Array:
    """Unit 2-norm columns whose largest-magnitude entry is real and positive."""
    mag = jnp.abs(v)
    big = jnp.max(mag, axis=1, keepdims=True)
    big = jnp.where(big > 0, big, 1)
    v = v / big.astype(v.dtype)
    pivot = jnp.take_along_axis(v, jnp.argmax(mag, axis=1)[:, None, :], axis=1)
    phase = jnp.conj(pivot) / jnp.where(jnp.abs(pivot) > 0, jnp.abs(pivot), 1).astype(v.dtype)
    v = v * jnp.where(jnp.abs(pivot) > 0, phase, 1)
    length = jnp.sqrt(jnp.sum(jnp.abs(v) ** 2, axis=1, keepdims=True))
    return v / jnp.where(length > 0, length, 1).astype(v.dtype)


def _run(
    a: Any, fn: str, want_vectors: bool, max_iterations: int | None
) -> tuple[Array, Array | None, Array]:
    a = _check_input(a, fn)
    max_it = _check_max_iterations(max_iterations, fn)
    batch_shape, n = a.shape[:-2], a.shape[-1]
    cdtype = _complex_dtype(a.dtype)
    size = int(np.prod(batch_shape, dtype=np.int64))
    if size == 0 or n == 0:
        w = jnp.zeros((*batch_shape, n), cdtype)
        v = jnp.zeros((*batch_shape, n, n), cdtype) if want_vectors else None
        return w, v, jnp.ones(batch_shape, bool)
    flat = a.reshape((size, n, n))
    w, v, converged = _solve(flat, want_vectors, max_it)
    w = w.reshape((*batch_shape, n))
    v = None if v is None else v.reshape((*batch_shape, n, n))
    return w, v, converged.reshape(batch_shape)


def eigvals_with_info(a: Any, *, max_iterations: int | None = None) -> tuple[Array, Array]:
    """Eigenvalues of real square matrices and a per-matrix convergence flag.

    Args:
        a: ``[..., n, n]`` real floating-point matrices (bfloat16/float16 are computed in
            float32). Complex input raises ``TypeError``.
        max_iterations: cap on QR sweeps of one matrix without a deflation (default 40).

    Returns:
        ``w: [..., n]`` eigenvalues (complex64, or complex128 for float64 input), unsorted, in
        the order of the diagonal of the real Schur form; complex conjugate pairs are adjacent
        with the positive imaginary part first. ``converged: [...]`` bool; where it is False
        (non-finite input, or no convergence within the cap) the eigenvalues are NaN.
    """
    w, _, converged = _run(a, "eigvals_with_info", False, max_iterations)
    return w, converged


def eigvals(a: Any, *, max_iterations: int | None = None) -> Array:
    """Eigenvalues ``[..., n]`` (complex) of real square matrices ``a: [..., n, n]``.

    Pure JAX (no LAPACK), batched over leading axes; see :func:`eigvals_with_info` for the
    arguments, the output order and the convergence flag. Matrices with NaN/Inf entries, or
    that fail to converge, give NaN eigenvalues. Complex input raises ``TypeError``.
    """
    w, _, _ = _run(a, "eigvals", False, max_iterations)
    return w


def eig_with_info(a: Any, *, max_iterations: int | None = None) -> tuple[Array, Array, Array]:
    """Eigenvalues, unit right eigenvectors and a convergence flag of real square matrices.

    Args:
        a: ``[..., n, n]`` real floating-point matrices (bfloat16/float16 are computed in
            float32). Complex input raises ``TypeError``.
        max_iterations: cap on QR sweeps of one matrix without a deflation (default 40).

    Returns:
        ``w: [..., n]`` eigenvalues as in :func:`eigvals_with_info`; ``v: [..., n, n]`` with
        ``a @ v[..., :, k] = w[..., k] * v[..., :, k]``, unit 2-norm columns whose
        largest-magnitude entry is real and positive (for a defective eigenvalue the vectors
        are nearly parallel, as with LAPACK); ``converged: [...]`` bool. Where it is False the
        eigenvalues and eigenvectors are NaN.
    """
    w, v, converged = _run(a, "eig_with_info", True, max_iterations)
    assert v is not None
    return w, v, converged


def eig(a: Any, *, max_iterations: int | None = None) -> tuple[Array, Array]:
    """Eigenvalues ``w [..., n]`` and unit right eigenvectors ``v [..., n, n]`` (columns).

    Pure JAX (no LAPACK), batched over leading axes; see :func:`eig_with_info`.
    """
    w, v, _ = _run(a, "eig", True, max_iterations)
    assert v is not None
    return w, v
