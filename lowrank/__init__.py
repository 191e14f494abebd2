"""lowrank: the linear algebra of transformer weights in JAX.

``FactoredMatrix`` and its linear algebra live at the top level; models, circuits, the SVD
interpreter and the pure-JAX eigensolver are submodules (``lowrank.models``,
``lowrank.circuits``, ``lowrank.interpret``, ``lowrank.eigensolver``; figures in
``lowrank.plot``).

Names are imported on first use (PEP 562), so ``python -m lowrank --help`` does not load jax.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it ("" for a submodule of that name)
_EXPORTS = {
    "FactoredMatrix": "lowrank.factored",
    "TransformerModel": "lowrank.models",
    "chain_matmul": "lowrank.chain",
    "circuits": "",
    "composition_scores": "lowrank.circuits",
    "copying_scores": "lowrank.circuits",
    "cyclic_core": "lowrank.chain",
    "eig": "lowrank.linalg",
    "eigensolver": "",
    "eigvals": "lowrank.linalg",
    "interpret": "",
    "load_pretrained": "lowrank.models",
    "low_rank_approx": "lowrank.linalg",
    "models": "",
    "norm": "lowrank.linalg",
    "svd": "lowrank.linalg",
    "svdvals": "lowrank.linalg",
    "trace": "lowrank.linalg",
}

__all__ = [
    "FactoredMatrix",
    "TransformerModel",
    "chain_matmul",
    "circuits",
    "composition_scores",
    "copying_scores",
    "cyclic_core",
    "eig",
    "eigensolver",
    "eigvals",
    "interpret",
    "load_pretrained",
    "low_rank_approx",
    "models",
    "norm",
    "svd",
    "svdvals",
    "trace",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lowrank' has no attribute {name!r}")
    module = _EXPORTS[name]
    value = (
        importlib.import_module(f"lowrank.{name}")
        if not module
        else getattr(importlib.import_module(module), name)
    )
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return [*__all__, "__version__"]


if TYPE_CHECKING:
    from lowrank import circuits, eigensolver, interpret, models
    from lowrank.chain import chain_matmul, cyclic_core
    from lowrank.circuits import composition_scores, copying_scores
    from lowrank.factored import FactoredMatrix
    from lowrank.linalg import eig, eigvals, low_rank_approx, norm, svd, svdvals, trace
    from lowrank.models import TransformerModel, load_pretrained
