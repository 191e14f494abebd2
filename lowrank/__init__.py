"""lowrank: the linear algebra of transformer weights in JAX.

``FactoredMatrix`` and its linear algebra live at the top level; models, circuits, the SVD
interpreter and the pure-JAX eigensolver are submodules (``lowrank.models``,
``lowrank.circuits``, ``lowrank.interpret``, ``lowrank.eigensolver``; figures in
``lowrank.plot``, imported on demand because it loads matplotlib).
"""

from lowrank import circuits, eigensolver, interpret, models
from lowrank.chain import chain_matmul, cyclic_core
from lowrank.circuits import composition_scores, copying_scores
from lowrank.factored import FactoredMatrix
from lowrank.linalg import eig, eigvals, low_rank_approx, norm, svd, svdvals, trace
from lowrank.models import TransformerModel, load_pretrained

__version__ = "0.1.0"

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
