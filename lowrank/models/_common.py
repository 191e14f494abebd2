"""The canonical parameter tree's vocabulary: its type, its error, and dotted-path access.

A path names a node of the nested-dict tree with dots: ``"blocks.attn.W_Q"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["LN_PATHS", "CheckpointError", "Params", "dotted_path", "lookup", "updated"]

#: The canonical parameter tree: nested dicts of arrays (see ``lowrank.models``).
Params = dict[str, Any]

#: The LayerNorm entries; folding LayerNorm removes them (see ``processing.py``).
LN_PATHS = ("blocks.ln1", "blocks.ln2", "ln_final")


class CheckpointError(ValueError):
    """A checkpoint file or state dict is missing, unreadable or does not fit the config."""


def dotted_path(key_path: tuple[Any, ...]) -> str:
    """A jax key path (from ``jax.tree_util.tree_flatten_with_path``) as ``"blocks.attn.W_Q"``."""
    return ".".join(str(getattr(k, "key", k)) for k in key_path)


def lookup(params: Params, path: str) -> Any:
    """The node at dotted ``path`` in ``params``, or ``None`` where there is none."""
    node: Any = params
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def updated(params: Params, updates: Mapping[str, Any], remove: tuple[str, ...] = ()) -> Params:
    """A copy of ``params`` with dotted ``updates`` set and ``remove`` paths deleted.

    Only the dicts on the changed paths are copied (missing ones are created); untouched
    arrays are shared, so ``updated({}, flat)`` nests a flat ``{path: leaf}`` dict.
    """
    out = dict(params)
    copied: set[tuple[str, ...]] = set()

    def parent(parts: list[str]) -> dict[str, Any]:
        node = out
        for i, part in enumerate(parts):
            key = tuple(parts[: i + 1])
            if key not in copied:
                node[part] = dict(node.get(part, {}))
                copied.add(key)
            node = node[part]
        return node

    for path, value in updates.items():
        *head, leaf = path.split(".")
        parent(head)[leaf] = value
    for path in remove:
        *head, leaf = path.split(".")
        parent(head).pop(leaf, None)
    return out
