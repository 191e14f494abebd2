"""lowrank: the linear algebra of transformer weights in JAX."""

from lowrank.factored import FactoredMatrix
from lowrank.linalg import eig, eigvals, low_rank_approx, norm, svd, svdvals, trace

__version__ = "0.1.0"

__all__ = [
    "FactoredMatrix",
    "eig",
    "eigvals",
    "low_rank_approx",
    "norm",
    "svd",
    "svdvals",
    "trace",
]
