"""FactoredMatrix: shapes, products, indexing, pytree behaviour, parity with TransformerLens."""

import pathlib
import re

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import assert_rel_close, random_factors, to_numpy, to_torch

from lowrank import FactoredMatrix

LEAD = (2, 3)


@pytest.fixture(scope="module")
def tl():
    """TransformerLens 3.9.0's FactoredMatrix class (the reference)."""
    from transformer_lens import FactoredMatrix as TLFactoredMatrix

    return TLFactoredMatrix


@pytest.fixture(params=[(40, 8, 30), (40, 8, 40)], ids=["rect", "square"])
def factors(request):
    l, m, r = request.param
    return random_factors(np.random.default_rng(0), LEAD, l, m, r)


def both(tl, A, B):
    return FactoredMatrix(jnp.asarray(A), jnp.asarray(B)), tl(to_torch(A), to_torch(B))


def dense(A, B):
    return A.astype(np.float64) @ B.astype(np.float64)


# ------------------------------------------------------------------ construction
def test_shape_properties(factors):
    A, B = factors
    M = FactoredMatrix(A, B)
    assert M.shape == (*LEAD, A.shape[-2], B.shape[-1])
    assert (M.ldim, M.mdim, M.rdim, M.ndim) == (A.shape[-2], 8, B.shape[-1], 4)
    assert M.dtype == jnp.float32
    assert isinstance(M.A, jax.Array) and isinstance(M.B, jax.Array)
    assert M.pair[0] is M.A and M.pair[1] is M.B


def test_leading_dims_broadcast_without_copy():
    rng = np.random.default_rng(1)
    A = jnp.asarray(rng.standard_normal((6, 5)), dtype=jnp.float32)
    B = jnp.asarray(rng.standard_normal((4, 1, 5, 7)), dtype=jnp.float32)
    M = FactoredMatrix(A, B)
    assert M.shape == (4, 1, 6, 7)
    assert M.A.shape == (6, 5) and M.B.shape == (4, 1, 5, 7)  # stored as given
    assert_rel_close(M.AB, np.asarray(A, np.float64) @ np.asarray(B, np.float64))
    full = M.broadcast()
    assert full.A.shape == (4, 1, 6, 5) and full.B.shape == (4, 1, 5, 7)


def test_repr():
    M = FactoredMatrix(jnp.ones((3, 4, 2)), jnp.ones((3, 2, 5)))
    assert repr(M) == "FactoredMatrix(shape=(3, 4, 5), mdim=2, dtype=float32)"


def test_numpy_and_torch_inputs_become_jax_arrays():
    A = np.ones((4, 2), np.float32)
    M = FactoredMatrix(A, to_torch(np.ones((2, 3), np.float32)))
    assert isinstance(M.A, jax.Array) and isinstance(M.B, jax.Array)


@pytest.mark.parametrize(
    ("A_shape", "B_shape", "match"),
    [
        ((4, 3), (2, 5), r"inner dimensions differ.*\(4, 3\).*\(2, 5\)"),
        ((2, 4, 3), (3, 3, 5), r"leading \(batch\) dimensions do not broadcast.*\(2, 4, 3\)"),
        ((4,), (4, 5), r"A must have at least 2 dimensions.*\(4,\)"),
        ((4, 3), (3,), r"B must have at least 2 dimensions.*\(3,\)"),
    ],
)
def test_bad_shapes(A_shape, B_shape, match):
    with pytest.raises(ValueError, match=match):
        FactoredMatrix(jnp.ones(A_shape), jnp.ones(B_shape))


@pytest.mark.parametrize(
    ("A", "B", "match"),
    [
        ([[1.0, 2.0]], jnp.ones((2, 3)), r"A must be an array.*got list"),
        (jnp.ones((4, 2)), "B", r"B must be an array.*got str"),
        (None, jnp.ones((2, 3)), r"A must be an array.*got NoneType"),
        (jnp.ones((4, 2)), None, r"B must be an array.*got NoneType"),
        (2.0, jnp.ones((1, 3)), r"A must be an array.*got float"),
    ],
)
def test_non_array_factors_are_rejected(A, B, match):
    with pytest.raises(TypeError, match=match):
        FactoredMatrix(A, B)


def test_zero_inner_dimension_is_rejected():
    with pytest.raises(ValueError, match=r"inner dimension m is 0.*\(2, 4, 0\).*\(2, 0, 3\)"):
        FactoredMatrix(jnp.ones((2, 4, 0)), jnp.ones((2, 0, 3)))


def test_pytree_rebuild_accepts_any_leaves():
    """tree_map may put None, specs or tuples in the factors' places (the constructor may not)."""
    M = FactoredMatrix(jnp.ones((2, 4, 3)), jnp.ones((3, 5)))
    assert jax.tree_util.tree_map(lambda x: None, M).A is None
    specs = jax.tree_util.tree_map(lambda x: 0 if x.ndim == 3 else None, M)
    assert (specs.A, specs.B) == (0, None)
    out = jax.vmap(lambda M: M.AB, in_axes=(specs,))(M)
    assert_rel_close(out, np.ones((2, 4, 5)) * 3)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(M)[0]]
    assert paths == [".A", ".B"]


@pytest.mark.parametrize(
    ("A", "B", "match"),
    [
        (jnp.ones((4, 3), jnp.int32), jnp.ones((3, 5)), r"factor A, got dtype int32.*astype"),
        (jnp.ones((4, 3)), jnp.ones((3, 5), jnp.complex64), r"floating-point factor B.*complex"),
        (jnp.ones((4, 3)), jnp.ones((3, 5), jnp.bfloat16), r"share a dtype.*float32.*bfloat16"),
    ],
)
def test_bad_dtypes(A, B, match):
    with pytest.raises(TypeError, match=match):
        FactoredMatrix(A, B)


# ---------------------------------------------------------- parity: TL + numpy
def test_products_and_transpose_match_tl_and_numpy(tl, factors):
    A, B = factors
    M, R = both(tl, A, B)
    assert_rel_close(M.AB, to_numpy(R.AB), what="AB vs TL")
    assert_rel_close(M.AB, dense(A, B), what="AB vs numpy")
    assert_rel_close(M.T.AB, to_numpy(R.T.AB), what="T vs TL")
    assert_rel_close(M.T.AB, np.swapaxes(dense(A, B), -1, -2), what="T vs numpy")
    if M.ldim == M.rdim:
        assert_rel_close(M.BA, to_numpy(R.BA), what="BA vs TL")
        assert_rel_close(M.BA, B.astype(np.float64) @ A.astype(np.float64), what="BA vs numpy")


def test_BA_of_non_square_raises():
    M = FactoredMatrix(jnp.ones((5, 2)), jnp.ones((2, 7)))
    with pytest.raises(ValueError, match=r"BA needs a square matrix.*\(5, 7\)"):
        _ = M.BA


def _matmul_cases(rng, l, r):
    """Right operands X [*, r, k] and left operands Y [*, k, l] covering both association rules."""
    return {
        "right_wide": rng.standard_normal((r, 50)).astype(np.float32),
        "right_narrow": rng.standard_normal((r, 3)).astype(np.float32),
        "right_batched": rng.standard_normal((*LEAD, r, 5)).astype(np.float32),
        "right_vector": rng.standard_normal((r,)).astype(np.float32),
        "left_wide": rng.standard_normal((50, l)).astype(np.float32),
        "left_narrow": rng.standard_normal((3, l)).astype(np.float32),
        "left_batched": rng.standard_normal((*LEAD, 5, l)).astype(np.float32),
        "left_vector": rng.standard_normal((l,)).astype(np.float32),
    }


def test_matmul_with_arrays_matches_tl_and_numpy(tl, factors):
    A, B = factors
    M, R = both(tl, A, B)
    AB = dense(A, B)
    for name, X in _matmul_cases(np.random.default_rng(2), M.ldim, M.rdim).items():
        if name.startswith("right"):
            ours, ref, exact = M @ jnp.asarray(X), R @ to_torch(X), AB @ X.astype(np.float64)
        else:
            ours, ref, exact = jnp.asarray(X) @ M, to_torch(X) @ R, X.astype(np.float64) @ AB
        if name.endswith("vector"):
            assert isinstance(ours, jax.Array), name
            assert_rel_close(ours, to_numpy(ref), what=f"{name} vs TL")
            assert_rel_close(ours, exact, what=f"{name} vs numpy")
            continue
        assert isinstance(ours, FactoredMatrix), name
        assert ours.mdim == ref.mdim, f"{name}: inner dim {ours.mdim} vs TL {ref.mdim}"
        # the new factor goes where the inner dimension stays smallest: min(m, r) or min(m, l)
        assert ours.mdim == min(M.mdim, M.rdim if name.startswith("right") else M.ldim)
        assert_rel_close(ours.AB, to_numpy(ref.AB), what=f"{name} vs TL")
        assert_rel_close(ours.AB, exact, what=f"{name} vs numpy")


def test_numpy_array_operands_defer_to_factored_matrix(factors):
    A, B = factors
    M = FactoredMatrix(A, B)
    X = np.ones((5, M.ldim), np.float32)
    assert isinstance(X @ M, FactoredMatrix)
    assert isinstance(M @ np.ones((M.rdim, 5), np.float32), FactoredMatrix)


def test_matmul_of_two_factored_matrices(tl, factors):
    A, B = factors
    rng = np.random.default_rng(3)
    C, D = random_factors(rng, LEAD, B.shape[-1], 6, 20)
    M, R = both(tl, A, B)
    N, S = both(tl, C, D)
    ours, ref = M @ N, R @ S
    assert isinstance(ours, FactoredMatrix)
    assert ours.mdim == ref.mdim == 6
    assert_rel_close(ours.AB, to_numpy(ref.AB), what="FM @ FM vs TL")
    assert_rel_close(ours.AB, dense(A, B) @ dense(C, D), what="FM @ FM vs numpy")


@pytest.mark.parametrize(
    ("make_op", "match"),
    [
        (lambda M: M @ jnp.ones((7, 2)), r"X has shape \(7, 2\).*X.shape\[-2\] must equal rdim"),
        (lambda M: jnp.ones((2, 7)) @ M, r"X has shape \(2, 7\).*X.shape\[-1\] must equal ldim"),
        (lambda M: M @ jnp.ones((7,)), r"vector has length 7"),
        (lambda M: M @ FactoredMatrix(jnp.ones((7, 2)), jnp.ones((2, 2))), r"rdim"),
        (lambda M: M * jnp.ones((3,)), r"needs a scalar.*\(3,\)"),
        (lambda M: M @ jnp.ones((), jnp.float32), r"scalar; use \*"),
    ],
)
def test_bad_products(make_op, match):
    M = FactoredMatrix(jnp.ones((4, 3)), jnp.ones((3, 5)))
    with pytest.raises(ValueError, match=match):
        make_op(M)


@pytest.mark.parametrize(
    ("make_op", "match"),
    [
        (
            lambda M: M @ jnp.ones((3, 5, 2)),
            r"^FactoredMatrix @ X: .*the matrix has shape "
            r"\(2, 4, 5\) and X has shape \(3, 5, 2\)",
        ),
        (
            lambda M: jnp.ones((3, 2, 4)) @ M,
            r"^X @ FactoredMatrix: .*X has shape \(3, 2, 4\) "
            r"and the matrix has shape \(2, 4, 5\)",
        ),
        (
            lambda M: M @ FactoredMatrix(jnp.ones((3, 5, 2)), jnp.ones((3, 2, 6))),
            r"^FactoredMatrix @ FactoredMatrix: .*M has shape \(2, 4, 5\) and N has shape "
            r"\(3, 5, 6\)",
        ),
        (lambda M: np.ones((3, 2, 4), np.float32) @ M, r"^X @ FactoredMatrix: .*\(3, 2, 4\)"),
    ],
    ids=["M@X", "X@M", "M@N", "numpy@M"],
)
def test_products_with_batch_axes_that_do_not_broadcast(make_op, match):
    M = FactoredMatrix(jnp.ones((2, 4, 3)), jnp.ones((2, 3, 5)))
    with pytest.raises(ValueError, match=r"leading \(batch\) dimensions do not broadcast") as err:
        make_op(M)
    assert re.search(match, str(err.value)), str(err.value)


def test_product_dtype_errors():
    M = FactoredMatrix(jnp.ones((4, 3)), jnp.ones((3, 5)))
    with pytest.raises(TypeError, match="real floating-point operand.*int32"):
        M @ jnp.ones((5, 2), jnp.int32)
    with pytest.raises(TypeError, match="matching dtypes.*float32.*bfloat16"):
        M @ jnp.ones((5, 2), jnp.bfloat16)
    with pytest.raises(TypeError, match="must be an array or FactoredMatrix"):
        M @ "x"
    with pytest.raises(TypeError, match="real float.*int32"):
        M * jnp.ones((), jnp.int32)


def test_scalar_multiplication(tl, factors):
    A, B = factors
    M, R = both(tl, A, B)
    for s in (2.5, jnp.float32(-1.5), jnp.array([3.0])):
        for prod in (M * s, s * M):
            assert isinstance(prod, FactoredMatrix)
            assert prod.shape == M.shape
            assert_rel_close(prod.AB, dense(A, B) * float(np.reshape(s, ())), what=str(s))
    assert_rel_close((2.5 * M).AB, to_numpy((2.5 * R).AB), what="scalar vs TL")
    assert_rel_close((-M).AB, -dense(A, B), what="negation")


@pytest.mark.parametrize(
    "s",
    [np.float32(2), np.float64(-0.5), np.int64(3), np.float16(2), jnp.float32(2), jnp.array(2.0)],
    ids=["np.float32", "np.float64", "np.int64", "np.float16", "jnp.float32", "jnp.array"],
)
def test_numpy_and_jax_scalars_on_either_side(s):
    A, B = random_factors(np.random.default_rng(6), (2,), 5, 3, 4)
    for M in (FactoredMatrix(A, B), FactoredMatrix(A.astype(jnp.bfloat16), B.astype(jnp.bfloat16))):
        jitted = (
            jax.jit(lambda M, s: s * M)(M, s) if jnp.issubdtype(s.dtype, jnp.floating) else M * s
        )
        for prod in (s * M, M * s, jitted):
            assert isinstance(prod, FactoredMatrix)
            assert prod.dtype == M.dtype and prod.shape == M.shape
            expected = np.asarray(M.AB, np.float64) * float(s)
            assert_rel_close(prod.AB, expected, rtol=1e-2 if M.dtype == jnp.bfloat16 else 1e-5)


@pytest.mark.parametrize(
    "make_op",
    [
        lambda M: np.ones(3, np.float32) * M,
        lambda M: M * np.ones(3, np.float32),
        lambda M: jnp.ones((2, 1)) * M,
    ],
    ids=["numpy*M", "M*numpy", "jax*M"],
)
def test_array_multiplier_is_an_error(make_op):
    M = FactoredMatrix(jnp.ones((4, 3)), jnp.ones((3, 5)))
    with pytest.raises(ValueError, match=r"needs a scalar, got an array of shape .*use @"):
        make_op(M)


# -------------------------------------------------------------------- indexing
INDEXES = [
    0,
    -1,
    (1, 2),
    (-1, -2),
    (slice(None), 1),
    (0, slice(1, 3)),
    (1, 2, 5),
    (1, 2, -1),
    (0, -1, slice(3, 9), 4),
    (-2, -1, -1, -1),
    (slice(None), slice(None), slice(2, 4), slice(None, None, 2)),
]


def _numpy_index(index, ndim):
    """The dense-array index TransformerLens's rules mean (ints on matrix axes keep the axis)."""
    index = list(index) if isinstance(index, tuple) else [index]
    if any(i is Ellipsis for i in index):
        k = index.index(Ellipsis)
        n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
        index[k : k + 1] = [slice(None)] * (ndim - n_real)
    real = [k for k, i in enumerate(index) if i is not None]
    for k in real[ndim - 2 :]:
        i = index[k]
        if isinstance(i, int):
            index[k] = slice(i, i + 1 if i != -1 else None)
    return tuple(index)


def _tl_index(index):
    """The same index for TransformerLens (arrays as torch tensors)."""
    index = index if isinstance(index, tuple) else (index,)
    return tuple(to_torch(np.asarray(i)) if hasattr(i, "dtype") else i for i in index)


@pytest.mark.parametrize("index", INDEXES, ids=str)
def test_getitem_matches_tl_and_numpy(tl, factors, index):
    A, B = factors
    M, R = both(tl, A, B)
    ours, ref = M[index], R[index]
    expected = dense(A, B)[_numpy_index(index, M.ndim)]
    assert ours.shape == tuple(ref.shape) == expected.shape
    assert_rel_close(ours.AB, to_numpy(ref.AB), what="vs TL")
    assert_rel_close(ours.AB, expected, what="vs numpy")


def test_getitem_ellipsis_none_and_broadcast_factors():
    rng = np.random.default_rng(4)
    A, B = random_factors(rng, (3,), 6, 2, 5, lead_b=(4, 1))
    M = FactoredMatrix(A, B)  # leading (4, 3); B broadcasts over axis 1, A over axis 0
    AB = dense(A, B)
    assert_rel_close(M[2].AB, AB[2])
    assert_rel_close(M[1, -1].AB, AB[1, -1])
    assert_rel_close(M[..., 4].AB, AB[..., 4:5])
    assert_rel_close(M[..., 1, :].AB, AB[..., 1:2, :])
    assert_rel_close(M[None, 1].AB, AB[None, 1])
    assert_rel_close(M[:, 1:, 2, 1:3].AB, AB[:, 1:, 2:3, 1:3])


@pytest.mark.parametrize(
    ("index", "error", "match"),
    [
        (3, IndexError, r"index 3 is out of range for leading axis 0 of size 2"),
        (-3, IndexError, r"index -3 is out of range for leading axis 0"),
        ((0, 0, 40), IndexError, r"index 40 is out of range for the row axis \(l\) of size 40"),
        ((0, 0, 0, -31), IndexError, r"out of range for the column axis \(r\) of size 30"),
        ((0, 0, 0, 0, 0), IndexError, r"5 entries, too many.*\(2, 3, 40, 30\)"),
        ((0, 0, None, 0), IndexError, r"new axes \(None\) may only be inserted among the leading"),
        ((..., 0, ...), IndexError, r"at most one Ellipsis"),
        ("a", TypeError, r"integer arrays or lists, slices, None or \.\.\., got str"),
        (1.5, TypeError, r"integer arrays or lists, slices, None or \.\.\., got float"),
    ],
)
def test_getitem_errors(index, error, match):
    A, B = random_factors(np.random.default_rng(0), LEAD, 40, 8, 30)
    with pytest.raises(error, match=match):
        FactoredMatrix(A, B)[index]


# Integer lists and arrays: NumPy's advanced indexing on M.AB, with TransformerLens's rule that
# an integer on a matrix axis keeps a size-1 axis. (index, TransformerLens gives the same)
ARRAY_INDEXES = [
    ([1, 0], True),
    (np.array([-1, 0, 1]), True),
    (jnp.array([1, 0]), True),
    (([1, 0, 1], [2, 0, -1]), True),
    ((slice(None), [2, 0]), True),
    ((np.array([[0], [1]]), np.array([0, 2])), True),
    (([1, 0], slice(None), slice(2, 5)), True),
    (([0, 1], 1), True),
    ((1, [2, 0]), True),
    (([1, 0], slice(None), 4), True),
    (([1, 0], slice(None), slice(None), 5), True),
    ((None, [1, 0]), True),
    ((slice(None), slice(None), [5, 0, -1]), True),
    ((1, 2, [5, 0, -1]), True),
    ((slice(None), 2, np.array([5, 0], np.int32)), True),
    ((1, 2, [5, 0], slice(2, 7)), True),
    ((1, 2, [5, 0], 3), True),
    ((..., [5, 0], slice(1, 4)), False),  # TransformerLens does not expand ...
    ((slice(None), slice(None), slice(None), [4, 0, -2]), True),
    ((..., [4, 0]), False),
    ((slice(None), slice(None), 7, [4, 0]), True),
    ((None, slice(None), slice(None), slice(1, 5), [0, 1]), True),
    ((..., []), False),
]


@pytest.mark.parametrize(("index", "tl_too"), ARRAY_INDEXES, ids=lambda x: str(x)[:40])
def test_getitem_with_index_arrays_matches_numpy_and_tl(tl, factors, index, tl_too):
    A, B = factors
    M, R = both(tl, A, B)
    ours = M[index]
    expected = dense(A, B)[_numpy_index(index, M.ndim)]
    assert ours.shape == expected.shape
    assert_rel_close(ours.AB, expected, rtol=1e-5, what="vs numpy")
    if tl_too:
        ref = R[_tl_index(index)]
        assert tuple(ref.shape) == ours.shape
        assert_rel_close(ours.AB, to_numpy(ref.AB), rtol=1e-5, what="vs TL")


@pytest.mark.parametrize(
    ("index", "tl_too"),
    [
        (([0, 1], slice(None), [1, 3]), True),  # separated: the paired axis goes to the front
        # torch (so TransformerLens) treats an integer next to an array as a basic index
        ((0, slice(None), [1, 3]), False),
        ((0, None, 1, [1, 3]), False),  # None separates too
        ((slice(None), [0, 2], [1, 3]), True),
        (([[0], [1]], slice(None), [1, 3], slice(1, 4)), True),
        ((0, 1, 2, [1, 3]), True),
        ((slice(None), 1, 2, [4, 0]), True),
    ],
    ids=lambda x: str(x)[:40],
)
def test_getitem_index_arrays_on_three_leading_axes(tl, index, tl_too):
    A, B = random_factors(np.random.default_rng(7), (2, 3, 4), 6, 2, 5)
    M, R = both(tl, A, B)
    expected = dense(A, B)[_numpy_index(index, M.ndim)]
    assert M[index].shape == expected.shape
    assert_rel_close(M[index].AB, expected, rtol=1e-5)
    if tl_too:
        assert_rel_close(M[index].AB, to_numpy(R[_tl_index(index)].AB), rtol=1e-5, what="vs TL")


@pytest.mark.parametrize(
    "index",
    [
        [0, 3],
        (slice(None), [2, 0]),
        ([0, 3], [2, 0]),
        ([[0], [3]], [2, 0]),
        (1, 2, [4, 0]),
        (..., [4, 0]),
        (slice(None), 1, [5, 0]),
        ([3, 1], slice(None), 2),
    ],
    ids=str,
)
def test_getitem_index_arrays_on_broadcast_factors(index):
    A, B = random_factors(np.random.default_rng(8), (3,), 6, 2, 5, lead_b=(4, 1))
    M = FactoredMatrix(A, B)  # leading (4, 3); B broadcasts over axis 1, A over axis 0
    expected = dense(A, B)[_numpy_index(index, M.ndim)]
    assert M[index].shape == expected.shape
    assert_rel_close(M[index].AB, expected, rtol=1e-5)


@pytest.mark.parametrize(
    ("index", "error", "match"),
    [
        (([0, 1], 0, [1, 2]), IndexError, r"index arrays on leading axes cannot be combined .*row"),
        ((..., [1, 2], [3, 4]), IndexError, r"both the row and the column axis"),
        ((0, slice(None), [1, 2]), IndexError, r"separated from the index array on the row axis"),
        ((0, None, 1, [1, 2]), IndexError, r"separated from the index array on the row axis"),
        ((1, 2, 3, [1, 2]), IndexError, r"separated from the index array on the column axis"),
        ((..., np.array([[1, 2]]), slice(None)), IndexError, r"row axis must be 1-D.*\(1, 2\)"),
        ([0, 2], IndexError, r"index 2 is out of range for leading axis 0 of size 2"),
        ((slice(None), [-4]), IndexError, r"index -4 is out of range for leading axis 1 of size 3"),
        ((..., [40], slice(None)), IndexError, r"index 40 is out of range for the row axis \(l\)"),
        ((..., [0, -31]), IndexError, r"index -31 is out of range for the column axis \(r\)"),
        (np.array(5), IndexError, r"index 5 is out of range for leading axis 0 of size 2"),
        ((0, 0, jnp.array(40)), IndexError, r"index 40 is out of range for the row axis"),
        (np.array([True, False]), TypeError, r"boolean masks are not supported.*flatnonzero"),
        ([0.5], TypeError, r"integer arrays or lists.*float64"),
        (jnp.array([1.0]), TypeError, r"integer arrays or lists.*float32"),
    ],
    ids=lambda x: str(x)[:40],
)
def test_getitem_index_array_errors(index, error, match):
    A, B = random_factors(np.random.default_rng(0), LEAD, 40, 8, 30)
    with pytest.raises(error, match=match):
        FactoredMatrix(A, B)[index]


def test_getitem_index_arrays_under_jit_and_vmap(factors):
    A, B = factors
    M = FactoredMatrix(A, B)
    AB = dense(A, B)
    for index in [([1, 0], 2), (1, 2, [5, 0, -1]), (..., [4, 0]), (slice(None), [2, 0])]:
        got = jax.jit(lambda M, index=index: M[index].AB)(M)  # concrete indices, checked
        assert_rel_close(got, AB[_numpy_index(index, 4)], rtol=1e-5, what=str(index))
    with pytest.raises(IndexError, match="index 2 is out of range for leading axis 0"):
        jax.jit(lambda M: M[[0, 2]].AB)(M)
    # traced index arrays (not range-checked); negative entries count from the end
    got = jax.jit(lambda M, i: M[i].AB)(M, jnp.array([1, 0]))
    assert_rel_close(got, AB[[1, 0]], rtol=1e-5)
    got = jax.jit(lambda M, i, rows: M[1, i, rows].AB)(M, 2, jnp.array([5, 0, -1]))
    assert_rel_close(got, AB[1, 2, [5, 0, -1]], rtol=1e-5)
    got = jax.jit(lambda M, cols: M[..., cols].AB)(M, jnp.array([4, 0]))
    assert_rel_close(got, AB[..., [4, 0]], rtol=1e-5)
    # under vmap over the first leading axis
    assert_rel_close(jax.vmap(lambda M: M[[2, 0]].AB)(M), AB[:, [2, 0]], rtol=1e-5)
    assert_rel_close(jax.vmap(lambda M: M[1, [5, 0]].AB)(M), AB[:, 1, [5, 0]], rtol=1e-5)


def test_getitem_with_traced_index_under_jit(factors):
    A, B = factors
    M = FactoredMatrix(A, B)
    got = jax.jit(lambda M, i, j: M[i, 1, j].AB)(M, 1, 7)
    assert_rel_close(got, dense(A, B)[1, 1, 7:8])


# ------------------------------------------------------------- other helpers
@pytest.mark.parametrize("axis", [0, 1, 2, -3, -4, -5])
def test_unsqueeze(tl, factors, axis):
    """Like np.expand_dims(M.AB, axis) and TransformerLens: negative axes count over the result."""
    A, B = factors
    M, R = both(tl, A, B)
    ours = M.unsqueeze(axis)
    expected = np.expand_dims(dense(A, B), axis)
    assert ours.shape == expected.shape == tuple(R.unsqueeze(axis).shape)
    assert_rel_close(ours.AB, expected)
    assert_rel_close(ours.AB, to_numpy(R.unsqueeze(axis).AB), what="vs TL")


def test_unsqueeze_of_a_single_matrix_and_broadcast_factors():
    M = FactoredMatrix(jnp.ones((4, 2)), jnp.ones((2, 5)))
    assert M.unsqueeze(0).shape == M.unsqueeze(-3).shape == (1, 4, 5)
    A, B = random_factors(np.random.default_rng(9), (3,), 6, 2, 5, lead_b=(4, 1))
    M = FactoredMatrix(A, B)
    for axis in (0, 1, 2, -3, -4, -5):
        assert_rel_close(M.unsqueeze(axis).AB, np.expand_dims(dense(A, B), axis))


@pytest.mark.parametrize("axis", [3, -1, -2, -6])
def test_unsqueeze_out_of_range(axis):
    """-1 and -2 would split the matrix (TransformerLens fails there with an AssertionError)."""
    A, B = random_factors(np.random.default_rng(0), LEAD, 5, 2, 5)
    with pytest.raises(ValueError, match=rf"axis {axis} is out of range.*0\.\.2 or -5\.\.-3"):
        FactoredMatrix(A, B).unsqueeze(axis)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_get_corner(tl, factors, k):
    A, B = factors
    M, R = both(tl, A, B)
    assert_rel_close(M.get_corner(k), to_numpy(R.get_corner(k)), what="vs TL")
    assert_rel_close(M.get_corner(k), dense(A, B)[:k, :k, :k, :k], what="vs numpy")


# ---------------------------------------------------------------- JAX transforms
def test_jit_argument_and_return_value(factors):
    A, B = factors
    M = FactoredMatrix(A, B)
    out = jax.jit(lambda M, x: (M @ x).T)(M, jnp.ones((M.rdim, 3)))
    assert isinstance(out, FactoredMatrix)
    expected = np.swapaxes(dense(A, B) @ np.ones((M.rdim, 3)), -1, -2)
    assert_rel_close(out.AB, expected)


@pytest.mark.parametrize("axis", [0, 1])
def test_vmap_over_leading_axes(factors, axis):
    A, B = factors
    M = FactoredMatrix(A, B)
    X = jnp.ones((M.rdim, 2))
    out = jax.vmap(lambda M: (M @ X).AB, in_axes=axis)(M)
    assert_rel_close(out, np.moveaxis(dense(A, B) @ np.ones((M.rdim, 2)), axis, 0))
    rows = jax.vmap(lambda M: M[0].AB, in_axes=axis, out_axes=axis)(M)
    expected = dense(A, B)[:, 0] if axis == 0 else dense(A, B)[0]
    assert_rel_close(jnp.moveaxis(rows, axis, 0) if axis else rows, expected)


def test_vmap_of_factored_output():
    rng = np.random.default_rng(5)
    A, B = random_factors(rng, (4,), 6, 2, 6)
    out = jax.vmap(lambda a, b: FactoredMatrix(a, b).T)(A, B)
    assert isinstance(out, FactoredMatrix) and out.shape == (4, 6, 6)
    assert_rel_close(out.AB, np.swapaxes(dense(A, B), -1, -2))


@pytest.mark.parametrize(
    ("A_shape", "B_shape", "match"),
    [
        ((3, 6, 2), (2, 5), "(?s)inconsistent sizes.*M.B"),
        # B's row axis happens to have the mapped size: without the check it would be mapped
        ((3, 6, 3), (3, 5), "B must have at least 2 dimensions"),
    ],
)
def test_vmap_over_missing_axis_is_an_error_not_a_wrong_answer(A_shape, B_shape, match):
    M = FactoredMatrix(jnp.ones(A_shape), jnp.ones(B_shape))
    with pytest.raises(ValueError, match=match):
        jax.vmap(lambda M: M.AB)(M)


def test_grad_through_factors(factors):
    A, B = factors
    g = jax.grad(lambda M: jnp.sum((M @ jnp.ones((M.rdim,))) ** 2))(FactoredMatrix(A, B))
    assert isinstance(g, FactoredMatrix) and g.A.shape == A.shape and g.B.shape == B.shape
    ones = np.ones(B.shape[-1])
    y = dense(A, B) @ ones  # d/dA sum(y^2) = 2 y (B 1)^T
    expected = 2 * y[..., :, None] * (B.astype(np.float64) @ ones)[..., None, :]
    assert_rel_close(g.A, expected)


# ------------------------------------------------------------------ pytree API
def test_tree_util_round_trip(factors):
    A, B = factors
    M = FactoredMatrix(A, B)
    leaves, treedef = jax.tree_util.tree_flatten(M)
    assert len(leaves) == 2
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(again, FactoredMatrix)
    np.testing.assert_array_equal(again.AB, M.AB)
    doubled = jax.tree_util.tree_map(lambda x: 2 * x, M)
    assert_rel_close(doubled.AB, 4 * dense(A, B))
    shapes = jax.tree_util.tree_map(lambda x: x.shape, M)  # non-array leaves are allowed
    assert shapes.A == A.shape


def test_device_put_round_trip(factors):
    A, B = factors
    M = FactoredMatrix(A, B)
    device = jax.devices()[-1]
    moved = jax.device_put(M, device)
    assert isinstance(moved, FactoredMatrix)
    assert moved.A.devices() == {device} and moved.B.devices() == {device}
    np.testing.assert_array_equal(moved.AB, M.AB)


def test_flax_serialization_round_trip(factors):
    A, B = factors
    M = FactoredMatrix(A, B)
    blob = flax.serialization.to_bytes(M)
    template = FactoredMatrix(jnp.zeros_like(M.A), jnp.zeros_like(M.B))
    again = flax.serialization.from_bytes(template, blob)
    assert isinstance(again, FactoredMatrix)
    np.testing.assert_array_equal(again.A, M.A)
    np.testing.assert_array_equal(again.B, M.B)
    state = flax.serialization.to_state_dict(M)
    assert set(state) == {"A", "B"}


def test_eval_shape():
    spec = FactoredMatrix(
        jax.ShapeDtypeStruct((2, 5, 3), jnp.float32), jax.ShapeDtypeStruct((2, 3, 5), jnp.float32)
    )
    out = jax.eval_shape(lambda M: M @ jnp.ones((5, 9)), spec)
    assert isinstance(out, FactoredMatrix) and out.shape == (2, 5, 9) and out.mdim == 3


def test_module_text_names_only_files_of_this_project():
    import lowrank.factored

    source = pathlib.Path(lowrank.factored.__file__)
    root = source.parent.parent
    for name in re.findall(r"[\w/.-]+\.py\b", source.read_text()):
        assert (root / name).exists() or (source.parent / name).exists(), name
