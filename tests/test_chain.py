"""Matrix chains: cheapest association, values, cyclic cores."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import assert_rel_close, match_multiset
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank.chain import chain_matmul, chain_order, cyclic_core


def _all_costs(shapes):
    """Cost of every parenthesisation, by brute force."""
    dims = [s[-2] for s in shapes] + [shapes[-1][-1]]

    def batch(i, j):
        return math.prod(np.broadcast_shapes(*(s[:-2] for s in shapes[i : j + 1])))

    def costs(i, j):
        if i == j:
            return [0]
        out = []
        for k in range(i, j):
            step = batch(i, j) * dims[i] * dims[k + 1] * dims[j + 1]
            out += [a + b + step for a, b in itertools.product(costs(i, k), costs(k + 1, j))]
        return out

    return costs(0, len(shapes) - 1)


@st.composite
def chains(draw):
    n = draw(st.integers(1, 5))
    dims = draw(st.lists(st.integers(1, 40), min_size=n + 1, max_size=n + 1))
    batches = draw(st.lists(st.sampled_from([(), (3,), (2, 3), (1, 3)]), min_size=n, max_size=n))
    return [(*b, dims[i], dims[i + 1]) for i, b in enumerate(batches)]


@settings(max_examples=60, deadline=None)
@given(chains())
def test_chain_order_is_optimal(shapes):
    _, cost = chain_order(shapes)
    assert cost == min(_all_costs(shapes))


@settings(max_examples=20, deadline=None)
@given(chains(), st.integers(0, 2**31 - 1))
def test_chain_matmul_values(shapes, seed):
    rng = np.random.default_rng(seed)
    factors = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    expected = factors[0].astype(np.float64)
    for f in factors[1:]:
        expected = expected @ f.astype(np.float64)
    got = chain_matmul(*map(jnp.asarray, factors))
    assert_rel_close(got, expected)


def test_full_ov_chain_shares_the_vocabulary_product():
    """W_O (W_U W_E) W_V is the cheap core of a full OV circuit; W_U W_E is computed once."""
    L, H, V, d, dh = 12, 12, 50257, 768, 64
    order, cost = chain_order([(L, H, dh, d), (d, V), (V, d), (L, H, d, dh)])
    assert cost == d * V * d + L * H * dh * d * d + L * H * dh * d * dh
    assert order in ((0, ((1, 2), 3)), ((0, (1, 2)), 3))


def test_cyclic_core_has_the_nonzero_spectrum():
    rng = np.random.default_rng(1)
    factors = [
        rng.standard_normal(s).astype(np.float32) for s in [(30, 9), (9, 4), (4, 12), (12, 30)]
    ]
    core = cyclic_core(*map(jnp.asarray, factors))
    assert core.shape == (4, 4)  # rotated to start at the narrowest boundary
    product = np.linalg.multi_dot([f.astype(np.float64) for f in factors])
    full = np.linalg.eigvals(product)
    nonzero = full[np.argsort(-np.abs(full))[:4]]
    assert_rel_close(match_multiset(np.linalg.eigvals(np.asarray(core)), nonzero), nonzero)


def test_jit_and_vmap():
    rng = np.random.default_rng(2)
    xs = [jnp.asarray(rng.standard_normal((5, *s)), jnp.float32) for s in [(6, 2), (2, 7), (7, 6)]]
    for fn in (chain_matmul, cyclic_core):
        eager = fn(*xs)
        assert_rel_close(jax.jit(fn)(*xs), eager, rtol=1e-5)
        assert_rel_close(jax.vmap(fn)(*xs), eager, rtol=1e-5)


@pytest.mark.parametrize(
    ("fn", "shapes", "match"),
    [
        (chain_matmul, [(3, 4), (5, 2)], r"factors 0 and 1 do not chain.*\(3, 4\).*\(5, 2\)"),
        (chain_matmul, [(3,), (3, 2)], r"factor 0 must be a matrix"),
        (cyclic_core, [(3, 4), (4, 5)], r"must be square.*3 rows to 5 columns"),
    ],
)
def test_bad_chains(fn, shapes, match):
    with pytest.raises(ValueError, match=match):
        fn(*(jnp.ones(s) for s in shapes))
    with pytest.raises(ValueError, match="at least one factor"):
        fn()
