"""FactoredMatrix: a matrix kept as the product of two factors, as an immutable pytree."""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _is_arraylike(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def _check_factor(name: str, x: Any) -> None:
    if x.ndim < 2:
        raise ValueError(
            f"FactoredMatrix: {name} must have at least 2 dimensions [..., rows, cols], "
            f"got shape {tuple(x.shape)}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"FactoredMatrix: {name} must be a real floating-point array, got dtype {x.dtype} "
            f"(shape {tuple(x.shape)}); cast it, e.g. {name}.astype(jnp.float32)"
        )


@jax.tree_util.register_dataclass
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
        # Pytree utilities rebuild instances with arbitrary leaves (None, sentinels, specs):
        # only arrays are converted and checked.
        for name in ("A", "B"):
            value = getattr(self, name)
            if _needs_conversion(value):
                object.__setattr__(self, name, jnp.asarray(np.asarray(value)))
        A, B = self.A, self.B
        if not (_is_arraylike(A) and _is_arraylike(B)):
            return
        _check_factor("A", A)
        _check_factor("B", B)
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(
                "FactoredMatrix: inner dimensions differ: A has shape "
                f"{tuple(A.shape)} [..., l, m] and B has shape {tuple(B.shape)} [..., m, r], "
                f"but A.shape[-1]={A.shape[-1]} != B.shape[-2]={B.shape[-2]}"
            )
        if A.dtype != B.dtype:
            raise TypeError(
                f"FactoredMatrix: A and B must share a dtype, got A {A.dtype} (shape "
                f"{tuple(A.shape)}) and B {B.dtype} (shape {tuple(B.shape)})"
            )
        try:
            np.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except ValueError:
            raise ValueError(
                "FactoredMatrix: leading (batch) dimensions do not broadcast: A has shape "
                f"{tuple(A.shape)} and B has shape {tuple(B.shape)}"
            ) from None

    # ----------------------------------------------------------------- shape
    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Broadcast leading shape of the two factors."""
        return tuple(np.broadcast_shapes(self.A.shape[:-2], self.B.shape[:-2]))

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.batch_shape, self.ldim, self.rdim)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def ldim(self) -> int:
        return int(self.A.shape[-2])

    @property
    def mdim(self) -> int:
        return int(self.A.shape[-1])

    @property
    def rdim(self) -> int:
        return int(self.B.shape[-1])

    @property
    def dtype(self) -> Any:
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
        if self.ldim > self.mdim:
            return FactoredMatrix(jnp.matmul(other, self.A), self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar: Any) -> FactoredMatrix:
        """Scalar multiple (the scalar goes into ``A``); use ``@`` for matrix products."""
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float, jax.Array, np.ndarray)):
            return NotImplemented
        if isinstance(scalar, (int, float)):
            return FactoredMatrix(self.A * scalar, self.B)
        if math.prod(scalar.shape) != 1:
            raise ValueError(
                f"FactoredMatrix * x needs a scalar, got an array of shape {tuple(scalar.shape)}; "
                "use @ for matrix products"
            )
        if not jnp.issubdtype(scalar.dtype, jnp.floating):
            raise TypeError(f"FactoredMatrix * x: x must be a real float, got dtype {scalar.dtype}")
        return FactoredMatrix(self.A * jnp.reshape(scalar, ()).astype(self.dtype), self.B)

    __rmul__ = __mul__

    def __neg__(self) -> FactoredMatrix:
        return FactoredMatrix(-self.A, self.B)

    # ------------------------------------------------------------ indexing
    def __getitem__(self, index: Any) -> FactoredMatrix:
        """Index leading axes first, then rows (``l``), then columns (``r``).

        Integer indices on the row or column axis keep a size-1 axis so the result stays a
        matrix (TransformerLens's rule); negative indices count from the end.
        """
        return _getitem(self, index)

    def unsqueeze(self, axis: int) -> FactoredMatrix:
        """Insert a size-1 leading axis at ``axis`` (``0 <= axis <= number of leading axes``,
        negative values count back from the matrix axes)."""
        n_lead = self.ndim - 2
        if not -(n_lead + 1) <= axis <= n_lead:
            raise ValueError(
                f"FactoredMatrix.unsqueeze: axis {axis} is out of range for a matrix of shape "
                f"{self.shape}; a new leading axis goes at -{n_lead + 1}..{n_lead}"
            )
        pos = axis if axis >= 0 else n_lead + 1 + axis
        A, B = _pad_leading(self.A, n_lead), _pad_leading(self.B, n_lead)
        return FactoredMatrix(jnp.expand_dims(A, pos), jnp.expand_dims(B, pos))

    def get_corner(self, k: int = 3) -> Array:
        """The top-left ``k x k`` block of every leading index slice, ``[:k, ..., :k]``."""
        corner = jnp.matmul(self.A[..., :k, :], self.B[..., :, :k])
        lead = self.batch_shape
        corner = jnp.broadcast_to(corner, (*lead, *corner.shape[-2:]))
        return corner[tuple(slice(k) for _ in range(corner.ndim))]

    # ------------------------------------------ linear algebra (see linalg.py)
    def svd(self) -> tuple[Array, Array, Array]:
        """``U, S, Vh`` with ``A @ B == U @ diag(S) @ Vh`` (``Vh`` is really ``V^T``)."""
        from lowrank import linalg

        return linalg.svd(self)

    @property
    def U(self) -> Array:
        return self.svd()[0]

    @property
    def S(self) -> Array:
        from lowrank import linalg

        return linalg.svdvals(self)

    @property
    def Vh(self) -> Array:
        """Right singular vectors as rows: ``[..., k, r]`` (the honest ``V^T``)."""
        return self.svd()[2]

    @property
    def V(self) -> Array:
        """Right singular vectors as columns, ``[..., r, k]`` (TransformerLens's ``V``)."""
        return jnp.swapaxes(self.svd()[2], -1, -2)

    @property
    def eigenvalues(self) -> Array:
        from lowrank import linalg

        return linalg.eigvals(self)

    def eig(self) -> tuple[Array, Array]:
        from lowrank import linalg

        return linalg.eig(self)

    def norm(self) -> Array:
        from lowrank import linalg

        return linalg.norm(self)

    def trace(self) -> Array:
        from lowrank import linalg

        return linalg.trace(self)

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


def _check_operand_dtype(M: FactoredMatrix, x: Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"FactoredMatrix products need a real floating-point operand, got dtype {x.dtype} "
            f"(shape {tuple(x.shape)})"
        )
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


def _normalise_int(i: Any, size: int, axis_name: str, shape: tuple[int, ...]) -> Any:
    """Bounds-check and wrap a static integer index; traced integers pass through."""
    if isinstance(i, (int, np.integer)):
        i = operator.index(i)
        if not -size <= i < size:
            raise IndexError(
                f"FactoredMatrix index {i} is out of range for {axis_name} of size {size} "
                f"(matrix shape {shape})"
            )
        return i % size
    return i


def _expand_index(index: Any, ndim: int, shape: tuple[int, ...]) -> list[Any]:
    """Return one entry per axis (ints, slices) plus None markers for new axes."""
    if not isinstance(index, tuple):
        index = (index,)
    for i in index:
        if not (i is None or i is Ellipsis or isinstance(i, slice) or _is_int_index(i)):
            raise TypeError(
                "FactoredMatrix indices must be integers, slices, None or ..., "
                f"got {type(i).__name__}"
            )
    n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
    if sum(1 for i in index if i is Ellipsis) > 1:
        raise IndexError("FactoredMatrix index can contain at most one Ellipsis (...)")
    if n_real > ndim:
        raise IndexError(
            f"FactoredMatrix index {index} has {n_real} entries, too many for a matrix of "
            f"shape {shape}"
        )
    out: list[Any] = []
    for i in index:
        if i is Ellipsis:
            out.extend([slice(None)] * (ndim - n_real))
        else:
            out.append(i)
    return out


def _getitem(M: FactoredMatrix, index: Any) -> FactoredMatrix:
    shape = M.shape
    n_lead = M.ndim - 2
    entries = _expand_index(index, M.ndim, shape)
    lead_idx: list[Any] = []
    row: Any = slice(None)
    col: Any = slice(None)
    seen = 0
    for i in entries:
        if i is None:
            if seen >= n_lead:
                raise IndexError(
                    "FactoredMatrix: new axes (None) may only be inserted among the leading "
                    f"axes of a matrix of shape {shape}"
                )
            lead_idx.append(None)
            continue
        if seen < n_lead:
            if _is_int_index(i):
                i = _normalise_int(i, shape[seen], f"leading axis {seen}", shape)
            lead_idx.append(i)
        elif seen == n_lead:
            row = i
        else:
            col = i
        seen += 1
    A = _pad_leading(M.A, n_lead)
    B = _pad_leading(M.B, n_lead)
    A_idx = _factor_index(A, lead_idx, shape)
    B_idx = _factor_index(B, lead_idx, shape)
    A = A[A_idx]
    B = B[B_idx]
    A = _index_matrix_axis(A, row, -2, M.ldim, "the row axis (l)", shape)
    B = _index_matrix_axis(B, col, -1, M.rdim, "the column axis (r)", shape)
    return FactoredMatrix(A, B)


def _factor_index(x: Array, lead_idx: list[Any], shape: tuple[int, ...]) -> tuple[Any, ...]:
    """Adapt a leading-axes index to a factor whose broadcast axes have size 1."""
    out: list[Any] = []
    axis = 0
    for i in lead_idx:
        if i is None:
            out.append(None)
            continue
        if x.shape[axis] == 1 and shape[axis] != 1:
            out.append(0 if _is_int_index(i) else slice(None))
        else:
            out.append(i)
        axis += 1
    return tuple(out)


def _index_matrix_axis(
    x: Array, i: Any, axis: int, size: int, axis_name: str, shape: tuple[int, ...]
) -> Array:
    if isinstance(i, slice):
        return x[(Ellipsis, i) + (slice(None),) * (-1 - axis)]
    if isinstance(i, (int, np.integer)):
        i = _normalise_int(i, size, axis_name, shape)
        return jax.lax.slice_in_dim(x, i, i + 1, axis=x.ndim + axis)
    return jax.lax.dynamic_slice_in_dim(x, i, 1, axis=x.ndim + axis)


def _to_state_dict(M: FactoredMatrix) -> dict[str, Any]:
    return {"A": M.A, "B": M.B}


def _from_state_dict(M: FactoredMatrix, state: dict[str, Any]) -> FactoredMatrix:
    return FactoredMatrix(state["A"], state["B"])


flax.serialization.register_serialization_state(FactoredMatrix, _to_state_dict, _from_state_dict)
