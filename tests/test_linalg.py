"""Factored linear algebra against float64 NumPy and TransformerLens 3.9.0."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import (
    align_signs,
    assert_rel_close,
    decomposition_operand_shapes,
    match_multiset,
    random_factors,
    singular_vector_rtol,
    to_numpy,
    to_torch,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import lowrank
from lowrank import FactoredMatrix, eig, eigvals, low_rank_approx, norm, svd, svdvals, trace
from lowrank._deadlock import after, one_matrix_per_call

LEAD = (2, 3)


@pytest.fixture(scope="module")
def tl():
    from transformer_lens import FactoredMatrix as TLFactoredMatrix

    return TLFactoredMatrix


@pytest.fixture(params=[(40, 8, 30), (40, 8, 40), (30, 8, 40)], ids=["tall", "square", "wide"])
def factors(request):
    l, m, r = request.param
    return random_factors(np.random.default_rng(10), LEAD, l, m, r)


def dense(A, B):
    return np.asarray(A, np.float64) @ np.asarray(B, np.float64)


def reconstruct(U, S, Vh):
    return (np.asarray(U, np.float64) * np.asarray(S, np.float64)[..., None, :]) @ np.asarray(
        Vh, np.float64
    )


# ---------------------------------------------------------------------- parity
def test_svd_matches_tl_and_numpy(tl, factors):
    A, B = factors
    M, R = FactoredMatrix(A, B), tl(to_torch(A), to_torch(B))
    U, S, Vh = svd(M)
    k = min(A.shape[-2], 8, B.shape[-1])
    assert U.shape == (*LEAD, A.shape[-2], k) and S.shape == (*LEAD, k)
    assert Vh.shape == (*LEAD, k, B.shape[-1])
    U_np, S_np, Vh_np = np.linalg.svd(dense(A, B), full_matrices=False)
    assert_rel_close(S, S_np[..., :k], what="S vs numpy")
    assert_rel_close(S, to_numpy(R.S), what="S vs TL")
    assert_rel_close(M.S, S, what="M.S")
    assert_rel_close(reconstruct(U, S, Vh), dense(A, B), what="U S Vh == AB")
    spectra = S_np.reshape(-1, S_np.shape[-1])
    vec_rtol = max(singular_vector_rtol(s, k) for s in spectra)
    # TL's vectors come from a float32 SVD too: twice the tolerance against them.
    U_tl = align_signs(to_numpy(R.U), np.asarray(U), axis=-2)
    assert_rel_close(U, U_tl, 2 * vec_rtol, what="U vs TL")
    # TransformerLens's V (and its deprecated Vh) are right singular vectors as columns.
    V_tl = align_signs(to_numpy(R.V), np.asarray(M.V), axis=-2)
    assert_rel_close(M.V, V_tl, 2 * vec_rtol, what="V vs TL")
    np.testing.assert_array_equal(M.V, np.swapaxes(M.Vh, -1, -2))
    np.testing.assert_array_equal(M.U, U)
    Vh_ref = align_signs(Vh_np[..., :k, :], np.asarray(Vh), axis=-1)
    assert_rel_close(M.Vh, Vh_ref, vec_rtol, what="Vh")


def test_collapse_and_make_even_match_tl(tl, factors):
    A, B = factors
    M, R = FactoredMatrix(A, B), tl(to_torch(A), to_torch(B))
    U, S, Vh = svd(M)
    # Singular vectors are defined up to sign: align TL's to ours before comparing.
    sign = np.sign(np.sum(to_numpy(R.U) * np.asarray(U), axis=-2))
    assert_rel_close(M.collapse_l(), sign[..., :, None] * to_numpy(R.collapse_l()), what="l")
    assert_rel_close(M.collapse_r(), sign[..., None, :] * to_numpy(R.collapse_r()), what="r")
    even, even_tl = M.make_even(), R.make_even()
    assert_rel_close(even.AB, dense(A, B), what="make_even keeps the matrix")
    assert_rel_close(even.A, sign[..., None, :] * to_numpy(even_tl.A), what="make_even A")
    assert_rel_close(even.B, sign[..., :, None] * to_numpy(even_tl.B), what="make_even B")
    gram_a = np.swapaxes(np.asarray(even.A), -1, -2) @ np.asarray(even.A)
    gram_b = np.asarray(even.B) @ np.swapaxes(np.asarray(even.B), -1, -2)
    assert_rel_close(gram_a, gram_b, what="balanced factors")


def test_eigenvalues_match_tl_and_numpy(tl):
    A, B = random_factors(np.random.default_rng(11), LEAD, 40, 8, 40)
    M, R = FactoredMatrix(A, B), tl(to_torch(A), to_torch(B))
    ours = np.asarray(M.eigenvalues)
    assert ours.shape == (*LEAD, 8) and ours.dtype == np.complex64
    assert_rel_close(match_multiset(ours, to_numpy(R.eigenvalues)), to_numpy(R.eigenvalues))
    full = np.linalg.eigvals(dense(A, B))  # 40 eigenvalues, 32 of them ~0
    nonzero = np.take_along_axis(full, np.argsort(-np.abs(full), axis=-1), axis=-1)[..., :8]
    assert_rel_close(match_multiset(ours, nonzero), nonzero, what="vs numpy")


def test_norm_matches_tl_and_numpy(tl, factors):
    A, B = factors
    M, R = FactoredMatrix(A, B), tl(to_torch(A), to_torch(B))
    expected = np.linalg.norm(dense(A, B), axis=(-2, -1))
    assert_rel_close(norm(M), expected, what="vs numpy")
    assert_rel_close(M.norm(), to_numpy(R.norm()), what="vs TL")


@pytest.mark.parametrize(("l", "m", "r"), [(40, 8, 30), (5, 30, 6)])
def test_norm_uses_either_association(l, m, r):
    A, B = random_factors(np.random.default_rng(12), LEAD, l, m, r)
    assert_rel_close(norm(FactoredMatrix(A, B)), np.linalg.norm(dense(A, B), axis=(-2, -1)))


def test_trace():
    A, B = random_factors(np.random.default_rng(13), LEAD, 20, 6, 20)
    M = FactoredMatrix(A, B)
    assert_rel_close(trace(M), np.trace(dense(A, B), axis1=-2, axis2=-1))
    assert_rel_close(M.trace(), np.real(np.sum(np.linalg.eigvals(dense(A, B)), axis=-1)))


@pytest.mark.parametrize(("l", "m"), [(12, 4), (5, 9)], ids=["m<l", "m>l"])
def test_eig_vectors(l, m):
    A, B = random_factors(np.random.default_rng(14), LEAD, l, m, l)
    M = FactoredMatrix(A, B)
    w, v = eig(M)
    k = min(l, m)
    assert w.shape == (*LEAD, k) and v.shape == (*LEAD, l, k)
    AB = dense(A, B)
    v64, w64 = np.asarray(v, np.complex128), np.asarray(w, np.complex128)
    assert_rel_close(AB @ v64, v64 * w64[..., None, :], rtol=1e-4, what="A B v = w v")
    assert_rel_close(np.linalg.norm(v64, axis=-2), np.ones((*LEAD, k)), what="unit vectors")
    np.testing.assert_array_equal(w, M.eig()[0])


def test_low_rank_approx_is_truncated_svd():
    A, B = random_factors(np.random.default_rng(15), LEAD, 20, 8, 25)
    approx = low_rank_approx(FactoredMatrix(A, B), 3)
    assert isinstance(approx, FactoredMatrix) and approx.mdim == 3
    U, S, Vh = np.linalg.svd(dense(A, B), full_matrices=False)
    assert_rel_close(approx.AB, reconstruct(U[..., :3], S[..., :3], Vh[..., :3, :]))
    dense_approx = low_rank_approx(jnp.asarray(dense(A, B), jnp.float32), 3)
    assert_rel_close(dense_approx.AB, approx.AB)


@pytest.mark.parametrize("k", [0, 9, 2.0, True])
def test_low_rank_approx_bad_k(k):
    A, B = random_factors(np.random.default_rng(15), (), 20, 8, 25)
    with pytest.raises(ValueError, match=r"k must be an integer in 1\.\.8.*\(20, 25\)"):
        low_rank_approx(FactoredMatrix(A, B), k)


# ---------------------------------------------------------- dense-array inputs
def test_dense_inputs_match_numpy():
    x = np.random.default_rng(16).standard_normal((3, 7, 7)).astype(np.float32)
    x64 = x.astype(np.float64)
    U, S, Vh = svd(jnp.asarray(x))
    assert_rel_close(reconstruct(U, S, Vh), x64)
    assert_rel_close(svdvals(x), np.linalg.svd(x64, compute_uv=False))
    ev = np.linalg.eigvals(x64)
    assert_rel_close(match_multiset(eigvals(x), ev), ev)
    assert_rel_close(match_multiset(eig(x)[0], ev), ev)
    assert_rel_close(norm(x), np.linalg.norm(x64, axis=(-2, -1)))
    assert_rel_close(trace(x), np.trace(x64, axis1=-2, axis2=-1))


# ------------------------------------------------------------ half precision
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_computes_in_float32(dtype):
    A, B = random_factors(np.random.default_rng(17), (2,), 16, 4, 16)
    M = FactoredMatrix(jnp.asarray(A, dtype), jnp.asarray(B, dtype))
    A64, B64 = np.asarray(M.A, np.float64), np.asarray(M.B, np.float64)  # the rounded inputs
    AB = A64 @ B64
    S = svdvals(M)
    assert S.dtype == jnp.float32
    assert_rel_close(S, np.linalg.svd(AB, compute_uv=False)[..., :4])
    ev = eigvals(M)
    assert ev.dtype == jnp.complex64
    expected = np.linalg.eigvals(B64 @ A64)
    assert_rel_close(match_multiset(ev, expected), expected)
    assert norm(M).dtype == jnp.float32
    assert_rel_close(norm(M), np.linalg.norm(AB, axis=(-2, -1)))
    assert svd(M)[0].dtype == jnp.float32 and eig(M)[1].dtype == jnp.complex64


# ----------------------------------------------------------- property tests
# (l, m, r): a fixed set, so that each jitted function compiles once per shape, not per
# example. It covers m < min(l, r) (the Cholesky path), m == l, m > min(l, r) with l or with r
# the smallest (Householder QR), tall, wide and square products, and sizes of 1. (Square
# products for eigvals use (l, m, l).)
PROPERTY_SHAPES = [
    (1, 1, 1),
    (12, 4, 10),
    (7, 7, 12),
    (5, 12, 9),
    (10, 16, 3),
    (1, 6, 8),
    (9, 3, 1),
]


@st.composite
def factor_shapes(draw):
    l, m, r = draw(st.sampled_from(PROPERTY_SHAPES))
    rank = draw(st.integers(1, m))  # rank-deficient factors included
    seed = draw(st.integers(0, 2**31 - 1))
    return l, m, r, rank, seed


def _low_rank_factors(l, m, r, rank, seed):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((l, rank)) @ rng.standard_normal((rank, m))
    B = rng.standard_normal((m, r))
    return A.astype(np.float32), B.astype(np.float32)


PROPERTY_SETTINGS = settings(max_examples=40, deadline=None)
# Module-level jits: compiled once per shape for the whole file (test_jit_matches_eager checks
# that jit and eager agree).
_jit_svd, _jit_norm, _jit_eigvals = jax.jit(svd), jax.jit(norm), jax.jit(eigvals)


@PROPERTY_SETTINGS
@given(factor_shapes())
def test_property_svd(shape):
    A, B = _low_rank_factors(*shape)
    U, S, Vh = (np.asarray(x, np.float64) for x in _jit_svd(FactoredMatrix(A, B)))
    AB = dense(A, B)
    k = min(A.shape[0], A.shape[1], B.shape[1])
    assert U.shape == (A.shape[0], k) and S.shape == (k,) and Vh.shape == (k, B.shape[1])
    assert np.all(np.diff(S) <= 1e-6 * S[0]) and np.all(S >= 0)
    assert_rel_close(reconstruct(U, S, Vh), AB, what="U S Vh == AB")
    assert_rel_close(U.T @ U, np.eye(k), what="U orthonormal")
    assert_rel_close(Vh @ Vh.T, np.eye(k), what="Vh orthonormal")
    assert_rel_close(S, np.linalg.svd(AB, compute_uv=False)[:k], what="S")


@PROPERTY_SETTINGS
@given(factor_shapes())
def test_property_norm(shape):
    A, B = _low_rank_factors(*shape)
    assert_rel_close(_jit_norm(FactoredMatrix(A, B)), np.linalg.norm(dense(A, B)))


# (l, m) for square products (l, m, l): a 1 x 1 core, and m < l, m == l, m > l (the core is
# B A, either, A B). Fewer than PROPERTY_SHAPES: each eigvals compile traces the eigensolver.
EIGVALS_SHAPES = [(1, 6), (12, 4), (7, 7), (5, 12)]


@PROPERTY_SETTINGS
@given(st.sampled_from(EIGVALS_SHAPES), st.data())
def test_property_eigvals(lm, data):
    l, m = lm
    rank = data.draw(st.integers(1, m))  # rank-deficient factors included
    seed = data.draw(st.integers(0, 2**31 - 1))
    A, B = _low_rank_factors(l, m, l, rank, seed)
    ours = np.asarray(_jit_eigvals(FactoredMatrix(A, B)), np.complex128)
    assert ours.shape == (min(l, m),)
    full = np.linalg.eigvals(dense(A, B))  # l eigenvalues; ours holds the nonzero ones + zeros
    padded = np.concatenate([ours, np.zeros(l - ours.shape[0])])
    scale = np.linalg.norm(dense(A, B), 2)
    # Products of random factors have well-conditioned (semisimple) spectra, zeros included.
    assert np.max(np.abs(match_multiset(padded, full) - full), initial=0) <= 1e-3 * scale


# ------------------------------------------------- fast path and its fallback
def _ill_conditioned_batch():
    """Four [12, 4] @ [4, 10] products; in element 2, two columns of A nearly coincide."""
    A, B = random_factors(np.random.default_rng(22), (4,), 12, 4, 10)
    A[2, :, 1] = A[2, :, 0] + 1e-5 * A[2, :, 1]
    return A, B


def test_ill_conditioned_factors_fall_back_to_householder_qr():
    from lowrank._deadlock import Serial
    from lowrank.linalg import _SVDVALS_MAX_COND, _factor_cholesky

    A, B = _ill_conditioned_batch()
    M = FactoredMatrix(A, B)
    _, cond = jax.jit(lambda M: _factor_cholesky(Serial(), M))(M)
    assert not cond[2] <= _SVDVALS_MAX_COND and np.all(np.asarray(cond)[[0, 1, 3]] < 100)
    AB = dense(A, B)
    U_np, S_np, Vh_np = np.linalg.svd(AB, full_matrices=False)
    # vmap turns the fallback's cond into a select (jitted: the same program, compiled once)
    for transform in (lambda f: f, jax.jit, lambda f: jax.jit(jax.vmap(f))):
        assert_rel_close(transform(svdvals)(M), S_np[..., :4], what="svdvals")
        U, S, Vh = transform(svd)(M)
        assert_rel_close(reconstruct(U, S, Vh), AB, what="svd")
        U64 = np.asarray(U, np.float64)
        assert_rel_close(np.swapaxes(U64, -1, -2) @ U64, np.broadcast_to(np.eye(4), (4, 4, 4)))


# ------------------------------------------------------------ jit and vmap
FUNCTIONS = {
    "svd": svd,
    "svdvals": svdvals,
    "eigvals": eigvals,
    "eig": eig,
    "norm": norm,
    "trace": trace,
    "low_rank_approx": lambda M: low_rank_approx(M, 2).AB,
    "collapse_l": lambda M: M.collapse_l(),
    "collapse_r": lambda M: M.collapse_r(),
    "make_even": lambda M: M.make_even().AB,
    "get_corner": lambda M: M.get_corner(2),
}


@pytest.mark.parametrize("name", FUNCTIONS)
def test_jit_matches_eager(name):
    A, B = random_factors(np.random.default_rng(18), LEAD, 9, 4, 9)
    M = FactoredMatrix(A, B)
    fn = FUNCTIONS[name]
    eager, jitted = fn(M), jax.jit(fn)(M)
    for e, j in zip(
        jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted), strict=True
    ):
        assert_rel_close(j, e, rtol=1e-5, what=name)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("name", FUNCTIONS)
def test_vmap_matches_batched(name, axis):
    A, B = random_factors(np.random.default_rng(19), LEAD, 9, 4, 9)
    M = FactoredMatrix(A, B)
    fn = FUNCTIONS[name]
    # Jitted (the batching rules are the same as eager vmap's): jax.jit(fn) is compiled once,
    # shared with test_jit_matches_eager (same shapes), which checks jit against eager.
    batched = jax.jit(fn)(M)
    mapped = jax.jit(jax.vmap(fn, in_axes=axis, out_axes=axis))(M)
    for b, v in zip(
        jax.tree_util.tree_leaves(batched), jax.tree_util.tree_leaves(mapped), strict=True
    ):
        if name == "get_corner":  # the corner also slices leading axes
            b = np.asarray(fn(M.broadcast()))
            v = np.asarray(v)[:2, :2]
        assert_rel_close(v, b, rtol=1e-5, what=name)


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("fn", [norm, svdvals], ids=["norm", "svdvals"])
def test_grad_matches_finite_differences(fn):
    rng = np.random.default_rng(20)
    with jax.enable_x64(True):
        A = jnp.asarray(rng.standard_normal((2, 7, 3)))
        B = jnp.asarray(rng.standard_normal((2, 3, 6)))
        weights = jnp.asarray(rng.standard_normal((2, 3)) if fn is svdvals else rng.random(2))

        @jax.jit  # one compiled program per derivative, not op-by-op dispatch
        def loss(A, B):
            return jnp.sum(weights * fn(FactoredMatrix(A, B)))

        check_grads(loss, (A, B), order=1, modes=("rev", "fwd"), atol=1e-6, rtol=1e-6)
        grad_A = jax.grad(loss)(A, B)
        assert grad_A.shape == A.shape and grad_A.dtype == jnp.float64


def test_grad_of_norm_wrt_factored_matrix():
    A, B = random_factors(np.random.default_rng(21), (), 6, 2, 5)
    g = jax.grad(lambda M: norm(M))(FactoredMatrix(A, B))
    AB = dense(A, B)
    expected = (AB / np.linalg.norm(AB)) @ np.asarray(B, np.float64).T  # d||AB||/dA
    assert isinstance(g, FactoredMatrix)
    assert_rel_close(g.A, expected)


# ------------------------------------------------------------ extreme scales
# Factors scaled by 1e15 (1e-15) each make products of scale 1e30 (1e-30): representable in
# float32, but beyond what jaxlib's geev (wrong above ~5e11, below ~1e-12) and squared entries
# survive. assert_rel_close treats values below 1e-30 as zero: compare in units of the scale.
def _float64(x):
    x = np.asarray(x)
    return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def _rel_close_in_units(actual, expected, unit, what=""):
    unit = np.float64(unit)
    assert_rel_close(_float64(actual) / unit, _float64(expected) / unit, what=what)


@pytest.mark.parametrize("scale", [1e15, 1e-15])
def test_eigvals_and_eig_at_extreme_scales(scale):
    A, B = random_factors(np.random.default_rng(30), (3,), 10, 4, 10)
    A, B = A * np.float32(scale), B * np.float32(scale)
    A[0] = 0  # a zero matrix still gives zeros
    M = FactoredMatrix(A, B)
    core = dense(B, A)  # the float64 m x m matrix whose eigenvalues are computed
    expected = np.linalg.eigvals(core)
    unit = scale**2
    for transform in (lambda f: f, jax.jit):
        w = transform(eigvals)(M)
        _rel_close_in_units(match_multiset(w, expected), expected, unit, what="eigvals")
        w, v = transform(eig)(M)
        _rel_close_in_units(match_multiset(w, expected), expected, unit, what="eig")
        np.testing.assert_array_equal(w[0], 0)
        v64, w64 = _float64(v)[1:], _float64(w)[1:]
        _rel_close_in_units(dense(A, B)[1:] @ v64, v64 * w64[..., None, :], unit, "A B v = w v")
    # The pure-JAX solver (used off CPU) scales its input itself.
    pure = lowrank.eigensolver.solve(jnp.asarray(core, jnp.float32)).values
    _rel_close_in_units(match_multiset(pure, expected), expected, unit, what="pure-JAX solver")
    x = np.random.default_rng(31).standard_normal((2, 6, 6)).astype(np.float32) * unit
    expected = np.linalg.eigvals(x.astype(np.float64))
    for fn in (eigvals, lambda x: eig(x)[0], jax.jit(eigvals)):
        _rel_close_in_units(match_multiset(fn(x), expected), expected, unit, what="dense")


@pytest.mark.parametrize("scale", [1e18, 1e15, 1e-15, 1e-19])
@pytest.mark.parametrize(("l", "m", "r"), [(10, 4, 8), (5, 12, 6)], ids=["gram", "product"])
def test_norm_and_its_grad_at_extreme_scales(scale, l, m, r):
    A, B = random_factors(np.random.default_rng(32), (3,), l, m, r)
    A, B = A * np.float32(scale), B * np.float32(scale)
    A[0] = 0  # norm 0, gradient 0 (a subgradient)
    M = FactoredMatrix(A, B)
    AB = dense(A, B)
    expected = np.linalg.norm(AB, axis=(-2, -1))
    info = np.finfo(np.float32)
    assert np.all(expected[1:] > 10 * info.tiny) and np.all(expected < info.max)
    # d||AB||/dA = (AB / ||AB||) B^T and d||AB||/dB = A^T (AB / ||AB||); 0 where AB = 0
    unit = AB / np.where(expected > 0, expected, 1)[:, None, None]
    A64, B64 = A.astype(np.float64), B.astype(np.float64)
    grad_A, grad_B = unit @ np.swapaxes(B64, -1, -2), np.swapaxes(A64, -1, -2) @ unit
    for transform in (lambda f: f, jax.jit):
        _rel_close_in_units(transform(norm)(M), expected, scale**2, what="norm")
        grad = transform(jax.grad(lambda M: jnp.sum(norm(M))))(M)
        _rel_close_in_units(grad.A[1:], grad_A[1:], scale, what="grad A")
        _rel_close_in_units(grad.B[1:], grad_B[1:], scale, what="grad B")
        np.testing.assert_array_equal(grad.A[0], 0)
        np.testing.assert_array_equal(grad.B[0], 0)


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_dense_norm_at_extreme_scales(scale):
    x = np.random.default_rng(33).standard_normal((2, 7, 5)).astype(np.float32) * scale
    x64 = x.astype(np.float64)
    expected = np.linalg.norm(x64, axis=(-2, -1))
    _rel_close_in_units(norm(x), expected, scale)
    _rel_close_in_units(jax.jit(norm)(x), expected, scale)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(norm(x))))(jnp.asarray(x))
    assert_rel_close(grad, x64 / expected[:, None, None])


# ------------------------------------------------------- rank-deficient gradients
def _ablated_heads():
    """Three [12, 4] @ [4, 10] heads: A = 0 (a zero-ablated head), A of rank 2, generic."""
    rng = np.random.default_rng(34)
    A, B = random_factors(rng, (3,), 12, 4, 10)
    A[0] = 0
    A[1] = rng.standard_normal((12, 2)) @ rng.standard_normal((2, 4))
    return A, B


SVD_LOSSES = {
    "svdvals": lambda A, B, w: jnp.sum(w * svdvals(FactoredMatrix(A, B))),
    "svd": lambda A, B, w: jnp.sum(w * svd(FactoredMatrix(A, B))[1]),
    "dense svdvals": lambda A, B, w: jnp.sum(
        jnp.pad(w, (0, 6)) * svdvals(jnp.matmul(A, B, precision=jax.lax.Precision.HIGHEST))
    ),
}


def _dense_weighted_svdvals(A, B, w):
    return jnp.sum(w * jnp.linalg.svd(A @ B, compute_uv=False)[..., :4])


@pytest.mark.parametrize("name", SVD_LOSSES)
def test_svdvals_grads_are_finite_for_rank_deficient_factors(name):
    """Gradients of weighted sums of singular values are finite for ablated heads.

    A Cholesky or QR of a singular matrix used to make them NaN (and leak into every head of
    the batch).
    """
    A, B = _ablated_heads()
    S64 = np.linalg.svd(dense(A, B), compute_uv=False)[:, :4]
    # Head 2 is generic; in head 1 the weights [1, 0.5, 0, 0] avoid its two zero singular
    # values (whose vectors, hence any weight on them, make the gradient a set: subgradients).
    for weights, defined in (([1.0, 1.0, 1.0, 1.0], [2]), ([1.0, 0.5, 0.0, 0.0], [1, 2])):
        w = np.asarray(weights, np.float32)
        grads = jax.jit(jax.grad(SVD_LOSSES[name], (0, 1)))(A, B, w)
        with jax.enable_x64(True):  # the dense float64 reference
            ref = jax.grad(_dense_weighted_svdvals, (0, 1))(
                *(jnp.asarray(x, jnp.float64) for x in (A, B, w))
            )
        for got, want, factor in zip(grads, ref, (B, A), strict=True):
            got, want = np.asarray(got, np.float64), np.asarray(want)
            assert np.all(np.isfinite(got)), name
            for i in defined:
                rtol = singular_vector_rtol(S64[i], int(np.count_nonzero(w)))
                assert_rel_close(got[i], want[i], rtol, what=f"{name} head {i}")
            # Every gradient is G B^T or A^T G with a subgradient ||G||_2 <= max(w) = 1.
            bound = np.linalg.norm(factor.astype(np.float64), 2, axis=(-2, -1))
            assert np.all(np.linalg.norm(got, 2, axis=(-2, -1)) <= bound * (1 + 1e-4))
        np.testing.assert_array_equal(grads[1][0], 0)  # A^T G with A = 0


def test_svd_vector_grads_are_finite_for_rank_deficient_factors():
    A, B = _ablated_heads()
    rng = np.random.default_rng(35)
    cU, cV = rng.random((12, 4)).astype(np.float32), rng.random((4, 10)).astype(np.float32)

    def loss(A, B):
        U, S, Vh = svd(FactoredMatrix(A, B))
        return jnp.sum(S) + jnp.sum(cU * U**2) + jnp.sum(cV * Vh**2)

    for got in jax.jit(jax.grad(loss, (0, 1)))(A, B):
        assert np.all(np.isfinite(got))


@pytest.mark.parametrize(("l", "m", "r"), [(7, 3, 6), (4, 6, 5), (6, 6, 4)])
def test_svd_grads_match_dense_autodiff(l, m, r):
    """The factored SVD's derivative (vectors included) matches dense autodiff.

    Compared against autodiff through ``jnp.linalg.svd(A @ B)`` and finite differences, on
    generic factors in float64.
    """
    rng = np.random.default_rng(36)
    k = min(l, m, r)
    with jax.enable_x64(True):
        A, B = (jnp.asarray(x) for x in random_factors(rng, (2,), l, m, r))
        A, B = A.astype(jnp.float64), B.astype(jnp.float64)
        cU, cS, cV = (jnp.asarray(rng.standard_normal(s)) for s in ((l, k), (k,), (k, r)))

        def loss(U, S, Vh):  # invariant under the singular vectors' signs
            return jnp.sum(cU * U**2) + jnp.sum(cS * S) + jnp.sum(cV * Vh**2)

        @jax.jit  # one compiled program per derivative, not op-by-op dispatch
        def factored(A, B):
            return loss(*svd(FactoredMatrix(A, B)))

        def dense_loss(A, B):
            U, S, Vh = jnp.linalg.svd(A @ B, full_matrices=False)
            return loss(U[..., :k], S[..., :k], Vh[..., :k, :])

        check_grads(factored, (A, B), order=1, modes=("rev", "fwd"), eps=1e-6, rtol=1e-6)
        grads = jax.jit(jax.grad(factored, (0, 1)))(A, B)
        dense_grads = jax.jit(jax.grad(dense_loss, (0, 1)))(A, B)
        for got, want in zip(grads, dense_grads, strict=True):
            assert_rel_close(got, want, rtol=1e-10)


# --------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("fn", [svd, svdvals, eigvals, eig, norm, trace])
def test_bad_dense_inputs(fn):
    with pytest.raises(TypeError, match=rf"{fn.__name__}: expected a real floating.*int32"):
        fn(jnp.ones((3, 3), jnp.int32))
    with pytest.raises(TypeError, match=rf"{fn.__name__}: expected a real floating.*complex64"):
        fn(jnp.ones((3, 3), jnp.complex64))
    with pytest.raises(ValueError, match=rf"{fn.__name__}: expected a matrix.*\(3,\)"):
        fn(jnp.ones((3,)))
    with pytest.raises(
        TypeError, match=rf"{fn.__name__}: expected a FactoredMatrix or an array.*got list"
    ):
        fn([[1.0, 2.0], [3.0, 4.0]])


@pytest.mark.parametrize("fn", [eigvals, eig, trace])
def test_square_only_functions_reject_rectangles(fn):
    with pytest.raises(ValueError, match=rf"{fn.__name__} needs a square matrix.*\(2, 5, 4\)"):
        fn(FactoredMatrix(jnp.ones((2, 5, 3)), jnp.ones((2, 3, 4))))
    with pytest.raises(ValueError, match=rf"{fn.__name__} needs a square matrix.*\(5, 4\)"):
        fn(jnp.ones((5, 4)))


def test_public_api_is_explicit():
    assert set(lowrank.__all__) >= {"FactoredMatrix", "svd", "eigvals", "norm", "low_rank_approx"}


# -------------------------------------------------------------- platform pitfall
DEADLOCK_SCRIPT = textwrap.dedent(
    """
    import numpy as np, jax, jax.numpy as jnp, lowrank
    rng = np.random.default_rng(0)
    A = jnp.asarray(rng.standard_normal((12, 12, 128, 32)).astype(np.float32) / 30)
    B = jnp.asarray(rng.standard_normal((12, 12, 32, 128)).astype(np.float32) / 30)
    M = lowrank.FactoredMatrix(A, B)
    for fn in (lowrank.svd, lowrank.svdvals, lambda M: M.make_even().A, lowrank.eig):
        jax.block_until_ready(jax.jit(fn)(M))
        jax.block_until_ready(jax.jit(jax.vmap(fn))(M))  # the fallback's cond becomes a select
    print("ok")
    """
)


def test_svd_path_cannot_deadlock_on_two_cores():
    """Independent batched LAPACK calls in one program can hang jaxlib's CPU kernels.

    [12, 12] batches of 128 x 32 factors (not gpt2-small's 768 x 64: less work) still make
    jaxlib 0.10.2 split its LAPACK batches over the thread pool: on two cores the two
    unordered QRs of ``shared/repro/jax_cpu_lapack_deadlock.py`` hang at this shape (they do
    not at 96 x 16 or [4, 4] x 256 x 32).
    """
    result = subprocess.run(
        [sys.executable, "-c", DEADLOCK_SCRIPT], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


def _svdvals_grad(M):
    return jax.grad(lambda M: jnp.sum(svdvals(M)))(M)


@pytest.mark.parametrize(
    "fn",
    [svd, svdvals, eigvals, eig, _svdvals_grad, jax.vmap(svd)],
    ids=["svd", "svdvals", "eigvals", "eig", "svdvals_grad", "vmap_svd"],
)
def test_one_matrix_per_lapack_call(fn):
    """With one_matrix_per_call every decomposition sees a single matrix, same results.

    Derivatives and nested transformations included; sharded programs on multi-device CPU
    meshes rely on this.
    """
    M = FactoredMatrix(*random_factors(np.random.default_rng(3), LEAD, 20, 6, 20))
    expected = jax.jit(fn)(M)  # cached traces of fn must not matter
    assert any(len(s) > 2 for s in decomposition_operand_shapes(jax.make_jaxpr(fn)(M).jaxpr))
    looped = one_matrix_per_call(fn)
    shapes = decomposition_operand_shapes(jax.make_jaxpr(looped)(M).jaxpr)
    assert shapes and all(len(shape) == 2 for shape in shapes), shapes
    # the same LAPACK routine on the same matrices: the same numbers, vectors included
    got = jax.jit(looped)(M)
    for g, e in zip(
        jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected), strict=True
    ):
        assert_rel_close(g, e, rtol=1e-5)


def test_one_matrix_per_call_differentiates_looped():
    M = FactoredMatrix(*random_factors(np.random.default_rng(4), LEAD, 20, 6, 20))
    looped = one_matrix_per_call(svdvals)
    grad = jax.grad(lambda M: jnp.sum(looped(M)))
    shapes = decomposition_operand_shapes(jax.make_jaxpr(grad)(M).jaxpr)
    assert shapes and all(len(shape) == 2 for shape in shapes), shapes
    # jax.jit(_svdvals_grad) at these shapes is compiled by test_one_matrix_per_lapack_call.
    expected = jax.tree_util.tree_leaves(jax.jit(_svdvals_grad)(M))
    for g, e in zip(jax.tree_util.tree_leaves(jax.jit(grad)(M)), expected, strict=True):
        assert_rel_close(g, e, rtol=1e-5)


def test_after_is_exact_and_nan_safe(monkeypatch):
    """``after`` ties ``x`` to its dependencies with an exact zero: NaN or empty ones included.

    (Where the deadlock is fixed ``after`` ties nothing: tests/test_deadlock.py.)
    """
    monkeypatch.setattr(lowrank._deadlock, "DEADLOCK_PRONE", True)
    x = jnp.array([1.5, -2.0, jnp.inf])
    deps = (jnp.array([jnp.nan, 1.0]), jnp.zeros((0,)))
    np.testing.assert_array_equal(jax.jit(after)(x, *deps), x)
    closed = jax.make_jaxpr(after)(x, *deps)
    dep = closed.jaxpr.invars[1]
    assert any(v is dep for eqn in closed.eqns for v in eqn.invars)
