"""The one conversion path: an HF state dict read through a :class:`Layout` -> canonical tree.

:class:`StateDictReader` checks that the state dict has exactly the layout's keys (less its
prefixes and ignored buffers), reads one tensor at a time, checks its shape and dtype and
casts it. Layer-stacked leaves are filled one layer at a time, so converting never holds more
than the output plus one input tensor (for NumPy input). Everything uses array methods and
``[..]`` indexing only, so conversion also traces under ``jax.eval_shape`` with abstract
inputs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank.models._common import CheckpointError, Params, updated
from lowrank.models.config import ModelConfig
from lowrank.models.layout import ZEROS, Layout, Tensor, dims, sizes, state_dict_shapes

__all__ = ["StateDictReader", "convert", "stack_layers", "zeros"]


class StateDictReader:
    """Validated, key-normalised view of an HF state dict for one layout.

    Args:
        state_dict: mapping from HF keys (with or without one of ``prefixes``) to arrays.
        expected: HF key (without prefix) -> expected shape, for every required key.
        optional: HF key -> expected shape, for keys that may be absent (``lm_head.weight``).
        ignored: regex of keys (without prefix) that are skipped (non-persistent buffers).
        family: name used in messages (``"GPT-2"``).
        prefixes: stripped from a key that starts with one of them.
        dtype: dtype every tensor is cast to (``None`` keeps it).
        aliases: older key names (without prefix) -> the names ``expected`` uses.
    """

    def __init__(
        self,
        state_dict: Mapping[str, Any],
        *,
        expected: Mapping[str, tuple[int, ...]],
        optional: Mapping[str, tuple[int, ...]],
        ignored: str,
        family: str,
        prefixes: tuple[str, ...] = (),
        dtype: Any = None,
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        self._sd = state_dict
        self._expected = {**expected, **optional}
        self._family = family
        self._dtype = None if dtype is None else np.dtype(dtype)
        self._keys: dict[str, str] = {}
        skip = re.compile(ignored)
        for key in state_dict.keys():
            if not isinstance(key, str):
                raise CheckpointError(f"{family} state dict: keys must be strings, got {key!r}")
            name = next((key[len(p) :] for p in prefixes if key.startswith(p)), key)
            name = (aliases or {}).get(name, name)
            if skip.fullmatch(name):
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
        """Whether the state dict holds ``name`` (after prefix stripping)."""
        return name in self._keys

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape the layout expects for ``name``."""
        return self._expected[name]

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


def zeros(shape: tuple[int, ...], like: Any) -> Any:
    """Zeros of ``shape`` in ``like``'s dtype, NumPy for NumPy input and jax otherwise."""
    if isinstance(like, np.ndarray):
        return np.zeros(shape, dtype=like.dtype)
    return jnp.zeros(shape, dtype=like.dtype)


def convert(
    layout: Layout, state_dict: Mapping[str, Any], config: ModelConfig, *, dtype: Any = None
) -> Params:
    """Convert a state dict stored as ``layout`` into the canonical tree.

    Args:
        layout: the HF layout of ``config``'s family.
        state_dict: HF keys -> NumPy (or jax / abstract) arrays; read one key at a time, so a
            lazy mapping over a memory-mapped file works.
        config: the model's :class:`ModelConfig`.
        dtype: cast every tensor to this dtype (``None`` keeps the stored dtype).

    Returns:
        The canonical tree (see :mod:`lowrank.models`), NumPy arrays for NumPy input.

    Raises:
        CheckpointError: an unexpected, missing or mis-shaped key, or a non-float tensor.
        ValueError: ``config`` is for another family (the message names the public wrapper,
            ``convert_<family>_state_dict``).
    """
    if config.family != layout.family:
        raise ValueError(
            f"convert_{layout.family}_state_dict: config is for {config.architecture}, "
            f"not {layout.name}"
        )
    reader = StateDictReader(
        state_dict,
        expected=state_dict_shapes(layout, config),
        optional=state_dict_shapes(layout, config, optional=True),
        ignored=layout.ignored,
        family=layout.name,
        prefixes=layout.prefixes,
        dtype=dtype,
        aliases=layout.aliases,
    )
    d_head = config.d_head
    size = sizes(config)
    flat: dict[str, Any] = {}
    like: Any = None  # the first leaf: zeros take its dtype and array kind

    def read(tensor: Tensor, layer: int, *, index: int) -> Any:
        key = tensor.key.format(i=layer)
        if not tensor.stored(config):  # the config has no such tensor (a bias it lacks)
            x = zeros(dims(tensor.shape, size), like)
        elif reader.has(key):
            x = reader.get(key)
        elif tensor.if_missing == ZEROS:
            x = zeros(reader.shape(key), like)
        else:
            x = reader.get(str(tensor.if_missing).format(i=layer))
        if tensor.split is not None:
            x = tensor.split.part(x, index, len(tensor.leaf_paths), d_head)
        return x if tensor.transform is None else tensor.transform(x, d_head)

    for tensor in layout.tensors:
        for index, path in enumerate(tensor.leaf_paths):
            if tensor.per_layer:
                flat[path] = stack_layers(config.n_layers, partial(read, tensor, index=index))
            else:
                flat[path] = read(tensor, 0, index=index)
            like = flat[path] if like is None else like
    for path, shape in layout.zeros.items():
        flat[path] = zeros(dims(shape, size), like)
    return updated({}, flat)
