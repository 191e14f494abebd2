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
   in lock step: at step ``t`` of a sweep every matrix applies its own 3x3 reflector to rows
   and columns ``t..t+2`` (the identity where ``t`` lies outside its unreduced blocks), so each
   step is a handful of fused kernels on ``O(batch * n)`` data. Every unreduced diagonal block
   of every matrix gets its own shifts and is swept in the same pass, so a matrix that splits
   in the middle converges in both halves at once. A sweep costs one step per row it spans.

   On GPU/TPU, where a step's cost should be dominated by kernel-launch and loop overhead
   rather than by its work, each sweep chases two bulges, 4 rows apart, through the larger
   blocks (a small-bulge multishift QR): their four shifts are eigenvalue estimates of the
   block's trailing 4x4 (three unrolled Francis sweeps on it). Both bulges move in the same
   steps (one band update), which cuts the sequential steps by ~40% for ``n = 64..128``. On CPU
   a step's cost grows with its work (measured: ~2x per step), so one bulge is faster there.
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

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowrank._util import HIGHEST, check_real_float, pow2, unit_scale, upcast

Array = jax.Array

__all__ = ["DEFAULT_MAX_ITERATIONS", "EigResult", "default_bulges", "solve"]

DEFAULT_MAX_ITERATIONS = 40
"""Default cap on QR sweeps of one matrix without a deflation (EISPACK's is 30 per eigenvalue).

Exceptional shifts happen at sweeps 10, 20, 30 and 40; from sweep 10 on the deflation test is
also relaxed to the classic one and multishift sweeps fall back to one bulge."""

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
    check_real_float(a, fn, "matrix a [..., n, n]")
    return upcast(a)


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
    """Zero out non-finite matrices and scale each to max-abs in ``[0.5, 1)``.

    The scaling is :func:`~lowrank._util.unit_scale` (by powers of two, so exact).

    Returns:
        The scaled batch, the scale factors ``[B]`` and the finiteness mask ``[B]``.
    """
    finite = jnp.all(jnp.isfinite(a), axis=(-2, -1))
    a, exponent = unit_scale(jnp.where(finite[:, None, None], a, 0))
    return a, pow2(exponent, a.dtype), finite


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
    """What every bulge of every matrix does at each step ``t`` of the coming sweep.

    Bulge ``j`` of a block is ``_SPACING * j`` rows behind bulge 0, so at step ``t`` it is at
    row ``t - _SPACING * j``.
    """

    kind: Array  # [B, n + 4(M-1), M] _IDLE, _FIRST (introduce), _CHASE or _LAST (2 rows)
    shifts: Array  # [B, n + 4(M-1), M, 4] (re1, im1, re2, im2), used when a bulge is introduced
    t0: Array  # [] first step at which something happens
    t1: Array  # [] one past the last such step


_IDLE, _FIRST, _CHASE, _LAST = 0, 1, 2, 3
_SPACING = 4  # rows between bulges of one sweep: their reflectors never touch each other's rows
_BULGES = 2  # bulges (double shifts) per sweep in blocks of size >= 2 * _BULGES + 2
_SMALL_QR_ITERATIONS = 3  # Francis iterations on the trailing 2M x 2M block to get 2M shifts
_MULTISHIFT_BLOCKS = 2  # per matrix, the bottom-most blocks that get several bulges per sweep


class _QRState(NamedTuple):
    h: Array  # [B, P, P]: H with _pad_width(M) zero rows/columns before and after it
    z: Array | None  # [B, n, P] (columns padded like H)
    kdefl: Array  # [B] sweeps since the last deflation
    nsplit: Array  # [B] number of zero subdiagonal entries (deflations so far)
    failed: Array  # [B] gave up after too many sweeps without a deflation
    iterations: Array  # [B] sweeps in which the matrix had an unreduced block of size >= 3
    sweeps: Array  # [] sweeps done
    more: Array  # [] some matrix still has an unreduced block of size >= 3


def _pad_width(bulges: int) -> int:
    """Zero rows/columns kept before and after H, so that every slice of a step is in range."""
    return _SPACING * (bulges - 1) + 1


def _bands(h: Array, n: int, offset: int = 0) -> tuple[Array, Array, Array]:
    """Diagonal ``d``, subdiagonal ``e[i] = h[i+1, i]``, superdiagonal ``f[i] = h[i, i+1]``.

    ``h`` holds the ``n x n`` matrix at rows/columns ``offset .. offset + n - 1``.
    """
    d = jnp.diagonal(h, axis1=1, axis2=2)[:, offset : offset + n]
    e = jnp.diagonal(h, offset=-1, axis1=1, axis2=2)[:, offset : offset + n - 1]
    f = jnp.diagonal(h, offset=1, axis1=1, axis2=2)[:, offset : offset + n - 1]
    return d, e, f


def _negligible(d: Array, e: Array, f: Array, relaxed: Array | None = None) -> Array:
    """Which subdiagonal entries ``e [B, n-1]`` are negligible.

    LAPACK's test (Ahues-Tisseur): ``|e|`` small next to the adjacent diagonal *and* the 2x2 it
    sits in keeps its eigenvalues to relative accuracy. The second part can refuse forever when
    that 2x2 has an eigenvalue at roundoff level (e.g. an exact zero eigenvalue); where
    ``relaxed [B]`` is set (a matrix stalled for ``_EXCEPTIONAL_PERIOD`` sweeps) the classic test
    ``|e| <= ulp (|h[k-1, k-1]| + |h[k, k]|)`` alone decides, which is still backward stable.
    """
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
    if relaxed is not None:
        fine = fine | relaxed[:, None]
    return (ae <= smlnum) | ((ae <= ulp * tst) & fine)


def _blocks(e: Array, n: int) -> tuple[Array, Array]:
    """First and last row ``[B, n]`` of the diagonal block holding each row (splits: ``e == 0``)."""
    idx = jnp.arange(n, dtype=jnp.int32)
    split = jnp.concatenate([jnp.ones_like(e[:, :1], dtype=bool), e == 0], axis=1)  # row i starts
    last = jnp.concatenate([e == 0, jnp.ones_like(e[:, :1], dtype=bool)], axis=1)  # row i ends
    start = lax.cummax(jnp.where(split, idx, 0), axis=1)
    end = lax.cummin(jnp.where(last, idx, n - 1), axis=1, reverse=True)
    return start, end


def _francis_shifts(h11: Array, h12: Array, h21: Array, h22: Array) -> Array:
    """Double shift from a 2x2 block as in ``dlahqr``: ``[..., 4]`` = (re1, im1, re2, im2).

    A complex pair is used as is; of two real eigenvalues the one closer to ``h22`` is used twice.
    """
    s = jnp.abs(h11) + jnp.abs(h12) + jnp.abs(h21) + jnp.abs(h22)
    ss = jnp.where(s > 0, s, 1)
    g11, g12, g21, g22 = h11 / ss, h12 / ss, h21 / ss, h22 / ss
    tr = 0.5 * (g11 + g22)
    det = (g11 - tr) * (g22 - tr) - g12 * g21
    rtdisc = jnp.sqrt(jnp.abs(det))
    cplx = det >= 0
    r1, r2 = tr + rtdisc, tr - rtdisc
    closer = jnp.where(jnp.abs(r1 - g22) <= jnp.abs(r2 - g22), r1, r2)
    re = jnp.where(cplx, tr, closer) * s
    im = jnp.where(cplx, rtdisc, 0) * s
    return jnp.stack([re, im, re, -im], axis=-1)


def _first_column(
    hll: Array, hl1l: Array, hll1: Array, hl1l1: Array, hl2l1: Array, shifts: Array
) -> tuple[Array, Array, Array]:
    """First column of ``(H - s1)(H - s2)`` at a block start ``l``, scaled as in ``dlahqr``.

    Args are ``h[l, l], h[l+1, l], h[l, l+1], h[l+1, l+1], h[l+2, l+1]`` and the shifts
    ``[..., 4]`` from :func:`_francis_shifts`.
    """
    rt1r, rt1i, rt2r, rt2i = (shifts[..., i] for i in range(4))
    s = jnp.abs(hll - rt2r) + jnp.abs(rt2i) + jnp.abs(hl1l)
    s = jnp.where(s > 0, s, 1)
    h21s = hl1l / s
    v1 = h21s * hll1 + (hll - rt1r) * ((hll - rt2r) / s) - rt1i * (rt2i / s)
    v2 = h21s * (hll + hl1l1 - rt1r - rt2r)
    v3 = h21s * hl2l1
    vs = jnp.abs(v1) + jnp.abs(v2) + jnp.abs(v3)
    vs = jnp.where(vs > 0, vs, 1)
    return v1 / vs, v2 / vs, v3 / vs


def _multishifts(
    h: Array, n: int, offset: int, size: int, start: Array, end: Array, active: Array
) -> tuple[list[Array], Array]:
    """``size`` shifts for the bottom-most ``_MULTISHIFT_BLOCKS`` large blocks of each matrix.

    The shifts are eigenvalue estimates of a block's trailing ``size x size`` submatrix: a few
    Francis sweeps on it, then the eigenvalues of its 2x2 diagonal blocks, as ``size / 2`` double
    shifts ``[B, n, 4]`` (bottom pair first) for the row where that block starts. Also returns
    which rows start such a block ``[B, n]``; other blocks get one bulge.
    """
    batch = h.shape[0]
    idx = jnp.arange(n, dtype=jnp.int32)
    big_end = active & (idx == end) & (end - start >= size + 1)
    rank = jnp.cumsum(big_end[:, ::-1].astype(jnp.int32), axis=1)[:, ::-1]  # big ends at/below
    slots = jnp.arange(1, _MULTISHIFT_BLOCKS + 1, dtype=jnp.int32)
    in_slot = big_end[:, :, None] & (rank[:, :, None] == slots)  # [B, n, K]
    slot_end = jnp.max(jnp.where(in_slot, idx[None, :, None], -1), axis=1)  # [B, K]
    # Gather each slot's trailing window (rows/columns end - size + 1 .. end, padded).
    first = jnp.maximum(slot_end, size - 1) - size + 1 + offset
    window = first[:, :, None] + jnp.arange(size, dtype=jnp.int32)  # [B, K, size]
    b = jnp.arange(batch)[:, None, None, None]
    t = h[b, window[:, :, :, None], window[:, :, None, :]]  # [B, K, size, size]
    t = jnp.where(jnp.tril(jnp.ones((size, size), bool), -2), 0, t)
    t = _small_francis(t, _SMALL_QR_ITERATIONS)
    shifts = [
        _francis_shifts(t[..., r, r], t[..., r, r + 1], t[..., r + 1, r], t[..., r + 1, r + 1])
        for r in range(size - 2, -1, -2)
    ]  # [B, K, 4] each
    match = (end[:, :, None] == slot_end[:, None, :]) & (slot_end >= 0)[:, None, :]  # [B, n, K]
    at_start = [jnp.sum(jnp.where(match[..., None], x[:, None], 0), axis=2) for x in shifts]
    return at_start, jnp.any(match, axis=2) & active


def _small_reflect(t: Array, k: int, v1: Array, v2: Array, tau: Array) -> Array:
    """``P t P`` for ``P = I - tau v v^T``, ``v = (1, v1, v2)`` at rows/columns ``k..k+2``."""
    size = t.shape[-1]
    m = min(3, size - k)
    v = jnp.stack([jnp.ones_like(v1), v1, v2][:m], axis=-1)  # [..., m]
    tv = tau[..., None] * v
    rows = t[..., k : k + m, :]
    rows = rows - tv[..., :, None] * jnp.sum(v[..., :, None] * rows, axis=-2, keepdims=True)
    t = jnp.concatenate([t[..., :k, :], rows, t[..., k + m :, :]], axis=-2)
    cols = t[..., :, k : k + m]
    cols = cols - jnp.sum(cols * v[..., None, :], axis=-1, keepdims=True) * tv[..., None, :]
    return jnp.concatenate([t[..., :, :k], cols, t[..., :, k + m :]], axis=-1)


def _small_francis(t: Array, iterations: int) -> Array:
    """A few Francis double-shift sweeps on a batch ``[..., s, s]`` of small Hessenberg matrices."""
    size = t.shape[-1]
    for _ in range(iterations):
        shifts = _francis_shifts(t[..., -2, -2], t[..., -2, -1], t[..., -1, -2], t[..., -1, -1])
        x = _first_column(
            t[..., 0, 0], t[..., 1, 0], t[..., 0, 1], t[..., 1, 1], t[..., 2, 1], shifts
        )
        for k in range(size - 1):
            if k > 0:
                last = t[..., k + 2, k - 1] if k + 2 < size else jnp.zeros_like(x[0])
                x = (t[..., k, k - 1], t[..., k + 1, k - 1], last)
            v1, v2, tau, _ = _householder3(*x)
            t = _small_reflect(t, k, v1, v2, tau)
    return t


def _plan_sweep(
    state: _QRState, n: int, max_iterations: int, bulges: int
) -> tuple[_QRState, _Plan]:
    """Deflate negligible subdiagonals, find the unreduced blocks, their shifts and schedule."""
    pad = _pad_width(bulges)
    h = state.h
    d, e, f = _bands(h, n, pad)
    stalled = state.kdefl >= _EXCEPTIONAL_PERIOD
    e = jnp.where(_negligible(d, e, f, stalled), 0, e)
    rows = jnp.arange(n - 1, dtype=jnp.int32) + pad
    h = h.at[:, rows + 1, rows].set(e)
    start, end = _blocks(e, n)
    nsplit = jnp.sum(e == 0, axis=1, dtype=jnp.int32)
    kdefl = jnp.where(nsplit > state.nsplit, 0, state.kdefl)
    unreduced = (end - start) >= 2
    busy = jnp.any(unreduced, axis=1) & ~state.failed
    kdefl = jnp.where(busy, kdefl + 1, kdefl)
    failed = state.failed | (busy & (kdefl > max_iterations))
    active = unreduced & ~failed[:, None]

    def at_end(x: Array, back: int) -> Array:  # x[end - back] for the block holding each row
        return jnp.take_along_axis(x, jnp.clip(end - back, 0, x.shape[1] - 1), axis=1)

    # Double shift of a single bulge: trailing 2x2 of the block, or LAPACK's exceptional shift.
    bottom = (kdefl % (2 * _EXCEPTIONAL_PERIOD) == 0)[:, None]
    exceptional = (kdefl % _EXCEPTIONAL_PERIOD == 0)[:, None]
    dm, dm1, em1, em2, fm1 = at_end(d, 0), at_end(d, 1), at_end(e, 1), at_end(e, 2), at_end(f, 1)
    e_next = jnp.concatenate([e, jnp.zeros_like(d[:, :2])], axis=1)  # e_next[i] = h[i+1, i]
    s_exc = jnp.where(
        bottom, jnp.abs(em1) + jnp.abs(em2), jnp.abs(e_next[:, :n]) + jnp.abs(e_next[:, 1 : n + 1])
    )
    diag_exc = _EXC_DIAG * s_exc + jnp.where(bottom, dm, d)
    single = _francis_shifts(
        jnp.where(exceptional, diag_exc, dm1),
        jnp.where(exceptional, _EXC_OFFDIAG * s_exc, fm1),
        jnp.where(exceptional, s_exc, em1),
        jnp.where(exceptional, diag_exc, dm),
    )  # [B, n, 4], for the block starting at each row

    idx = jnp.arange(n, dtype=jnp.int32)
    kind = jnp.where(
        start == idx, _FIRST, jnp.where(idx + 2 <= end, _CHASE, jnp.where(idx < end, _LAST, _IDLE))
    )
    kind = jnp.where(active, kind, _IDLE).astype(jnp.int32)
    if bulges == 1:
        kinds, shifts = kind[:, :, None], single[:, :, None, :]
    else:
        multi, many = _multishifts(h, n, pad, 2 * bulges, start, end, active)
        many = many & ~exceptional & ~stalled[:, None]  # stalled: back to one bulge
        shifts = jnp.stack(
            [jnp.where(many[:, :, None], multi[0], single)]
            + [jnp.where(many[:, :, None], m, 0) for m in multi[1:]],
            axis=2,
        )
        kinds = jnp.stack([kind] + [jnp.where(many, kind, _IDLE) for _ in range(1, bulges)], axis=2)
    # Bulge j acts at step t on row t - _SPACING * j: shift its schedule by _SPACING * j steps.
    lag = _SPACING * (bulges - 1)

    def delay(x: Array, j: int) -> Array:  # bulge j's column of x, padded along the rows
        widths = [(0, 0)] * (x.ndim - 1)
        widths[1] = (_SPACING * j, lag - _SPACING * j)
        return jnp.pad(x[:, :, j], widths)

    kinds = jnp.stack([delay(kinds, j) for j in range(bulges)], axis=2)  # [B, n + lag, M]
    shifts = jnp.stack([delay(shifts, j) for j in range(bulges)], axis=2)
    steps = jnp.arange(n + lag, dtype=jnp.int32)[None, :, None]
    busy_step = kinds != _IDLE
    t0 = jnp.min(jnp.where(busy_step, steps, n + lag)).astype(jnp.int32)
    t1 = jnp.max(jnp.where(busy_step, steps + 1, 0)).astype(jnp.int32)
    sweeping = jnp.any(active, axis=1)
    new_state = state._replace(
        h=h,
        kdefl=kdefl,
        nsplit=nsplit,
        failed=failed,
        iterations=state.iterations + sweeping.astype(jnp.int32),
        more=jnp.any(sweeping),
    )
    return new_state, _Plan(kind=kinds, shifts=shifts, t0=t0, t1=t1)


def _split_band(band: Array, axis: int) -> Array:
    """``[B, 4M-1, P]`` (axis 1) or ``[B, P, 4M-1]`` (axis 2) -> ``[B, M, 4, P]`` per bulge.

    Bulge ``j`` owns band entries ``4(M-1-j) .. 4(M-1-j) + 2``; entry 3 of each group is the
    untouched row/column between two bulges (zero padding for the last group).
    """
    if axis == 2:
        band = jnp.swapaxes(band, 1, 2)
    batch, span, width = band.shape
    bulges = (span + 1) // _SPACING
    band = jnp.pad(band, ((0, 0), (0, 1), (0, 0)))
    return band.reshape(batch, bulges, _SPACING, width)[:, ::-1]  # group j = bulge j


def _merge_band(groups: Array, axis: int) -> Array:
    """Inverse of :func:`_split_band`."""
    batch, bulges, _, width = groups.shape
    band = groups[:, ::-1].reshape(batch, bulges * _SPACING, width)[:, :-1]
    return jnp.swapaxes(band, 1, 2) if axis == 2 else band


def _reflect_band(band: Array, refl: Array, axis: int) -> Array:
    """Apply every bulge's reflector ``refl [4, M, B]`` to its three rows (or columns) of a band."""
    g = _split_band(band, axis)  # [B, M, 4, P]
    v1, v2, tau = (refl[i].T[:, :, None] for i in range(3))  # [B, M, 1]
    s = (g[:, :, 0] + v1 * g[:, :, 1] + v2 * g[:, :, 2]) * tau  # [B, M, P]
    coef = jnp.stack([jnp.ones_like(v1), v1, v2, jnp.zeros_like(v1)], axis=2)  # [B, M, 4, 1]
    return _merge_band(g - coef * s[:, :, None, :], axis)


def _band_where(band: Array, mask: Array, values: Array) -> Array:
    """Row band with group entries ``0..2`` of bulge ``j`` set to ``values[j]`` where ``mask[j]``.

    ``mask [M, B, P]`` selects columns, ``values [M, B, 3]``.
    """
    g = _split_band(band, 1)  # [B, M, 4, P]
    m = jnp.moveaxis(mask, 0, 1)[:, :, None, :] & (jnp.arange(_SPACING) < 3)[None, None, :, None]
    vals = jnp.pad(jnp.moveaxis(values, 0, 1), ((0, 0), (0, 0), (0, 1)))[:, :, :, None]
    return _merge_band(jnp.where(m, vals, g), 1)


def _bulge_step(t: Array, h: Array, z: Array | None, plan: _Plan) -> tuple[Array, Array | None]:
    """Move every bulge of every matrix one row down (identity where idle).

    At step ``t`` bulge ``j`` is at row ``k = t - 4j``: its reflector acts on rows and columns
    ``k..k+2``. The reflectors of one step touch disjoint rows and read columns no other one
    writes, so they are computed together from one small window and applied one after another
    within the step.
    """
    batch, width = h.shape[0], h.shape[-1]
    bulges = plan.kind.shape[2]
    span = _SPACING * (bulges - 1) + 3  # rows/columns the step touches
    t = t.astype(jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    kind = lax.dynamic_index_in_dim(plan.kind, t, axis=1, keepdims=False).T  # [M, B]
    shifts = jnp.moveaxis(lax.dynamic_index_in_dim(plan.shifts, t, axis=1, keepdims=False), 0, 1)
    # Window from the last bulge's row (padded row t + 1) and its input column (t).
    win = lax.dynamic_slice(h, (zero, t + 1, t), (batch, span, span))
    offsets = [_SPACING * (bulges - 1 - j) for j in range(bulges)]  # bulge j's row in win

    def entry(dr: int, dc: int) -> Array:  # win[r0 + dr, r0 + dc] of every bulge, [M, B]
        return jnp.stack([win[:, r0 + dr, r0 + dc] for r0 in offsets])

    first = kind == _FIRST
    v = _first_column(entry(0, 1), entry(1, 1), entry(0, 2), entry(1, 2), entry(2, 2), shifts)
    x0 = jnp.where(first, v[0], entry(0, 0))
    x1 = jnp.where(first, v[1], entry(1, 0))
    x2 = jnp.where(first, v[2], jnp.where(kind == _LAST, 0, entry(2, 0)))
    v1, v2, tau, beta = _householder3(x0, x1, x2)
    tau = jnp.where(kind == _IDLE, 0, tau)
    # Materialise the reflectors before H is updated in place: otherwise XLA fuses their
    # computation into the update kernels, which then need a full copy of H per step.
    refl = lax.optimization_barrier(jnp.stack([v1, v2, tau, beta]))  # [4, M, B]
    # Apply all reflectors to the band of rows t+1 .. t+span, then of columns, in one pass each.
    rows = lax.dynamic_slice_in_dim(h, t + 1, span, axis=1)
    rows = _reflect_band(rows, refl, axis=1)
    # The column each chased bulge came from becomes (beta, 0, 0) exactly.
    bulge_rows = t + 1 + jnp.asarray(offsets, dtype=jnp.int32)  # [M] padded rows
    chased = (kind >= _CHASE)[:, :, None] & (
        jnp.arange(width, dtype=jnp.int32)[None, None, :] == bulge_rows[:, None, None] - 1
    )  # [M, B, P]
    fixed = jnp.stack([refl[3], jnp.zeros_like(refl[3]), jnp.zeros_like(refl[3])], axis=-1)
    rows = _band_where(rows, chased, fixed)
    h = lax.dynamic_update_slice_in_dim(h, rows, t + 1, axis=1)
    cols = _reflect_band(lax.dynamic_slice_in_dim(h, t + 1, span, axis=2), refl, axis=2)
    h = lax.dynamic_update_slice_in_dim(h, cols, t + 1, axis=2)
    if z is not None:
        zc = _reflect_band(lax.dynamic_slice_in_dim(z, t + 1, span, axis=2), refl, axis=2)
        z = lax.dynamic_update_slice_in_dim(z, zc, t + 1, axis=2)
    return h, z


def _francis_qr(
    h: Array, z: Array | None, max_iterations: int, bulges: int = _BULGES
) -> tuple[Array, Array | None, Array, Array]:
    """Real Schur form of a Hessenberg batch ``[B, n, n]`` (and ``z @ Q`` when ``z`` is given).

    Returns ``T [B, n, n]`` (quasi-triangular, exact zeros between diagonal blocks), the
    updated ``z``, the number of sweeps each matrix took part in ``[B]`` and the failure flags
    ``[B]``.
    """
    batch, n, _ = h.shape
    if n < 3:
        return h, z, jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool)
    pad = _pad_width(bulges)
    hp = jnp.pad(h, ((0, 0), (pad, pad), (pad, pad)))
    zp = None if z is None else jnp.pad(z, ((0, 0), (0, 0), (pad, pad)))
    zeros = jnp.zeros((batch,), jnp.int32)
    state = _QRState(
        h=hp,
        z=zp,
        kdefl=zeros,
        nsplit=zeros,
        failed=jnp.zeros((batch,), bool),
        iterations=zeros,
        sweeps=jnp.zeros((), jnp.int32),
        more=jnp.ones((), bool),
    )
    # Every sweep either deflates or counts towards some matrix's cap: a hard bound.
    cap = n * (max_iterations + 1) + 1

    def sweep(state: _QRState) -> _QRState:
        state, plan = _plan_sweep(state, n, max_iterations, bulges)

        def body(t: Array, carry: tuple[Array, Array | None]) -> tuple[Array, Array | None]:
            return _bulge_step(t, carry[0], carry[1], plan)

        h, z = lax.fori_loop(plan.t0, plan.t1, body, (state.h, state.z))
        return state._replace(h=h, z=z, sweeps=state.sweeps + 1)

    def cond(state: _QRState) -> Array:
        return state.more & (state.sweeps < cap)

    state = lax.while_loop(cond, sweep, state)
    z_out = None if state.z is None else state.z[:, :, pad : pad + n]
    return state.h[:, pad : pad + n, pad : pad + n], z_out, state.iterations, state.failed


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


def default_bulges(platform: str) -> int:
    """Bulges (double shifts) per QR sweep that :func:`solve` chases on ``platform``.

    One on ``"cpu"``, where a step's cost grows with its work; ``2`` elsewhere (GPU, TPU), where
    the cost of a step should be dominated by launch/loop overhead, so that two bulges (~40%
    fewer sequential steps) win.
    """
    return 1 if platform == "cpu" else _BULGES


def _schur(
    h: Array, q: Array | None, max_iterations: int, bulges: int | None
) -> tuple[Array, Array | None, Array, Array]:
    """:func:`_francis_qr` with ``bulges`` chosen per platform (:func:`default_bulges`) when None.

    ``lax.platform_dependent`` resolves the choice when the program is lowered, so exported
    programs get the right variant for their platform.
    """
    if bulges is not None:
        return _francis_qr(h, q, max_iterations, bulges)
    return lax.platform_dependent(
        h,
        q,
        cpu=functools.partial(_francis_qr, max_iterations=max_iterations, bulges=1),
        default=functools.partial(_francis_qr, max_iterations=max_iterations, bulges=_BULGES),
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EigResult:
    """What :func:`solve` returns (a pytree).

    Attributes:
        values: ``[..., n]`` eigenvalues (complex64, or complex128 for float64 input), unsorted,
            in the order of the diagonal of the real Schur form; complex conjugate pairs are
            adjacent with the positive imaginary part first.
        vectors: ``[..., n, n]`` unit right eigenvectors (columns),
            ``a @ vectors[..., :, k] = values[..., k] * vectors[..., :, k]``, whose
            largest-magnitude entry is real and positive (for a defective eigenvalue they are
            nearly parallel, as with LAPACK); None unless requested.
        converged: ``[...]`` bool; where False (non-finite input, or no convergence within the
            cap) values and vectors are NaN.
        iterations: ``[...]`` int32, the QR sweeps in which the matrix still had an unreduced
            block. The batch moves in lock step: the largest count sets the run time.
    """

    values: Array
    vectors: Array | None
    converged: Array
    iterations: Array


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _solve(a: Array, want_vectors: bool, max_iterations: int, bulges: int | None) -> EigResult:
    """:func:`solve` for a flat batch ``[B, n, n]``, checked arguments.

    Jitted so that eager calls run one compiled program (inlined under an outer ``jit``).
    Under ``jax.vmap`` the mapped axis is folded into the batch axis (a custom batching rule),
    so a vmapped call runs the same lock-step program as a batched one.
    """

    @jax.custom_batching.custom_vmap
    def solve(x: Array) -> tuple[Array, ...]:
        result = _solve_batch(x, want_vectors, max_iterations, bulges)
        out = (result.values, result.vectors, result.converged, result.iterations)
        return tuple(x for x in out if x is not None)

    @solve.def_vmap
    def _fold_mapped_axis(
        axis_size: int, in_batched: list[bool], x: Array
    ) -> tuple[tuple[Array, ...], tuple[bool, ...]]:
        if not in_batched[0]:
            out = solve(x)
            return out, tuple(False for _ in out)
        out = solve(x.reshape(-1, *x.shape[2:]))  # [V, B, n, n] -> [V * B, n, n]
        return tuple(o.reshape(axis_size, -1, *o.shape[1:]) for o in out), tuple(True for _ in out)

    out = solve(a)
    if not want_vectors:
        out = (out[0], None, *out[1:])
    return EigResult(*out)


def _solve_batch(
    a: Array, want_vectors: bool, max_iterations: int, bulges: int | None
) -> EigResult:
    batch, n, _ = a.shape
    cdtype = _complex_dtype(a.dtype)
    a, scale, finite = _prepare(a)
    h, q = _hessenberg(a, want_vectors)
    t, z, iterations, failed = _schur(h, q, max_iterations, bulges)
    re, im, small = _schur_eigvals(t)
    converged = finite & ~failed & small
    nan = jnp.array(jnp.nan, dtype=re.dtype)
    w_unit = lax.complex(re, im)  # eigenvalues of the scaled matrix
    w = lax.complex(re * scale[:, None], im * scale[:, None])
    w = jnp.where(converged[:, None], w, lax.complex(nan, nan))
    if not want_vectors:
        return EigResult(w, None, converged, iterations)
    assert z is not None
    u = _triangularise_blocks(t, w_unit)
    tc = jnp.einsum("bji,bjk,bkl->bil", jnp.conj(u), t.astype(cdtype), u, precision=HIGHEST)
    tc = jnp.triu(tc, 1) + jax.vmap(jnp.diag)(w_unit)
    zc = jnp.einsum("bij,bjk->bik", z.astype(cdtype), u, precision=HIGHEST)
    x = _triangular_eigvecs(tc, w_unit)
    v = jnp.einsum("bij,bjk->bik", zc, x, precision=HIGHEST)
    v = _normalise_columns(v)
    v = jnp.where(converged[:, None, None], v, lax.complex(nan, nan))
    return EigResult(w, v, converged, iterations)


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


def _check_bulges(bulges: int | None, fn: str) -> int | None:
    if bulges is None:
        return None
    if isinstance(bulges, bool) or not isinstance(bulges, (int, np.integer)) or bulges < 1:
        raise ValueError(f"{fn}: bulges must be None or an int >= 1, got {bulges!r}")
    return int(bulges)


def solve(
    a: Any, *, vectors: bool = False, max_iterations: int | None = None, bulges: int | None = None
) -> EigResult:
    """Eigenvalues (and right eigenvectors) of real square matrices, batched, in pure JAX.

    No LAPACK: the same program runs on CPU, GPU and TPU and vectorises over the batch.

    Args:
        a: ``[..., n, n]`` real floating-point matrices (bfloat16/float16 are computed in
            float32). Complex input raises ``TypeError``.
        vectors: also compute unit right eigenvectors.
        max_iterations: cap on QR sweeps of one matrix without a deflation (default
            :data:`DEFAULT_MAX_ITERATIONS`).
        bulges: bulges chased per QR sweep; None (default) is :func:`default_bulges` of the
            platform the program runs on.

    Returns:
        An :class:`EigResult` with leading axes ``[...]``.
    """
    fn = "solve"
    a = _check_input(a, fn)
    max_it = _check_max_iterations(max_iterations, fn)
    bulges = _check_bulges(bulges, fn)
    batch_shape, n = a.shape[:-2], a.shape[-1]
    size = int(np.prod(batch_shape, dtype=np.int64))
    if size == 0 or n == 0:
        cdtype = _complex_dtype(a.dtype)
        return EigResult(
            values=jnp.zeros((*batch_shape, n), cdtype),
            vectors=jnp.zeros((*batch_shape, n, n), cdtype) if vectors else None,
            converged=jnp.ones(batch_shape, bool),
            iterations=jnp.zeros(batch_shape, jnp.int32),
        )
    result = _solve(a.reshape((size, n, n)), bool(vectors), max_it, bulges)
    return jax.tree_util.tree_map(lambda x: x.reshape(batch_shape + x.shape[1:]), result)
