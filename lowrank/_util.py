"""Small helpers shared by lowrank's modules."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST


def mm(x: Array, y: Array) -> Array:
    """``x @ y`` at full float32 precision on every backend (TPUs default to bfloat16 passes)."""
    return jnp.matmul(x, y, precision=HIGHEST)


def mT(x: Array) -> Array:
    """The transpose of the last two axes."""
    return jnp.swapaxes(x, -1, -2)


def compute_dtype(dtype: Any) -> Any:
    """float32 for floats narrower than 32 bits (bfloat16, float16), else ``dtype`` itself."""
    narrow = jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32
    return jnp.dtype(jnp.float32) if narrow else dtype


def upcast(x: Any) -> Any:
    """``x`` (a jax or NumPy array) in its :func:`compute_dtype`."""
    dtype = compute_dtype(x.dtype)
    return x if x.dtype == dtype else x.astype(dtype)


def check_real_float(x: Any, where: str, what: str, hint: str = "") -> None:
    """Raise ``TypeError`` unless ``x`` has a real floating-point dtype.

    The message reads ``"{where}: expected a real floating-point {what}, got dtype ... (shape
    ...)"`` followed by ``hint``.
    """
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{where}: expected a real floating-point {what}, got dtype {x.dtype} "
            f"(shape {tuple(x.shape)}){hint}"
        )
