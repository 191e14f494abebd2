"""Hugging Face checkpoint layouts as tables: which tensor fills which canonical leaf, and how.

A family module (``gpt2.py``, ``gpt_neo.py``, ...) declares one :class:`Layout`; the one
conversion path in :mod:`lowrank.models.conversion` reads any state dict through it. A row
(:class:`Tensor`) names an HF key (``"h.{i}.attn.c_attn.weight"``, ``{i}`` being the layer),
its shape in size names (``("d_model", "3*n_heads*d_head")``), the canonical leaves it fills,
how a fused tensor is cut into them (:class:`Split`), the transform that brings each part to
the canonical layout, what stands in for it when the key is missing, and the config flag that
says whether the checkpoint stores it at all (``when="attn_qkv_bias"``).

Shapes are tuples of dimensions, each a product of size names and integers joined by ``*``;
the size names are :data:`SIZE_NAMES`, read from the :class:`ModelConfig`.

Transforms take one tensor (or part) of one layer and ``d_head``; they only use array
methods and ``[..]`` indexing, so they also trace under ``jax.eval_shape``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from lowrank.models.config import ModelConfig

__all__ = [
    "SIZE_NAMES",
    "ZEROS",
    "Layout",
    "Split",
    "Tensor",
    "bias_per_head",
    "dims",
    "o_from_conv1d",
    "o_from_linear",
    "plus_one",
    "qkv_from_conv1d",
    "qkv_from_linear",
    "scaled_embedding",
    "sizes",
    "state_dict_shapes",
    "transpose",
]

#: ``transform(x, d_head) -> x``: one tensor (or part of one) to its canonical layout.
Transform = Callable[[Any, int], Any]

#: The size names a shape may use.
SIZE_NAMES = (
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "d_head",
    "d_model",
    "d_mlp",
    "d_vocab",
    "n_ctx",
)

#: ``Tensor.if_missing`` value: a missing key reads as zeros of its shape.
ZEROS = "<zeros>"

_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelConfig))


def sizes(config: ModelConfig) -> dict[str, int]:
    """The value of every name in :data:`SIZE_NAMES` for ``config``."""
    return {name: getattr(config, name) for name in SIZE_NAMES}


def dims(shape: tuple[str, ...], size: Mapping[str, int]) -> tuple[int, ...]:
    """``("d_model", "3*n_heads*d_head")`` -> ``(768, 2304)``."""
    return tuple(
        math.prod(int(f) if f.isdigit() else size[f] for f in dim.split("*")) for dim in shape
    )


@dataclasses.dataclass(frozen=True)
class Split:
    """How a fused tensor is cut into equal parts (one per leaf) along ``axis``.

    Contiguous blocks ``[q | k | v]`` (GPT-2's ``c_attn``), or with ``per_head`` interleaved
    head by head ``[q0 k0 v0 | q1 k1 v1 | ...]``, each ``d_head`` wide (GPT-NeoX's
    ``query_key_value``).
    """

    axis: int
    per_head: bool = False

    def part(self, x: Any, index: int, parts: int, d_head: int) -> Any:
        """Part ``index`` of ``parts`` of ``x``."""
        axis = self.axis % x.ndim
        before = (slice(None),) * axis
        size = x.shape[axis] // parts
        if not self.per_head:
            return x[(*before, slice(index * size, (index + 1) * size))]
        heads = size // d_head
        x = x.reshape(*x.shape[:axis], heads, parts, d_head, *x.shape[axis + 1 :])
        return x[(*before, slice(None), index)].reshape(*x.shape[:axis], size, *x.shape[axis + 3 :])


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One HF tensor and the canonical leaves it fills.

    Attributes:
        key: HF key without prefix; ``{i}`` in it stands for the layer, and its leaves are
            stacked over layers.
        shape: the stored shape, in size names (see the module docstring).
        leaves: dotted canonical path(s); several for a fused tensor, cut by ``split``.
        transform: applied to each part after the split; ``None`` keeps it as stored.
        split: how a fused tensor is cut into ``leaves`` (required with several leaves).
        if_missing: ``None``: the key is required. :data:`ZEROS`: it may be absent and then
            reads as zeros. Any other string: it may be absent and then that key is read
            in its place (``"wte.weight"`` for a tied ``lm_head.weight``).
        when: name of a boolean :class:`ModelConfig` field (``"attn_qkv_bias"``); where it is
            false the checkpoint must not hold the key, and the leaves are zeros.
    """

    key: str
    shape: tuple[str, ...]
    leaves: str | tuple[str, ...]
    transform: Transform | None = None
    split: Split | None = None
    if_missing: str | None = None
    when: str | None = None

    def __post_init__(self) -> None:
        names = {f for dim in self.shape for f in dim.split("*") if not f.isdigit()}
        if not names <= set(SIZE_NAMES):
            raise ValueError(f"Tensor {self.key!r}: unknown size names {sorted(names)}")
        if (len(self.leaf_paths) > 1) != (self.split is not None):
            raise ValueError(f"Tensor {self.key!r}: a split goes with several leaves")
        if self.when is not None and self.when not in _CONFIG_FIELDS:
            raise ValueError(f"Tensor {self.key!r}: when={self.when!r} is not a ModelConfig field")

    @property
    def leaf_paths(self) -> tuple[str, ...]:
        """The canonical tree paths this tensor fills (several for a fused tensor)."""
        return (self.leaves,) if isinstance(self.leaves, str) else self.leaves

    @property
    def per_layer(self) -> bool:
        """Whether the key names one tensor per layer (``{i}`` in it)."""
        return "{i}" in self.key

    def stored(self, config: ModelConfig) -> bool:
        """Whether a checkpoint of ``config`` holds this tensor (see ``when``)."""
        return self.when is None or bool(getattr(config, self.when))


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one HF architecture stores the canonical tree.

    Attributes:
        name: the family as messages name it (``"GPT-2"``).
        family: the :attr:`ModelConfig.family` it reads (``"gpt2"``).
        tensors: the rows, in state-dict order; the first must be required and stored by
            every config (zero leaves take its dtype and array kind).
        zeros: leaves no checkpoint stores -> their canonical shape in size names.
        prefixes: key prefixes that may be present and are stripped (``"transformer."``).
        ignored: regex of keys (without prefix) that are skipped (non-persistent buffers).
        aliases: older names of keys (without prefix) -> the name the table uses
            (``{"embed_out.weight": "lm_head.weight"}``).
    """

    name: str
    family: str
    tensors: tuple[Tensor, ...]
    zeros: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    prefixes: tuple[str, ...] = ()
    ignored: str = ""
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        first = self.tensors[0]
        if first.if_missing is not None or first.when is not None:
            raise ValueError(f"Layout {self.name}: the first tensor must be required")

    def keys(self, n_layers: int) -> list[tuple[str, Tensor]]:
        """Every HF key with its row: per-layer rows layer by layer, where they stand."""
        out = []
        for per_layer, rows in itertools.groupby(self.tensors, key=lambda t: t.per_layer):
            group = list(rows)
            layers = range(n_layers) if per_layer else [0]
            out += [(t.key.format(i=i), t) for i in layers for t in group]
        return out


def state_dict_shapes(
    layout: Layout, config: ModelConfig, *, optional: bool = False
) -> dict[str, tuple[int, ...]]:
    """HF key (without prefix) -> shape, for every required key (``optional``: the others).

    Keys of rows that ``config`` does not store (:attr:`Tensor.when`) are in neither.
    """
    size = sizes(config)
    return {
        key: dims(t.shape, size)
        for key, t in layout.keys(config.n_layers)
        if (t.if_missing is not None) == optional and t.stored(config)
    }


# ----------------------------------------------------------------------- transforms
def transpose(x: Any, d_head: int) -> Any:
    """``x.T`` as its own array (NumPy input is copied so leaves never alias).

    ``nn.Linear`` ``[out, in]`` -> ``[in, out]``.
    """
    return np.ascontiguousarray(x.T) if isinstance(x, np.ndarray) else x.T


def bias_per_head(x: Any, d_head: int) -> Any:
    """``[H * d_head] -> [H, d_head]``."""
    return x.reshape(-1, d_head)


def qkv_from_conv1d(x: Any, d_head: int) -> Any:
    """``Conv1D`` ``[d_model, H * d_head]`` -> ``[H, d_model, d_head]``."""
    return x.reshape(x.shape[0], -1, d_head).transpose(1, 0, 2)


def qkv_from_linear(x: Any, d_head: int) -> Any:
    """``nn.Linear`` ``[H * d_head, d_model]`` -> ``[H, d_model, d_head]``.

    ``H`` may be the number of key/value heads.
    """
    return x.reshape(-1, d_head, x.shape[1]).transpose(0, 2, 1)


def o_from_conv1d(x: Any, d_head: int) -> Any:
    """``Conv1D`` ``[H * d_head, d_model]`` -> ``[H, d_head, d_model]``."""
    return x.reshape(-1, d_head, x.shape[1])


def o_from_linear(x: Any, d_head: int) -> Any:
    """``nn.Linear`` ``[d_model, H * d_head]`` -> ``[H, d_head, d_model]``."""
    return transpose(x, d_head).reshape(-1, d_head, x.shape[0])


def plus_one(x: Any, d_head: int) -> Any:
    """``1 + w``: a Gemma RMSNorm weight (it scales by ``1 + w``) as the effective weight."""
    return x + 1


def scaled_embedding(x: Any, d_head: int) -> Any:
    """``W_E * sqrt(d_model)``: Gemma's embedding as the residual stream receives it."""
    return x * math.sqrt(x.shape[-1])
