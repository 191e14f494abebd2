"""Shared helpers for tests: random factors, float64 references, TransformerLens bridges."""

from __future__ import annotations

import jax.extend
import numpy as np

RTOL = 1e-4

# Primitives that run LAPACK kernels on CPU (see lowrank/_deadlock.py).
DECOMPOSITIONS = {
    "svd",
    "qr",
    "geqrf",
    "householder_product",
    "cholesky",
    "triangular_solve",
    "eig",
}


def decomposition_operand_shapes(jaxpr):
    """Operand shapes of every decomposition in a jaxpr, sub-jaxprs (scan, cond, jit) included."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in DECOMPOSITIONS:
            shapes.append(tuple(eqn.invars[0].aval.shape))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            shapes += decomposition_operand_shapes(sub)
    return shapes


def random_factors(rng, lead, l, m, r, lead_b=None):
    """Float32 numpy factors ``A [*lead, l, m]`` and ``B [*lead_b, m, r]``."""
    lead_b = lead if lead_b is None else lead_b
    A = rng.standard_normal((*lead, l, m)).astype(np.float32)
    B = rng.standard_normal((*lead_b, m, r)).astype(np.float32)
    return A, B


def assert_rel_close(actual, expected, rtol=RTOL, what=""):
    """``max|actual - expected| <= rtol * max|expected|`` (relative to the array's scale)."""
    actual = np.asarray(actual, dtype=np.complex128 if np.iscomplexobj(actual) else np.float64)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
    err = float(np.max(np.abs(actual - expected), initial=0.0))
    assert err <= rtol * scale, f"{what}: max abs error {err:.3g} > {rtol} * {scale:.3g}"


def singular_vector_rtol(S, n, rtol=RTOL):
    """Tolerance for the first ``n`` float32 singular vectors of a matrix with spectrum ``S``.

    A singular vector is determined only up to ``~eps * S[0] / gap`` (Davis-Kahan), where
    ``gap`` separates its singular value from the rest; nearly tied values loosen the bound.
    The factor 30 covers the accumulated rounding of a float32 SVD.
    """
    S = np.asarray(S, np.float64)
    gap = np.min(S[:-1] - S[1:], initial=np.inf, where=np.arange(len(S) - 1) < n)
    return max(rtol, 30 * float(np.finfo(np.float32).eps) * S[0] / max(gap, 1e-30))


def sort_complex(x):
    """Sort the last axis by (real, imag) after rounding, for multiset comparisons."""
    x = np.asarray(x, dtype=np.complex128)
    scale = np.max(np.abs(x), axis=-1, keepdims=True) + 1e-30
    key_re = np.round(x.real / scale, 5)
    key_im = np.round(x.imag / scale, 5)
    order = np.lexsort((key_im, key_re), axis=-1)
    return np.take_along_axis(x, order, axis=-1)


def match_multiset(actual, expected):
    """Reorder ``actual`` (last axis) to the greedy nearest match of ``expected``."""
    actual = np.asarray(actual, dtype=np.complex128)
    expected = np.asarray(expected, dtype=np.complex128)
    flat_a = actual.reshape(-1, actual.shape[-1])
    flat_e = expected.reshape(-1, expected.shape[-1])
    out = np.empty_like(flat_e)
    for b in range(flat_e.shape[0]):
        remaining = list(flat_a[b])
        for j, e in enumerate(flat_e[b]):
            k = int(np.argmin([abs(a - e) for a in remaining]))
            out[b, j] = remaining.pop(k)
    return out.reshape(expected.shape)


def align_signs(vectors, reference, axis):
    """Flip singular vectors (along ``axis``) so their sign agrees with ``reference``."""
    dots = np.sum(np.asarray(vectors) * np.asarray(reference), axis=axis, keepdims=True)
    return np.asarray(vectors) * np.where(dots < 0, -1.0, 1.0)


def to_torch(x):
    import torch

    return torch.from_numpy(np.array(x))


def to_numpy(t):
    return t.detach().cpu().numpy()


def log_softmax(x):
    """Log-probabilities over the last axis, computed in float32, as NumPy."""
    import jax
    import jax.numpy as jnp

    return np.asarray(jax.nn.log_softmax(jnp.asarray(x, jnp.float32), axis=-1))
