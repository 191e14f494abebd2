"""Helpers shared by the per-family state-dict converters (``gpt2.py``, ``gpt_neo.py``).

A converter declares the HF keys it expects with their shapes; :class:`StateDictReader` checks
that the state dict has exactly those keys (less known buffers), reads one tensor at a time,
checks its shape and casts it. Layer-stacked outputs are filled one layer at a time, so
converting never holds more than the output plus one input tensor (for NumPy input).
Converters only use array methods and ``[..]`` indexing, so they also trace under
``jax.eval_shape`` with abstract inputs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["StateDictReader", "CheckpointError", "Params", "stack_layers", "transpose", "zeros"]

#: The canonical parameter tree: nested dicts of arrays (see ``lowrank.models``).
Params = dict[str, Any]


class CheckpointError(ValueError):
    """A checkpoint file or state dict is missing, unreadable or does not fit the config."""


class StateDictReader:
    """Validated, key-normalised view of an HF state dict for one converter.

    Args:
        state_dict: mapping from HF keys (with or without ``prefix``) to arrays.
        expected: HF key (without prefix) -> expected shape, for every required key.
        optional: HF key -> expected shape, for keys that may be absent (``lm_head.weight``).
        ignored: regex of keys that are skipped (non-persistent buffers).
        family: name used in messages (``"GPT-2"``).
        dtype: dtype every tensor is cast to (``None`` keeps it).
    """

    def __init__(
        self,
        state_dict: Mapping[str, Any],
        *,
        expected: Mapping[str, tuple[int, ...]],
        optional: Mapping[str, tuple[int, ...]],
        ignored: re.Pattern[str],
        family: str,
        prefix: str = "transformer.",
        dtype: Any = None,
    ) -> None:
        self._sd = state_dict
        self._expected = {**expected, **optional}
        self._family = family
        self._dtype = None if dtype is None else np.dtype(dtype)
        self._keys: dict[str, str] = {}
        for key in state_dict.keys():
            if not isinstance(key, str):
                raise CheckpointError(f"{family} state dict: keys must be strings, got {key!r}")
            name = key[len(prefix) :] if key.startswith(prefix) else key
            if ignored.fullmatch(name):
                continue
            if name not in self._expected:
                raise CheckpointError(
                    f"{family} state dict: unexpected key {key!r}; the config expects keys "
                    f"such as {_examples(expected)}"
                )
            if name in self._keys:
                raise CheckpointError(
                    f"{family} state dict: key {name!r} appears twice "
                    f"({self._keys[name]!r} and {key!r})"
                )
            self._keys[name] = key
        missing = [k for k in expected if k not in self._keys]
        if missing:
            shown = ", ".join(f"{k!r} (expected shape {expected[k]})" for k in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CheckpointError(f"{family} state dict: missing key {shown}{more}")

    def has(self, name: str) -> bool:
        return name in self._keys

    def get(self, name: str) -> Any:
        """The tensor stored under ``name`` (HF key without prefix), shape-checked and cast."""
        key = self._keys[name]
        value = self._sd[key]
        if not isinstance(value, (np.ndarray, jax.Array, jax.core.Tracer)):
            value = np.asarray(value)  # torch tensors, lists, ...
        want = self._expected[name]
        if tuple(value.shape) != tuple(want):
            raise CheckpointError(
                f"{self._family} state dict: key {key!r} has shape {tuple(value.shape)}, "
                f"expected {tuple(want)}"
            )
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise CheckpointError(
                f"{self._family} state dict: key {key!r} has dtype {value.dtype}, expected a "
                "floating-point dtype (float32, float16, bfloat16 or float64)"
            )
        if self._dtype is not None and value.dtype != self._dtype:
            if isinstance(value, np.ndarray):
                _check_range(f"{self._family} state dict: key {key!r}", value, self._dtype)
            value = value.astype(self._dtype)
        return value


def _check_range(what: str, x: np.ndarray, dtype: np.dtype[Any]) -> None:
    """Raise if a finite value of ``x`` would overflow to infinity in ``dtype``.

    NaN and infinities pass (they stay what they are after the cast).
    """
    limit = float(jnp.finfo(dtype).max)
    if float(jnp.finfo(x.dtype).max) <= limit or x.size == 0:
        return
    finite = np.isfinite(x)
    big = max(float(x.max(where=finite, initial=0)), -float(x.min(where=finite, initial=0)))
    if big > limit:
        raise CheckpointError(
            f"{what} ({x.dtype}) holds {big:.4g}, beyond the range of {np.dtype(dtype)} "
            f"(largest finite value {limit:.4g})"
        )


def _examples(expected: Mapping[str, tuple[int, ...]]) -> str:
    names = list(expected)
    return ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")


def stack_layers(n_layers: int, layer: Callable[[int], Any]) -> Any:
    """``[layer(0), ..., layer(n_layers - 1)]`` stacked on a new leading axis.

    NumPy results are copied into one preallocated array as they come (one layer alive at a
    time); traced or jax results are stacked with ``jnp.stack``.
    """
    first = layer(0)
    if not isinstance(first, np.ndarray):
        return jnp.stack([first, *(layer(i) for i in range(1, n_layers))])
    out = np.empty((n_layers, *first.shape), dtype=first.dtype)
    out[0] = first
    del first
    for i in range(1, n_layers):
        out[i] = layer(i)
    return out


def transpose(x: Any) -> Any:
    """``x.T`` as its own array (NumPy input is copied so leaves never alias)."""
    return np.ascontiguousarray(x.T) if isinstance(x, np.ndarray) else x.T


def zeros(shape: tuple[int, ...], like: Any) -> Any:
    """Zeros of ``shape`` in ``like``'s dtype, NumPy for NumPy input and jax otherwise."""
    if isinstance(like, np.ndarray):
        return np.zeros(shape, dtype=like.dtype)
    return jnp.zeros(shape, dtype=like.dtype)
