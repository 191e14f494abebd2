"""Circuits of attention heads, batched over ``[L, H]`` and kept factored.

Every function takes a model (anything with TransformerLens-named weights ``W_E``, ``W_pos``,
``W_U``, ``W_Q``, ``W_K``, ``W_V`` ``[L, H, d_model, d_head]`` and ``W_O``
``[L, H, d_head, d_model]``, such as :class:`lowrank.models.TransformerModel`) and is
jittable with the model as an argument. Nothing ``d_vocab x d_vocab`` or
``[L, H, d_model, d_model]`` is formed unless a function returns it on purpose.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp

from lowrank import linalg
from lowrank.chain import cyclic_core
from lowrank.factored import FactoredMatrix

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST
CompositionKind = Literal["Q", "K", "V"]

__all__ = [
    "composition_baseline",
    "composition_scores",
    "copying_scores",
    "full_ov_circuit",
    "full_qk_circuit",
    "ov_circuit",
    "ov_eigenvalues",
    "positional_qk_circuit",
    "qk_circuit",
]


def _mT(x: Array) -> Array:
    return jnp.swapaxes(x, -1, -2)


def _mm(x: Array, y: Array) -> Array:
    return jnp.matmul(x, y, precision=HIGHEST)


def ov_circuit(model: Any) -> FactoredMatrix:
    """``W_V @ W_O`` per head: ``FactoredMatrix [L, H, d_model, d_model]`` of rank ``d_head``."""
    return FactoredMatrix(model.W_V, model.W_O)


def qk_circuit(model: Any) -> FactoredMatrix:
    """``W_Q @ W_K^T`` per head: ``FactoredMatrix [L, H, d_model, d_model]``."""
    return FactoredMatrix(model.W_Q, _mT(model.W_K))


def full_ov_circuit(model: Any) -> FactoredMatrix:
    """``W_E @ W_V @ W_O @ W_U``: ``FactoredMatrix [L, H, d_vocab, d_vocab]``.

    Its factors ``W_E W_V [L, H, V, d_head]`` and ``W_O W_U [L, H, d_head, V]`` are formed (that
    is what returning it means); for its eigenvalues use :func:`copying_scores`, which never
    forms them.
    """
    return FactoredMatrix(_mm(model.W_E, model.W_V), _mm(model.W_O, model.W_U))


def full_qk_circuit(model: Any) -> FactoredMatrix:
    """``W_E @ W_Q @ W_K^T @ W_E^T``: token-by-token attention scores, ``[L, H, V, V]``."""
    return FactoredMatrix(_mm(model.W_E, model.W_Q), _mT(_mm(model.W_E, model.W_K)))


def positional_qk_circuit(model: Any) -> FactoredMatrix:
    """``W_pos @ W_Q @ W_K^T @ W_pos^T``: position-by-position scores, ``[L, H, n_ctx, n_ctx]``."""
    return FactoredMatrix(_mm(model.W_pos, model.W_Q), _mT(_mm(model.W_pos, model.W_K)))


def ov_eigenvalues(model: Any, *, full: bool = True) -> Array:
    """Nonzero eigenvalues of each head's (full) OV circuit, ``[L, H, d_head]`` complex.

    Args:
        full: the full OV circuit ``W_E W_V W_O W_U`` (default), via the ``d_head x d_head``
            core ``W_O (W_U W_E) W_V`` in which ``W_U W_E`` is shared by all heads; ``False``
            uses the OV circuit ``W_V W_O`` alone (core ``W_O W_V``).
    """
    if full:
        core = cyclic_core(model.W_E, model.W_V, model.W_O, model.W_U)
    else:
        core = _mm(model.W_O, model.W_V)
    return linalg.eigvals(core)


def copying_scores(model: Any, *, full: bool = True) -> Array:
    """Copying score ``sum(eig).real / sum(|eig|)`` per head, ``[L, H]``, in ``[-1, 1]``.

    Near 1 when the head's OV circuit maps tokens to themselves (positive eigenvalues);
    ``full`` as in :func:`ov_eigenvalues`.
    """
    eig = ov_eigenvalues(model, full=full)
    return jnp.sum(eig, axis=-1).real / jnp.sum(jnp.abs(eig), axis=-1)


def composition_baseline(d_model: int) -> float:
    """Composition score of unrelated heads: ``1 / sqrt(d_model)``.

    For fixed ``L`` and a Haar-random rotation ``Q``, ``E ||L Q R Q^T||_F^2 =
    ||L||_F^2 ||R||_F^2 / d_model``, so the root-mean-square score of heads whose subspaces are
    unrelated is ``1 / sqrt(d_model)``.
    """
    return 1.0 / math.sqrt(d_model)


def _right_factors(model: Any, kind: str) -> tuple[Array, Array]:
    if kind == "Q":  # writes into the queries: QK
        return model.W_Q, _mT(model.W_K)
    if kind == "K":  # writes into the keys: QK^T
        return model.W_K, _mT(model.W_Q)
    if kind == "V":  # writes into the values: OV
        return model.W_V, model.W_O
    raise ValueError(f"composition_scores: kind must be 'Q', 'K' or 'V', got {kind!r}")


def _psd_sqrt_factor(gram: Array) -> Array:
    """``R`` with ``R^T R = gram`` for symmetric PSD ``gram [..., k, k]`` (rank deficiency ok)."""
    w, v = jnp.linalg.eigh(gram)
    return jnp.sqrt(jnp.maximum(w, 0))[..., :, None] * _mT(v)


def composition_scores(model: Any, kind: CompositionKind) -> Array:
    """Q-, K- or V-composition ``||L R||_F / (||L||_F ||R||_F)`` of all head pairs.

    ``L`` is the OV circuit of an earlier head; ``R`` is the QK circuit (``kind="Q"``), its
    transpose (``"K"``) or the OV circuit (``"V"``) of a later head, as in TransformerLens's
    ``all_composition_scores``.

    Returns:
        ``[L, H, L, H]`` (left layer, left head, right layer, right head), zero unless
        ``left layer < right layer``. Compare with :func:`composition_baseline`.
    """
    A1, B1 = model.W_V, model.W_O  # left = A1 @ B1
    A2, B2 = _right_factors(model, kind)  # right = A2 @ B2
    n_layers, n_heads, d_model, d_head = A1.shape
    # Whiten the outer factors: ||A1 X B2||_F = ||R1 X R2||_F with R1^T R1 = A1^T A1 and
    # R2 R2^T = B2 B2^T. Then score_ij = ||X_i Y_j||_F with X = R1 B1, Y = A2 R2^T.
    grams = jnp.stack([_mm(_mT(A1), A1), _mm(B2, _mT(B2))])  # one batched eigh call
    roots = _psd_sqrt_factor(grams)
    X = _mm(roots[0], B1).reshape(n_layers, n_heads * d_head, d_model)
    Y = _mm(A2, _mT(roots[1]))  # [L, H, d_model, d_head]
    Y_flat = jnp.moveaxis(Y, 2, 0).reshape(d_model, n_layers * n_heads * d_head)
    left_norm = jnp.sqrt(jnp.sum(jnp.square(X.reshape(n_layers, n_heads, -1)), axis=-1))
    right_norm = jnp.sqrt(jnp.sum(jnp.square(Y.reshape(n_layers, n_heads, -1)), axis=-1))
    rows = []
    for layer in range(n_layers - 1):  # only later right layers: half the work of all pairs
        start = (layer + 1) * n_heads * d_head
        products = _mm(X[layer], Y_flat[:, start:])  # [H dh, (L - layer - 1) H dh]
        sq = jnp.square(products).reshape(n_heads, d_head, -1, n_heads, d_head)
        norms = jnp.sqrt(jnp.sum(sq, axis=(1, 4)))  # [H, L - layer - 1, H]
        rows.append(jnp.pad(norms, ((0, 0), (layer + 1, 0), (0, 0))))
    rows.append(jnp.zeros((n_heads, n_layers, n_heads), dtype=X.dtype))
    numerator = jnp.stack(rows)
    return numerator / (left_norm[:, :, None, None] * right_norm[None, None, :, :])
