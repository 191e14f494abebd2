"""FactoredMatrix: a matrix kept as the product of two factors, as an immutable pytree.

Also declares the linear algebra on it (:func:`svd`, :func:`svdvals`, :func:`eigvals`,
:func:`eig`, :func:`norm`, :func:`trace`) as generic functions (``functools.singledispatch``)
that take a ``FactoredMatrix`` or a dense array; :mod:`lowrank.linalg` registers their
implementations.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from lowrank._util import check_real_float, mT

Array = jax.Array


def _is_arraylike(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def _check_factor_type(name: str, x: Any) -> None:
    """A factor passed to the constructor must be an array (jax, NumPy, torch) or a shape spec."""
    if not (_is_arraylike(x) or _needs_conversion(x)):
        raise TypeError(
            f"FactoredMatrix: {name} must be an array of shape [..., rows, cols] (jax, NumPy or "
            f"torch), got {type(x).__name__}"
        )


def _check_factor(name: str, x: Any) -> None:
    if x.ndim < 2:
        raise ValueError(
            f"FactoredMatrix: {name} must have at least 2 dimensions [..., rows, cols], "
            f"got shape {tuple(x.shape)}"
        )
    check_real_float(
        x, "FactoredMatrix", f"factor {name}", f"; cast it, e.g. {name}.astype(jnp.float32)"
    )


@dataclasses.dataclass(frozen=True, eq=False)
class FactoredMatrix:
    """The matrix ``A @ B`` kept as its factors.

    ``A: [..., l, m]`` and ``B: [..., m, r]``; leading axes (layers, heads, ...) are batch
    axes that broadcast against each other, as in NumPy. The factors are stored as given
    (a broadcast copy is never made), so to ``jax.vmap`` over a leading axis both factors
    must have it; ``M.broadcast()`` expands them when needed.

    Operations follow TransformerLens's ``FactoredMatrix``: ``M @ X`` stays factored and keeps
    the smaller inner dimension, ``M @ v`` for a vector returns an array, indexing acts on
    leading axes first. The linear algebra (``svd``, ``eigvals``, ``norm``, ...) lives in
    :mod:`lowrank.linalg`; the methods here are thin sugar over it.
    """

    A: Array
    B: Array

    # numpy and jax defer to our __rmatmul__ / __rmul__ instead of treating us as an array.
    __array_ufunc__ = None
    __array_priority__ = 1000

    def __post_init__(self) -> None:
        for name in ("A", "B"):
            _check_factor_type(name, getattr(self, name))
        _set_factors(self, self.A, self.B)

    # ----------------------------------------------------------------- shape
    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Broadcast leading shape of the two factors."""
        return tuple(np.broadcast_shapes(self.A.shape[:-2], self.B.shape[:-2]))

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape ``(*batch_shape, ldim, rdim)`` of the product ``A @ B``."""
        return (*self.batch_shape, self.ldim, self.rdim)

    @property
    def ndim(self) -> int:
        """Number of axes of the product, batch axes included."""
        return len(self.shape)

    @property
    def ldim(self) -> int:
        """Number of rows ``l`` of the product (rows of ``A``)."""
        return int(self.A.shape[-2])

    @property
    def mdim(self) -> int:
        """Inner dimension ``m`` shared by the factors (the rank bound)."""
        return int(self.A.shape[-1])

    @property
    def rdim(self) -> int:
        """Number of columns ``r`` of the product (columns of ``B``)."""
        return int(self.B.shape[-1])

    @property
    def dtype(self) -> Any:
        """Dtype of the factor ``A``."""
        return self.A.dtype

    @property
    def pair(self) -> tuple[Array, Array]:
        """The factors ``(A, B)``."""
        return self.A, self.B

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={self.shape}, mdim={self.mdim}, dtype={self.dtype})"

    # ------------------------------------------------------------ products
    @property
    def AB(self) -> Array:
        """The full product ``A @ B: [..., l, r]`` (materialised)."""
        return jnp.matmul(self.A, self.B)

    @property
    def BA(self) -> Array:
        """The reverse product ``B @ A: [..., m, m]``; only defined when ``l == r``."""
        if self.ldim != self.rdim:
            raise ValueError(
                f"FactoredMatrix.BA needs a square matrix (ldim == rdim), got shape {self.shape}"
            )
        return jnp.matmul(self.B, self.A)

    @property
    def T(self) -> FactoredMatrix:
        """Transpose of the last two axes: ``B^T @ A^T``."""
        return FactoredMatrix(jnp.swapaxes(self.B, -1, -2), jnp.swapaxes(self.A, -1, -2))

    def broadcast(self) -> FactoredMatrix:
        """Both factors expanded to the full leading shape (materialises the copy)."""
        lead = self.batch_shape
        return FactoredMatrix(
            jnp.broadcast_to(self.A, (*lead, self.ldim, self.mdim)),
            jnp.broadcast_to(self.B, (*lead, self.mdim, self.rdim)),
        )

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, FactoredMatrix):
            _check_batch("FactoredMatrix @ FactoredMatrix", ("M", self.shape), ("N", other.shape))
            return (self @ other.A) @ other.B
        other = _as_operand(other, "right operand of FactoredMatrix @ X")
        _check_operand_dtype(self, other)
        if other.ndim == 1:
            if other.shape[0] != self.rdim:
                raise ValueError(
                    f"FactoredMatrix @ vector: vector has length {other.shape[0]} but the matrix "
                    f"has shape {self.shape} (needs rdim={self.rdim})"
                )
            return jnp.matmul(self.A, jnp.matmul(self.B, other[:, None]))[..., 0]
        if other.shape[-2] != self.rdim:
            raise ValueError(
                f"FactoredMatrix @ X: X has shape {tuple(other.shape)} but the matrix has shape "
                f"{self.shape}; X.shape[-2] must equal rdim={self.rdim}"
            )
        _check_batch("FactoredMatrix @ X", ("the matrix", self.shape), ("X", other.shape))
        if self.rdim > self.mdim:
            return FactoredMatrix(self.A, jnp.matmul(self.B, other))
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: Any) -> Any:
        other = _as_operand(other, "left operand of X @ FactoredMatrix")
        _check_operand_dtype(self, other)
        if other.shape[-1] != self.ldim:
            raise ValueError(
                f"X @ FactoredMatrix: X has shape {tuple(other.shape)} but the matrix has shape "
                f"{self.shape}; X.shape[-1] must equal ldim={self.ldim}"
            )
        if other.ndim == 1:
            return jnp.matmul(jnp.matmul(other[None, :], self.A), self.B)[..., 0, :]
        _check_batch("X @ FactoredMatrix", ("X", other.shape), ("the matrix", self.shape))
        if self.ldim > self.mdim:
            return FactoredMatrix(jnp.matmul(other, self.A), self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar: Any) -> FactoredMatrix:
        """Scalar multiple (the scalar goes into ``A``); use ``@`` for matrix products."""
        factor = _as_scalar(scalar, self.dtype)
        if factor is None:
            return NotImplemented
        return FactoredMatrix(self.A * factor, self.B)

    __rmul__ = __mul__

    def __neg__(self) -> FactoredMatrix:
        return FactoredMatrix(-self.A, self.B)

    # ------------------------------------------------------------ indexing
    def __getitem__(self, index: Any) -> FactoredMatrix:
        """Index leading axes first, then rows (``l``), then columns (``r``), as ``M.AB[index]``.

        Entries are integers, slices, ``None`` (leading axes only), ``...``, and integer arrays
        or lists (NumPy's advanced indexing, negative entries count from the end). Integer
        indices on the row or column axis keep a size-1 axis so the result stays a matrix
        (TransformerLens's rule). An index array on a matrix axis must be 1-D and may be combined
        with slices, and with integers right before the row axis; other combinations would not
        give a matrix and raise ``IndexError``, as do concrete out-of-range indices (traced ones
        are not checked). Boolean masks are not supported.
        """
        return _getitem(self, index)

    def unsqueeze(self, axis: int) -> FactoredMatrix:
        """Insert a size-1 leading axis, like ``np.expand_dims(M.AB, axis)`` (and TransformerLens).

        ``axis`` is ``0..n`` for ``n`` leading axes, or negative counting from the end of the
        result: ``-3`` goes just before the matrix axes; ``-1`` and ``-2`` would split the matrix
        and raise ``ValueError``.
        """
        n_lead = self.ndim - 2
        axis = operator.index(axis)
        pos = axis + self.ndim + 1 if axis < 0 else axis
        if not 0 <= pos <= n_lead:
            raise ValueError(
                f"FactoredMatrix.unsqueeze: axis {axis} is out of range for a matrix of shape "
                f"{self.shape}; the new axis must be a leading one: 0..{n_lead} or "
                f"{-(self.ndim + 1)}..-3"
            )
        A, B = _pad_leading(self.A, n_lead), _pad_leading(self.B, n_lead)
        return FactoredMatrix(jnp.expand_dims(A, pos), jnp.expand_dims(B, pos))

    def get_corner(self, k: int = 3) -> Array:
        """The top-left ``k x k`` block of every leading index slice, ``[:k, ..., :k]``."""
        corner = jnp.matmul(self.A[..., :k, :], self.B[..., :, :k])
        lead = self.batch_shape
        corner = jnp.broadcast_to(corner, (*lead, *corner.shape[-2:]))
        return corner[tuple(slice(k) for _ in range(corner.ndim))]

    # ------------------------------------------ linear algebra (generic functions below)
    def svd(self) -> tuple[Array, Array, Array]:
        """``U, S, Vh`` with ``A @ B == U @ diag(S) @ Vh`` (``Vh`` is really ``V^T``)."""
        return svd(self)

    @property
    def S(self) -> Array:
        """Singular values ``[..., k]`` in descending order."""
        return svdvals(self)

    @property
    def U(self) -> Array:
        """Left singular vectors as columns: ``[..., l, k]``."""
        return self.svd()[0]

    @property
    def Vh(self) -> Array:
        """Right singular vectors as rows: ``[..., k, r]`` (the honest ``V^T``)."""
        return self.svd()[2]

    @property
    def V(self) -> Array:
        """Right singular vectors as columns, ``[..., r, k]`` (TransformerLens's ``V``)."""
        return mT(self.Vh)

    @property
    def eigenvalues(self) -> Array:
        """Eigenvalues of the square matrix, as :func:`eigvals` returns them."""
        return eigvals(self)

    def eig(self) -> tuple[Array, Array]:
        """Eigenvalues and unit right eigenvectors, as :func:`eig` returns them."""
        return eig(self)

    def norm(self) -> Array:
        """Frobenius norm ``[...]`` of the product."""
        return norm(self)

    def trace(self) -> Array:
        """Trace ``[...]`` of the square product."""
        return trace(self)

    def collapse_l(self) -> Array:
        """``diag(S) @ Vh: [..., k, r]`` (drops the orthogonal left factor)."""
        U, S, Vh = self.svd()
        return S[..., :, None] * Vh

    def collapse_r(self) -> Array:
        """``U @ diag(S): [..., l, k]`` (drops the orthogonal right factor)."""
        U, S, Vh = self.svd()
        return U * S[..., None, :]

    def make_even(self) -> FactoredMatrix:
        """The same matrix as ``(U sqrt(S)) @ (sqrt(S) Vh)``: balanced, orthogonal factors."""
        U, S, Vh = self.svd()
        root = jnp.sqrt(S)
        return FactoredMatrix(U * root[..., None, :], root[..., :, None] * Vh)


# --------------------------------------------------------------------------- linear algebra
def _unsupported(fn: str, x: Any) -> TypeError:
    return TypeError(
        f"{fn}: expected a FactoredMatrix or an array (jax.Array or numpy.ndarray) [..., l, r], "
        f"got {type(x).__name__}"
    )


@functools.singledispatch
def svd(M: Any) -> tuple[Array, Array, Array]:
    """Thin SVD ``M == U @ diag(S) @ Vh`` of a FactoredMatrix or an array.

    ``M`` is a FactoredMatrix ``A @ B`` (the product is never formed) or an array ``[..., l, r]``.

    Returns:
        ``U: [..., l, k]``, ``S: [..., k]`` (descending), ``Vh: [..., k, r]`` with
        ``k = min(l, m, r)`` (``min(l, r)`` for an array). ``Vh`` holds the right singular
        vectors as rows; the TransformerLens-style ``V`` (columns) is ``FactoredMatrix.V``.
        Gradients are finite for rank-deficient factors too.
    """
    raise _unsupported("svd", M)


@functools.singledispatch
def svdvals(M: Any) -> Array:
    """Singular values ``[..., min(l, m, r)]`` in descending order.

    Differentiable as ``ds_i = u_i^T dM v_i`` (finite for rank-deficient factors).
    """
    raise _unsupported("svdvals", M)


@functools.singledispatch
def eigvals(M: Any) -> Array:
    """Eigenvalues of a square matrix, unsorted, complex.

    For a FactoredMatrix they are the eigenvalues of ``B @ A`` (``m x m``): the nonzero spectrum
    of ``A @ B`` plus zeros. When ``m > l`` the ``l x l`` product is used instead, so the result
    has ``min(l, m)`` entries.
    """
    raise _unsupported("eigvals", M)


@functools.singledispatch
def eig(M: Any) -> tuple[Array, Array]:
    """Eigenvalues ``[..., k]`` and unit right eigenvectors ``[..., l, k]`` of a square matrix.

    For a FactoredMatrix ``k = min(l, m)`` as in :func:`eigvals`; columns for zero eigenvalues
    may be zero.
    """
    raise _unsupported("eig", M)


@functools.singledispatch
def norm(M: Any) -> Array:
    """Frobenius norm ``[...]``, computed without an SVD.

    Accurate wherever it is representable; its gradient at zero is zero (a subgradient).
    """
    raise _unsupported("norm", M)


@functools.singledispatch
def trace(M: Any) -> Array:
    """Trace ``[...]`` of a square matrix (``sum_ij A_ij B_ji`` for a FactoredMatrix)."""
    raise _unsupported("trace", M)


def _set_factors(M: FactoredMatrix, A: Any, B: Any) -> None:
    """Store the factors (array-likes become jax arrays) and check them when both are arrays.

    Pytree utilities rebuild instances with arbitrary leaves (None, sentinels, specs): those
    are stored unchecked.
    """
    A, B = (jnp.asarray(np.asarray(x)) if _needs_conversion(x) else x for x in (A, B))
    object.__setattr__(M, "A", A)
    object.__setattr__(M, "B", B)
    if _is_arraylike(A) and _is_arraylike(B):
        _check_pair(A, B)


def _check_pair(A: Any, B: Any) -> None:
    _check_factor("A", A)
    _check_factor("B", B)
    if A.shape[-1] != B.shape[-2]:
        raise ValueError(
            "FactoredMatrix: inner dimensions differ: A has shape "
            f"{tuple(A.shape)} [..., l, m] and B has shape {tuple(B.shape)} [..., m, r], "
            f"but A.shape[-1]={A.shape[-1]} != B.shape[-2]={B.shape[-2]}"
        )
    if A.shape[-1] == 0:
        raise ValueError(
            f"FactoredMatrix: the inner dimension m is 0 (A has shape {tuple(A.shape)}, B has "
            f"shape {tuple(B.shape)}); A @ B would be all zeros, build it with jnp.zeros"
        )
    if A.dtype != B.dtype:
        raise TypeError(
            f"FactoredMatrix: A and B must share a dtype, got A {A.dtype} (shape "
            f"{tuple(A.shape)}) and B {B.dtype} (shape {tuple(B.shape)})"
        )
    _check_batch("FactoredMatrix", ("A", A.shape), ("B", B.shape))


def _check_batch(what: str, left: tuple[str, Any], right: tuple[str, Any]) -> None:
    """Leading (batch) axes of two named ``[..., rows, cols]`` shapes must broadcast."""
    (left_name, left_shape), (right_name, right_shape) = left, right
    try:
        np.broadcast_shapes(tuple(left_shape[:-2]), tuple(right_shape[:-2]))
    except ValueError:
        raise ValueError(
            f"{what}: leading (batch) dimensions do not broadcast: {left_name} has shape "
            f"{tuple(left_shape)} and {right_name} has shape {tuple(right_shape)}"
        ) from None


def _unflatten(_: None, children: Any) -> FactoredMatrix:
    """Pytree rebuild: like the constructor, but any leaves are allowed (see ``_set_factors``)."""
    M = object.__new__(FactoredMatrix)
    _set_factors(M, *children)
    return M


jax.tree_util.register_pytree_with_keys(
    FactoredMatrix,
    lambda M: (((jax.tree_util.GetAttrKey("A"), M.A), (jax.tree_util.GetAttrKey("B"), M.B)), None),
    _unflatten,
    flatten_func=lambda M: ((M.A, M.B), None),
)


def _needs_conversion(x: Any) -> bool:
    """NumPy arrays and other array-likes (e.g. CPU torch tensors) become jax arrays."""
    return not isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and hasattr(x, "__array__")


def _as_operand(x: Any, what: str) -> Array:
    if _needs_conversion(x):
        x = jnp.asarray(np.asarray(x))
    if not isinstance(x, jax.Array):
        raise TypeError(f"{what} must be an array or FactoredMatrix, got {type(x).__name__}")
    if x.ndim == 0:
        raise ValueError(f"{what} is a scalar; use * for scalar multiples")
    return x


def _as_scalar(x: Any, dtype: Any) -> Any:
    """The multiplier for ``FactoredMatrix * x``, or None when ``x`` is no number or array.

    Python and NumPy scalars become Python numbers (weakly typed: the factor keeps its dtype);
    a one-element float array becomes a 0-d array of ``dtype``.
    """
    if isinstance(x, (bool, np.bool_)):
        return None
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, (int, float)):
        return x
    if not isinstance(x, (jax.Array, np.ndarray)):
        return None
    if math.prod(x.shape) != 1:
        raise ValueError(
            f"FactoredMatrix * x needs a scalar, got an array of shape {tuple(x.shape)}; "
            "use @ for matrix products"
        )
    check_real_float(x, "FactoredMatrix * x", "scalar x")
    return jnp.reshape(x, ()).astype(dtype)


def _check_operand_dtype(M: FactoredMatrix, x: Array) -> None:
    check_real_float(x, "FactoredMatrix products", "operand")
    if x.dtype != M.dtype:
        raise TypeError(
            f"FactoredMatrix products need matching dtypes: the matrix is {M.dtype}, "
            f"the operand (shape {tuple(x.shape)}) is {x.dtype}"
        )


def _pad_leading(x: Array, n_lead: int) -> Array:
    """Reshape ``x`` so that it has exactly ``n_lead`` leading axes (size-1 ones added in front)."""
    missing = n_lead - (x.ndim - 2)
    return jnp.reshape(x, (1,) * missing + tuple(x.shape)) if missing else x


def _is_int_index(i: Any) -> bool:
    if isinstance(i, bool):
        return False
    if isinstance(i, (int, np.integer)):
        return True
    return _is_arraylike(i) and i.ndim == 0 and jnp.issubdtype(i.dtype, jnp.integer)


def _is_index_array(i: Any) -> bool:
    """An integer index array with at least one axis (an advanced index in NumPy's terms)."""
    return isinstance(i, (jax.Array, np.ndarray)) and i.ndim >= 1


def _index_entry(i: Any) -> Any:
    """One index entry as None, ..., a slice, an integer or an integer array (lists converted)."""
    if i is None or i is Ellipsis or isinstance(i, slice) or _is_int_index(i):
        return i
    if isinstance(i, list) or _needs_conversion(i):
        i = _list_index(i)
    if isinstance(i, (jax.Array, np.ndarray)) and i.dtype == bool:
        raise TypeError(
            "FactoredMatrix indices: boolean masks are not supported; pass the integer "
            "positions instead, e.g. np.flatnonzero(mask)"
        )
    if isinstance(i, (jax.Array, np.ndarray)) and jnp.issubdtype(i.dtype, jnp.integer):
        return i
    raise TypeError(
        "FactoredMatrix indices must be integers, integer arrays or lists, slices, None or ..., "
        f"got {type(i).__name__}" + (f" of dtype {i.dtype}" if hasattr(i, "dtype") else "")
    )


def _list_index(i: Any) -> Any:
    """An index list (or other array-like) as an array; an empty list indexes nothing."""
    if isinstance(i, list) and any(isinstance(e, jax.Array) for e in i):
        return jnp.asarray(i)
    try:
        values = np.asarray(i)
    except (TypeError, ValueError):
        raise TypeError(f"FactoredMatrix index lists must hold integers, got {i!r}") from None
    return values.astype(np.intp) if values.size == 0 else values


def _normalise_entry(i: Any, size: int, axis_name: str, shape: tuple[int, ...]) -> Any:
    """Bounds-check a concrete integer or index array and wrap negative values as NumPy does.

    Traced (jitted) indices pass through unchecked.
    """
    if isinstance(i, jax.core.Tracer) or not (_is_int_index(i) or _is_index_array(i)):
        return i
    values = np.asarray(i)
    bad = values[(values < -size) | (values >= size)]
    if bad.size:
        raise IndexError(
            f"FactoredMatrix index {int(bad.flat[0])} is out of range for {axis_name} of size "
            f"{size} (matrix shape {shape})"
        )
    return (
        operator.index(i) % size
        if values.ndim == 0
        else np.where(values < 0, values + size, values)
    )


def _expand_index(index: Any, ndim: int, shape: tuple[int, ...]) -> list[Any]:
    """Return one entry per axis (ints, arrays, slices) plus None markers for new axes."""
    if not isinstance(index, tuple):
        index = (index,)
    index = tuple(_index_entry(i) for i in index)
    n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
    if sum(1 for i in index if i is Ellipsis) > 1:
        raise IndexError("FactoredMatrix index can contain at most one Ellipsis (...)")
    if n_real > ndim:
        raise IndexError(
            f"FactoredMatrix index has {n_real} entries, too many for a matrix of shape {shape}"
        )
    out: list[Any] = []
    for i in index:
        if i is Ellipsis:
            out.extend([slice(None)] * (ndim - n_real))
        else:
            out.append(i)
    return out


def _split_index(entries: list[Any], shape: tuple[int, ...]) -> tuple[list[Any], Any, Any]:
    """Leading-axes entries (with None markers), the row entry and the column entry, checked."""
    n_lead = len(shape) - 2
    names = [f"leading axis {k}" for k in range(n_lead)] + [
        "the row axis (l)",
        "the column axis (r)",
    ]
    lead: list[Any] = []
    matrix: list[Any] = []
    seen = 0
    for i in entries:
        if i is None:
            if seen >= n_lead:
                raise IndexError(
                    "FactoredMatrix: new axes (None) may only be inserted among the leading "
                    f"axes of a matrix of shape {shape}"
                )
            lead.append(None)
            continue
        i = _normalise_entry(i, shape[seen], names[seen], shape)
        if seen < n_lead:
            lead.append(i)
        else:
            matrix.append(i)
        seen += 1
    matrix += [slice(None)] * (2 - len(matrix))
    return lead, matrix[0], matrix[1]


def _check_matrix_arrays(lead: list[Any], row: Any, col: Any) -> None:
    """Allow an index array on a matrix axis only where NumPy leaves its axis in place.

    NumPy broadcasts all array indices (and, alongside them, integer ones) together and moves
    the result to the front when a slice or None separates them; with an array on a matrix
    axis, anything but "integers right before the row array" would not leave a matrix.
    """
    on_row, on_col = _is_index_array(row), _is_index_array(col)
    if not (on_row or on_col):
        return
    if on_row and on_col:
        raise IndexError(
            "FactoredMatrix: index arrays on both the row and the column axis pick single "
            "entries, not a matrix; index one axis at a time, M[..., rows, :][..., cols], "
            "or index M.AB"
        )
    where, array = ("row", row) if on_row else ("column", col)
    if array.ndim != 1:
        raise IndexError(
            f"FactoredMatrix: an index array on the {where} axis must be 1-D, got shape "
            f"{tuple(array.shape)}"
        )
    if any(_is_index_array(i) for i in lead):
        raise IndexError(
            f"FactoredMatrix: index arrays on leading axes cannot be combined with one on the "
            f"{where} axis (NumPy pairs them entry by entry, which is not a matrix); index the "
            "leading axes first, e.g. M[lead][..., rows, :]"
        )
    ints = [k for k, i in enumerate(lead) if _is_int_index(i)]
    if ints and (on_col or not all(_is_int_index(i) for i in lead[ints[0] :])):
        raise IndexError(
            f"FactoredMatrix: integer indices on leading axes are separated from the index "
            f"array on the {where} axis (by a slice, None or the row axis), so NumPy would move "
            "the array's axis to the front, which is not a matrix; index the leading axes "
            "first, e.g. M[0][..., rows, :] or M[0][..., cols]"
        )


def _getitem(M: FactoredMatrix, index: Any) -> FactoredMatrix:
    shape = M.shape
    n_lead = M.ndim - 2
    lead, row, col = _split_index(_expand_index(index, M.ndim, shape), shape)
    _check_matrix_arrays(lead, row, col)
    A = _pad_leading(M.A, n_lead)
    B = _pad_leading(M.B, n_lead)
    A = A[_factor_index(A, lead, shape)]
    B = B[_factor_index(B, lead, shape)]
    return FactoredMatrix(_index_matrix_axis(A, row, -2), _index_matrix_axis(B, col, -1))


def _factor_index(x: Array, lead_idx: list[Any], shape: tuple[int, ...]) -> tuple[Any, ...]:
    """Adapt a leading-axes index to a factor whose broadcast axes have size 1."""
    out: list[Any] = []
    axis = 0
    for i in lead_idx:
        if i is None:
            out.append(None)
            continue
        if x.shape[axis] == 1 and shape[axis] != 1:
            out.append(_index_zero(i))
        else:
            out.append(i)
        axis += 1
    return tuple(out)


def _index_zero(i: Any) -> Any:
    """The entry that picks position 0 of a size-1 axis with the same result shape as ``i``."""
    if _is_int_index(i):
        return 0
    if _is_index_array(i):
        return jnp.zeros_like(i) if isinstance(i, jax.Array) else np.zeros_like(i)
    return slice(None)


def _index_matrix_axis(x: Array, i: Any, axis: int) -> Array:
    """Index matrix axis ``axis`` (-2 or -1); an integer keeps a size-1 axis (TransformerLens)."""
    if isinstance(i, slice) or _is_index_array(i):
        return x[(Ellipsis, i) + (slice(None),) * (-1 - axis)]
    if isinstance(i, int):
        return jax.lax.slice_in_dim(x, i, i + 1, axis=x.ndim + axis)
    return jax.lax.dynamic_slice_in_dim(x, i, 1, axis=x.ndim + axis)


def _to_state_dict(M: FactoredMatrix) -> dict[str, Any]:
    return {"A": M.A, "B": M.B}


def _from_state_dict(M: FactoredMatrix, state: dict[str, Any]) -> FactoredMatrix:
    return FactoredMatrix(state["A"], state["B"])


flax.serialization.register_serialization_state(FactoredMatrix, _to_state_dict, _from_state_dict)


# The implementations register themselves on the functions above when lowrank.linalg is
# imported; import it here so that any way of reaching FactoredMatrix has them. (linalg imports
# this module, which is complete by now.)
from lowrank import linalg as _linalg  # noqa: E402, F401
