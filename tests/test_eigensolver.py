"""Tests for the batched pure-JAX nonsymmetric eigenvalue solver (``lowrank.eigensolver``).

Reference: ``np.linalg.eigvals``/``eig`` in float64 on the same (float32-rounded) matrices.
Spectra are compared as multisets through an optimal matching. Tolerances are relative to the
spectral norm: 1e-4 in float32 (1e-10 in float64) for well-conditioned spectra; for nearly
defective ones see ``test_nearly_defective``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank.eigensolver import DEFAULT_MAX_ITERATIONS, EigResult, default_bulges, solve

TOL32 = 1e-4
TOL64 = 1e-10

# Compiling the solver takes seconds per input shape and options; running it, milliseconds. So
# every call at size n solves a batch of _BATCH[n] matrices (tests pad theirs with random ones,
# see `run`) and each (n, options) compiles once for the whole file.
_BATCH = {1: 4, 2: 1200, 3: 7, 5: 144, 6: 1, 7: 7, 9: 7, 16: 144, 64: 7, 128: 1}


def run(a, **options) -> EigResult:
    """``solve(a, **options)`` for ``a: [b, n, n]``, padded with random matrices to ``_BATCH[n]``.

    Padding is harmless: the solver treats the matrices of a batch independently.
    """
    a = np.asarray(a)
    b, n = a.shape[0], a.shape[-1]
    pad = np.random.default_rng(n).standard_normal((_BATCH[n] - b, n, n)).astype(a.dtype)
    result = solve(np.concatenate([a, pad]), **options)
    return jax.tree_util.tree_map(lambda x: x[:b], result)


def _match_error(w: np.ndarray, ref: np.ndarray) -> float:
    """Largest distance between two multisets of complex numbers under an optimal matching."""
    cost = np.abs(w[:, None] - ref[None, :])
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # greedy nearest match: an upper bound on the optimal bottleneck
        worst, free = 0.0, list(range(len(ref)))
        for i in np.argsort(-np.abs(w)):
            j = min(free, key=lambda j: cost[i, j])
            worst = max(worst, cost[i, j])
            free.remove(j)
        return worst
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].max())


def _spectral_error(w: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Per-matrix matching error of ``w [..., n]`` against float64 NumPy, over ``||a||_2``."""
    a64 = np.asarray(a, np.float64)
    ref = np.linalg.eigvals(a64)
    norm = np.linalg.norm(a64, 2, axis=(-2, -1))
    w2 = np.asarray(w).reshape(-1, a.shape[-1])
    ref2 = ref.reshape(-1, a.shape[-1])
    errs = np.array([_match_error(x, r) for x, r in zip(w2, ref2, strict=True)])
    return errs.reshape(a.shape[:-2]) / np.where(norm > 0, norm, 1)


def _orthogonal(rng: np.random.Generator, batch: int, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((batch, n, n)))
    return q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[:, None, :]


# --------------------------------------------------------------------------------------------
# Matrix families (float64 NumPy, cast to float32 by the tests)
# --------------------------------------------------------------------------------------------


def random_gaussian(rng, batch, n):
    return rng.standard_normal((batch, n, n))


def repeated(rng, batch, n):
    """``V diag(d) V^-1`` with each eigenvalue repeated (semisimple) and a well-conditioned V."""
    base = rng.standard_normal((batch, (n + 2) // 3))
    d = np.repeat(base, 3, axis=1)[:, :n]
    v = _orthogonal(rng, batch, n) @ (np.eye(n) + 0.2 * rng.standard_normal((batch, n, n)) / n)
    return v @ (d[:, :, None] * np.linalg.inv(v))


def skew_symmetric(rng, batch, n):
    """Purely imaginary spectrum (a zero too when n is odd)."""
    m = rng.standard_normal((batch, n, n))
    return m - np.swapaxes(m, -1, -2)


def rotations(rng, batch, n):
    """Orthogonally hidden 2x2 rotations: eigenvalues exp(+-i theta) on the unit circle."""
    theta = rng.uniform(0.1, np.pi, (batch, (n + 1) // 2))
    blocks = np.zeros((batch, n, n))
    for i in range(n // 2):
        c, s = np.cos(theta[:, i]), np.sin(theta[:, i])
        blocks[:, 2 * i, 2 * i], blocks[:, 2 * i, 2 * i + 1] = c, -s
        blocks[:, 2 * i + 1, 2 * i], blocks[:, 2 * i + 1, 2 * i + 1] = s, c
    if n % 2:
        blocks[:, -1, -1] = 1.0
    q = _orthogonal(rng, batch, n)
    return q @ blocks @ np.swapaxes(q, -1, -2)


def cyclic_permutation(rng, batch, n):
    """The n-th roots of unity: the classic case where Francis shifts stall without exceptions."""
    return np.broadcast_to(np.roll(np.eye(n), 1, axis=0), (batch, n, n)).copy()


def low_rank(rng, batch, n):
    """``U V^T`` of rank n/4, like an OV circuit: zero is a semisimple eigenvalue (3n/4 times)."""
    r = max(1, n // 4)
    return rng.standard_normal((batch, n, r)) @ rng.standard_normal((batch, r, n)) / np.sqrt(r)


def zero(rng, batch, n):
    return np.zeros((batch, n, n))


def triangular(rng, batch, n):
    """Already in Schur form (every subdiagonal entry is zero from the start)."""
    return np.triu(rng.standard_normal((batch, n, n)))


FAMILIES = [
    random_gaussian,
    repeated,
    skew_symmetric,
    rotations,
    cyclic_permutation,
    low_rank,
    zero,
    triangular,
]


# --------------------------------------------------------------------------------------------
# Accuracy against NumPy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 5, 16, 64, 128])
def test_random_matches_numpy(n):
    batch = _BATCH[n]  # 1200 matrices at n = 2, a single one at n = 128
    rng = np.random.default_rng(n * 1000 + batch)
    a = random_gaussian(rng, batch, n).astype(np.float32)
    result = solve(a)
    assert result.values.shape == (batch, n) and result.values.dtype == jnp.complex64
    assert result.vectors is None
    assert bool(jnp.all(result.converged))
    assert np.max(_spectral_error(result.values, a)) < TOL32
    iterations = np.asarray(result.iterations)
    assert iterations.shape == (batch,) and iterations.dtype == np.int32
    # a Hessenberg matrix of size <= 2 is in Schur form; larger ones need sweeps
    assert np.all(iterations == 0) if n <= 2 else np.all(iterations >= 1)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("n", [5, 16])
def test_families_match_numpy(family, n):
    rng = np.random.default_rng(n)
    a = family(rng, 7, n).astype(np.float32)
    result = run(a)
    assert bool(jnp.all(result.converged))
    assert np.max(_spectral_error(result.values, a)) < TOL32
    if family in (zero, triangular):  # already in Schur form
        np.testing.assert_array_equal(result.iterations, 0)


@pytest.mark.parametrize("family", [rotations, skew_symmetric, cyclic_permutation, low_rank])
def test_families_n64(family):
    rng = np.random.default_rng(64)
    a = family(rng, 7, 64).astype(np.float32)
    result = run(a)
    assert bool(jnp.all(result.converged))
    assert np.max(_spectral_error(result.values, a)) < TOL32


@pytest.mark.parametrize(
    ("family", "n"),
    [(random_gaussian, 64), (random_gaussian, 7), (repeated, 16), (skew_symmetric, 9)]
    + [(f, 16) for f in (rotations, cyclic_permutation, low_rank, triangular)],
)
def test_two_bulges_per_sweep(family, n):
    """The multishift variant used on GPU/TPU (two bulges per sweep), run here on CPU.

    Checked against NumPy and against the one-bulge default of CPU.
    """
    assert (default_bulges("cpu"), default_bulges("gpu"), default_bulges("tpu")) == (1, 2, 2)
    rng = np.random.default_rng(n + 1)
    a = family(rng, 7, n).astype(np.float32)
    result = run(a, vectors=True, bulges=2)
    assert bool(jnp.all(result.converged))
    assert np.max(_spectral_error(result.values, a)) < TOL32
    one_bulge = None if jax.default_backend() == "cpu" else 1  # None: share the default's program
    assert np.max(_spectral_error(run(a, bulges=one_bulge).values, a)) < TOL32
    a64 = a.astype(np.float64)
    w, v = np.asarray(result.values), np.asarray(result.vectors).astype(np.complex128)
    residual = np.linalg.norm(a64 @ v - v * w[:, None, :], axis=-2)
    assert np.max(residual / np.linalg.norm(a64, 2, axis=(-2, -1))[:, None]) < TOL32


def test_purely_imaginary_spectrum():
    rng = np.random.default_rng(3)
    a = skew_symmetric(rng, 7, 16).astype(np.float32)
    w = np.asarray(run(a).values)
    scale = np.linalg.norm(a.astype(np.float64), 2, axis=(-2, -1))[:, None]
    assert np.max(np.abs(w.real) / scale) < TOL32
    # Conjugate pairs are adjacent, positive imaginary part first.
    assert np.all(np.sort_complex(w) == np.sort_complex(np.conj(w)))


def test_zero_matrix_gives_exact_zeros():
    result = run(np.zeros((3, 16, 16), np.float32))
    assert bool(jnp.all(result.converged))
    np.testing.assert_array_equal(np.asarray(result.values), 0)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_nearly_defective(m):
    """A Jordan block J_m(2) + 1e-6 E (hidden by an orthogonal similarity) inside a 16x16 matrix.

    Its cluster of m eigenvalues has radius ~(1e-6)^(1/m) and condition ~eps^(1/m): a backward
    error of c * eps * ||A|| (float32 eps ~ 1.2e-7) moves each of them by ~(c eps ||A||)^(1/m).
    We allow 4 * (16 eps ||A||)^(1/m) for the worst eigenvalue (0.03-0.2 here), and 1e-4 * ||A||
    for the cluster's mean, which is well conditioned.
    """
    rng = np.random.default_rng(m)
    batch, n = 7, 16
    t = np.triu(rng.standard_normal((batch, n, n)))
    t[:, :m, :m] = 2 * np.eye(m) + np.eye(m, k=1)
    diag = rng.uniform(-4, -1, (batch, n - m))  # keep the rest of the spectrum away from 2
    t[:, np.arange(m, n), np.arange(m, n)] = diag
    t = t + 1e-6 * rng.standard_normal((batch, n, n))
    q = _orthogonal(rng, batch, n)
    a = (q @ t @ np.swapaxes(q, -1, -2)).astype(np.float32)
    result = run(a)
    assert bool(jnp.all(result.converged))
    a64 = a.astype(np.float64)
    norm = np.linalg.norm(a64, 2, axis=(-2, -1))
    eps = float(np.finfo(np.float32).eps)
    tol = 4 * (16 * eps * norm) ** (1 / m)
    assert np.all(_spectral_error(result.values, a) * norm < tol)
    w = np.asarray(result.values)
    ref = np.linalg.eigvals(a64)
    for k in range(batch):
        near = np.abs(w[k] - 2) < 0.5
        near_ref = np.abs(ref[k] - 2) < 0.5
        assert near.sum() == near_ref.sum() == m
        assert abs(w[k][near].mean() - ref[k][near_ref].mean()) < TOL32 * norm[k]


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_scale_invariance(scale):
    rng = np.random.default_rng(5)
    a = random_gaussian(rng, 7, 16)
    w_unit = np.asarray(run(a.astype(np.float32)).values).astype(np.complex128)
    scaled = run((scale * a).astype(np.float32))
    assert bool(jnp.all(scaled.converged))
    assert np.all(np.isfinite(np.asarray(scaled.values)))
    assert np.max(_spectral_error(scaled.values, (scale * a).astype(np.float32))) < TOL32
    # Scaling is by a power of two: the result is the unit one times the scale.
    rel = np.abs(np.asarray(scaled.values) / scale - w_unit) / np.abs(w_unit).max()
    assert np.max(rel) < 1e-5


def test_small_sizes_exact_formulas():
    a = np.array([[[3.5]]], np.float32)  # n = 1
    np.testing.assert_array_equal(np.asarray(run(a).values), [[3.5 + 0j]])
    two = np.array(
        [[[0, -2], [2, 0]], [[1, 2], [3, 4]], [[1, 1e-30], [0, 1]], [[1e20, 1], [-1, 1e20]]],
        np.float32,
    )
    w = np.asarray(run(two).values)
    np.testing.assert_allclose(w[0], [2j, -2j], atol=1e-6)
    assert np.max(_spectral_error(w, two)) < 1e-6


def test_batch_shapes_and_dtypes():
    rng = np.random.default_rng(6)
    a = rng.standard_normal((12, 12, 5, 5)).astype(np.float32)  # e.g. [layers, heads, n, n]
    result = solve(a)
    assert result.values.shape == (12, 12, 5) and result.values.dtype == jnp.complex64
    assert result.converged.shape == result.iterations.shape == (12, 12)
    assert np.max(_spectral_error(result.values, a)) < TOL32
    one = rng.standard_normal((128, 128)).astype(np.float32)  # no batch axes
    single = solve(one)
    assert single.values.shape == (128,) and single.converged.shape == ()
    batched = solve(one[None]).values[0]
    np.testing.assert_allclose(np.asarray(single.values), np.asarray(batched), rtol=1e-6)
    for dtype in (jnp.bfloat16, jnp.float16):
        low = jnp.asarray(a, dtype)
        w_low = solve(low).values
        assert w_low.dtype == jnp.complex64
        assert np.max(_spectral_error(w_low, np.asarray(low, np.float32))) < TOL32
    for shape in ((0, 4, 4), (3, 0, 0)):
        empty = solve(np.zeros(shape, np.float32), vectors=True)
        assert empty.values.shape == shape[:-1] and empty.vectors.shape == shape
        assert empty.converged.shape == empty.iterations.shape == shape[:-2]


# --------------------------------------------------------------------------------------------
# Eigenvectors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family", [random_gaussian, repeated, rotations, low_rank, zero, cyclic_permutation]
)
def test_eig_residual(family):
    rng = np.random.default_rng(7)
    n = 16
    a = family(rng, 7, n).astype(np.float32)
    result = run(a, vectors=True)
    assert result.vectors.shape == (7, n, n) and result.vectors.dtype == jnp.complex64
    assert bool(jnp.all(result.converged))
    w, v = np.asarray(result.values), np.asarray(result.vectors).astype(np.complex128)
    a64 = a.astype(np.float64)
    norm = np.linalg.norm(a64, 2, axis=(-2, -1))[:, None]
    np.testing.assert_allclose(np.linalg.norm(v, axis=-2), 1, atol=1e-5)
    residual = np.linalg.norm(a64 @ v - v * w[:, None, :], axis=-2)
    assert np.max(residual / np.where(norm > 0, norm, 1)) < TOL32
    assert np.max(_spectral_error(w, a)) < TOL32
    w_only = np.asarray(run(a).values)
    np.testing.assert_allclose(w, w_only, atol=1e-5 * float(np.max(norm)) + 1e-30)


def test_eig_vectors_match_numpy_for_distinct_eigenvalues():
    """Up to a unit phase, the vectors are NumPy's (when eigenvalues are well separated)."""
    rng = np.random.default_rng(8)
    n = 16
    d = np.arange(1, n + 1, dtype=np.float64)
    v0 = _orthogonal(rng, 3, n) @ (np.eye(n) + 0.3 * rng.standard_normal((3, n, n)) / n)
    a = (v0 @ (d[:, None] * np.linalg.inv(v0))).astype(np.float32)
    result = run(a, vectors=True)
    w, v = np.asarray(result.values), np.asarray(result.vectors)
    w_ref, v_ref = np.linalg.eig(a.astype(np.float64))
    for k in range(3):
        order, order_ref = np.argsort(w[k].real), np.argsort(w_ref[k].real)
        x, y = v[k][:, order], v_ref[k][:, order_ref]
        overlap = np.abs(np.sum(np.conj(x) * y, axis=0))
        np.testing.assert_allclose(overlap, 1, atol=1e-4)
    # Largest-magnitude entry of each vector is real and positive.
    pivots = np.take_along_axis(v, np.argmax(np.abs(v), axis=1)[:, None, :], axis=1)
    assert np.all(pivots.real > 0) and np.allclose(pivots.imag, 0)


@pytest.mark.parametrize("n", [1, 2, 3, 64])
def test_eig_sizes(n):
    rng = np.random.default_rng(n)
    a = random_gaussian(rng, 4, n).astype(np.float32)
    result = run(a, vectors=True)
    assert bool(jnp.all(result.converged))
    a64 = a.astype(np.float64)
    v = np.asarray(result.vectors).astype(np.complex128)
    residual = np.linalg.norm(a64 @ v - v * np.asarray(result.values)[:, None, :], axis=-2)
    assert np.max(residual / np.linalg.norm(a64, 2, axis=(-2, -1))[:, None]) < TOL32


def test_eig_nearly_defective_vectors_are_backward_stable():
    """For a Jordan block the vectors are nearly parallel, but residuals stay small."""
    n = 6
    a = 2 * np.eye(n) + np.eye(n, k=1) + 1e-6 * np.random.default_rng(9).standard_normal((n, n))
    a = a.astype(np.float32)
    result = solve(a, vectors=True)
    v = np.asarray(result.vectors).astype(np.complex128)
    residual = np.linalg.norm(a.astype(np.float64) @ v - v * np.asarray(result.values), axis=0)
    assert np.all(np.isfinite(v))
    assert np.max(residual) < TOL32 * np.linalg.norm(a.astype(np.float64), 2)


# --------------------------------------------------------------------------------------------
# Transformations, dtypes, robustness
# --------------------------------------------------------------------------------------------


def test_jit_and_vmap_agree_with_batched_call():
    rng = np.random.default_rng(10)
    a = random_gaussian(rng, _BATCH[16], 16).astype(np.float32)
    batched = np.asarray(solve(a).values)
    jitted = np.asarray(jax.jit(lambda a: solve(a).values)(a))
    # Each transformation compiles the solver anew: eager vmap over a trailing axis (with
    # vectors) and jit of a nested vmap over leading axes cover both kinds in two compiles.
    moved = np.moveaxis(a, 0, 2)
    vmapped = jax.vmap(lambda x: solve(x, vectors=True), in_axes=2)(moved)
    nested = jax.jit(jax.vmap(jax.vmap(lambda x: solve(x).values)))(a.reshape(12, 12, 16, 16))
    nested = np.asarray(nested).reshape(-1, 16)
    for other in (jitted, np.asarray(vmapped.values), nested):
        assert np.max(_spectral_error(other, a)) < TOL32
        np.testing.assert_allclose(np.sort_complex(other), np.sort_complex(batched), atol=1e-5)
    w, v = np.asarray(vmapped.values), np.asarray(vmapped.vectors)
    residual = np.linalg.norm(a.astype(np.float64) @ v - v * w[:, None, :], axis=-2)
    assert np.max(residual) < TOL32 * np.max(np.linalg.norm(a.astype(np.float64), 2, axis=(1, 2)))


@pytest.fixture
def x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.mark.parametrize("family", [random_gaussian, rotations, repeated, low_rank])
def test_float64(x64, family):
    rng = np.random.default_rng(11)
    a = family(rng, 5, 24)
    result = solve(jnp.asarray(a, jnp.float64))
    assert result.values.dtype == jnp.complex128
    assert bool(jnp.all(result.converged))
    assert np.max(_spectral_error(result.values, a)) < TOL64
    result = solve(jnp.asarray(a, jnp.float64), vectors=True)
    w, v = np.asarray(result.values), np.asarray(result.vectors)
    assert v.dtype == np.complex128
    residual = np.linalg.norm(a @ v - v * w[:, None, :], axis=-2)
    assert np.max(residual / np.linalg.norm(a, 2, axis=(-2, -1))[:, None]) < TOL64


@pytest.mark.timeout(120)
def test_non_finite_input_gives_nan_without_hanging():
    rng = np.random.default_rng(12)
    a = random_gaussian(rng, 5, 16).astype(np.float32)
    a[1, 3, 4] = np.nan
    a[3, 0, 0] = np.inf
    a[4, 15, 2] = -np.inf
    result = run(a)
    np.testing.assert_array_equal(np.asarray(result.converged), [True, False, True, False, False])
    w = np.asarray(result.values)
    assert np.all(np.isnan(w[[1, 3, 4]]))
    assert np.max(_spectral_error(w[[0, 2]], a[[0, 2]])) < TOL32
    with_vectors = run(a, vectors=True)
    v = np.asarray(with_vectors.vectors)
    assert np.all(np.isnan(v[[1, 3, 4]]))
    assert np.all(np.isfinite(v[[0, 2]]))
    np.testing.assert_array_equal(with_vectors.converged, result.converged)


def test_iteration_cap_flags_non_convergence():
    rng = np.random.default_rng(13)
    a = random_gaussian(rng, 4, 16).astype(np.float32)
    capped = run(a, max_iterations=1)
    assert not bool(jnp.any(capped.converged))
    assert np.all(np.isnan(np.asarray(capped.values)))
    full = run(a, max_iterations=DEFAULT_MAX_ITERATIONS)
    assert bool(jnp.all(full.converged))
    assert np.all(np.asarray(capped.iterations) < np.asarray(full.iterations))


@pytest.mark.parametrize("vectors", [False, True])
def test_export_for_tpu(vectors):
    def fn(a):
        result = solve(a, vectors=vectors)
        return result.values, result.vectors

    spec = jax.ShapeDtypeStruct((4, 16, 16), jnp.float32)
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(spec)
    assert exported.platforms == ("tpu",)
    assert "lapack" not in exported.mlir_module().lower()


@pytest.mark.parametrize("vectors", [False, True])
def test_bad_input(vectors):
    def fn(a, **kwargs):
        return solve(a, vectors=vectors, **kwargs)

    with pytest.raises(ValueError, match=r"square matrix a \[\.\.\., n, n\], got shape \(3, 4\)"):
        fn(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match=r"got shape \(5,\)"):
        fn(np.zeros(5, np.float32))
    with pytest.raises(TypeError, match="real floating-point matrix .* got dtype int32"):
        fn(np.zeros((3, 3), np.int32))
    with pytest.raises(TypeError, match="complex input is not supported, got dtype complex64"):
        fn(np.zeros((3, 3), np.complex64))
    with pytest.raises(TypeError, match="expected an array"):
        fn("not a matrix")
    with pytest.raises(ValueError, match="max_iterations must be >= 1, got 0"):
        fn(np.eye(3, dtype=np.float32), max_iterations=0)
    with pytest.raises(TypeError, match="max_iterations must be an int"):
        fn(np.eye(3, dtype=np.float32), max_iterations=2.5)
    with pytest.raises(ValueError, match="bulges must be None or an int >= 1, got 0"):
        fn(np.eye(3, dtype=np.float32), bulges=0)


def test_entries_near_the_float32_maximum():
    a = jnp.diag(jnp.array([3e38, 1.0, 2.0], jnp.float32))[None]
    w = np.sort(np.asarray(run(a).values).real[0])
    assert np.all(np.isfinite(w))  # within 1e-6 of the spectral norm; 1 and 2 are below that
    np.testing.assert_allclose(w, [1.0, 2.0, 3e38], rtol=0, atol=1e-6 * 3e38)
