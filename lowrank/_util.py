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


def pow2(e: Array, dtype: Any) -> Array:
    """Exactly ``2.0**e`` for integer ``e`` in the normal exponent range of ``dtype``."""
    info = jnp.finfo(dtype)
    bits = (e + (info.maxexp - 1)).astype(f"int{info.bits}") << info.nmant
    return jax.lax.bitcast_convert_type(bits, dtype)


def unit_scale(x: Array) -> tuple[Array, Array]:
    """Scale each matrix ``[..., l, r]`` by a power of two: ``(x * 2**-e, e)``.

    ``e`` is chosen (without gradient) so that the largest entry lies in ``[0.5, 1)``: exact,
    and ``e = 0`` for zero or non-finite matrices. ``e`` is clipped to the normal exponent
    range (``2**-e`` must be a normal number): the largest entry of a matrix near the top of
    the range ends up in ``[0.5, 4)``, one of subnormal entries only below ``0.5``.
    """
    info = jnp.finfo(x.dtype)
    amax = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=(-2, -1)))
    _, e = jnp.frexp(jnp.where(jnp.isfinite(amax), amax, 0))
    e = jnp.clip(e, info.minexp, info.maxexp - 2)
    return x * pow2(-e, x.dtype)[..., None, None], e


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
