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
import numpy as np

from lowrank import linalg
from lowrank._util import HIGHEST, mm, mT
from lowrank.chain import cyclic_core
from lowrank.factored import FactoredMatrix

Array = jax.Array
CompositionKind = Literal["Q", "K", "V"]
# Elements of the per-step block of composition_scores (C for a few layer pairs): ~128 MiB.
_COMPOSITION_STEP_ELEMENTS = 2**25

__all__ = [
    "composition_baseline",
    "composition_schedule",
    "composition_scores",
    "copying_scores",
    "full_ov_circuit",
    "full_qk_circuit",
    "ov_circuit",
    "ov_eigenvalues",
    "positional_qk_circuit",
    "qk_circuit",
]


def ov_circuit(model: Any) -> FactoredMatrix:
    """``W_V @ W_O`` per head: ``FactoredMatrix [L, H, d_model, d_model]`` of rank ``d_head``."""
    return FactoredMatrix(model.W_V, model.W_O)


def qk_circuit(model: Any) -> FactoredMatrix:
    """``W_Q @ W_K^T`` per head: ``FactoredMatrix [L, H, d_model, d_model]``."""
    return FactoredMatrix(model.W_Q, mT(model.W_K))


def full_ov_circuit(model: Any) -> FactoredMatrix:
    """``W_E @ W_V @ W_O @ W_U``: ``FactoredMatrix [L, H, d_vocab, d_vocab]``.

    Its factors ``W_E W_V [L, H, V, d_head]`` and ``W_O W_U [L, H, d_head, V]`` are formed (that
    is what returning it means); for its eigenvalues use :func:`copying_scores`, which never
    forms them.
    """
    return FactoredMatrix(mm(model.W_E, model.W_V), mm(model.W_O, model.W_U))


def full_qk_circuit(model: Any) -> FactoredMatrix:
    """``W_E @ W_Q @ W_K^T @ W_E^T``: token-by-token attention scores, ``[L, H, V, V]``."""
    return FactoredMatrix(mm(model.W_E, model.W_Q), mT(mm(model.W_E, model.W_K)))


def positional_qk_circuit(model: Any) -> FactoredMatrix:
    """``W_pos @ W_Q @ W_K^T @ W_pos^T``: position-by-position scores, ``[L, H, n_ctx, n_ctx]``."""
    return FactoredMatrix(mm(model.W_pos, model.W_Q), mT(mm(model.W_pos, model.W_K)))


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
        core = mm(model.W_O, model.W_V)
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
        return model.W_Q, mT(model.W_K)
    if kind == "K":  # writes into the keys: QK^T
        return model.W_K, mT(model.W_Q)
    if kind == "V":  # writes into the values: OV
        return model.W_V, model.W_O
    raise ValueError(f"composition_scores: kind must be 'Q', 'K' or 'V', got {kind!r}")


def composition_schedule(
    n_layers: int, n_heads: int, d_head: int, *, multiple: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """The (left layer, right layer) pairs of :func:`composition_scores`, in scan steps.

    Every pair with ``left < right``, a fixed number per step (about 128 MiB of work each), in
    ``np.triu_indices`` order and padded by repeating pairs.

    Args:
        multiple: the number of pairs per step is a multiple of this (e.g. a device count, so
            that a step's pairs split evenly over devices).

    Returns:
        ``left, right``: int32 ``[steps, pairs_per_step]``.
    """
    left, right = np.triu_indices(n_layers, k=1)
    block = (n_heads * d_head) ** 2
    steps = -(-len(left) // max(multiple, _COMPOSITION_STEP_ELEMENTS // block))
    per_step = -(-len(left) // steps)  # balanced steps: at most steps - 1 padded pairs
    per_step = -(-per_step // multiple) * multiple
    shape = (steps, per_step)
    return (
        np.resize(left, steps * per_step).reshape(shape).astype(np.int32),
        np.resize(right, steps * per_step).reshape(shape).astype(np.int32),
    )


def composition_scores(
    model: Any, kind: CompositionKind, *, schedule: tuple[Array, Array] | None = None
) -> Array:
    """Q-, K- or V-composition ``||L R||_F / (||L||_F ||R||_F)`` of all head pairs.

    ``L`` is the OV circuit of an earlier head; ``R`` is the QK circuit (``kind="Q"``), its
    transpose (``"K"``) or the OV circuit (``"V"``) of a later head, as in TransformerLens's
    ``all_composition_scores``.

    With ``L = A1 B1`` and ``R = A2 B2`` (factors of width ``d_head``),
    ``||L R||_F^2 = sum((G1 C) * (C G2))`` where ``C = B1 A2`` and ``G1 = A1^T A1``,
    ``G2 = B2 B2^T`` are ``d_head x d_head``: one large matrix product for all pairs and no
    decompositions. Only pairs with the right head in a later layer are computed, a few
    layer pairs at a time.

    Args:
        schedule: the layer pairs of each step (:func:`composition_schedule`, the default).
            :func:`lowrank.sharding.composition_scores` passes one whose steps are split over
            devices.

    Returns:
        ``[L, H, L, H]`` (left layer, left head, right layer, right head), zero unless
        ``left layer < right layer``. Compare with :func:`composition_baseline`.
    """
    A1, B1 = model.W_V, model.W_O  # left = A1 @ B1
    A2, B2 = _right_factors(model, kind)  # right = A2 @ B2
    n_layers, n_heads, d_model, d_head = A1.shape
    n_pairs = n_layers * (n_layers - 1) // 2
    steps = composition_schedule(n_layers, n_heads, d_head) if schedule is None else schedule
    lo_steps, hi_steps = jnp.asarray(steps[0]), jnp.asarray(steps[1])
    if lo_steps.ndim != 2 or lo_steps.shape != hi_steps.shape or lo_steps.size < n_pairs:
        raise ValueError(
            "composition_scores: schedule must be two [steps, pairs_per_step] arrays covering "
            f"all {n_pairs} layer pairs, got shapes {lo_steps.shape} and {hi_steps.shape}"
        )
    G1 = mm(mT(A1), A1)  # [L, H, dh, dh]
    G2 = mm(B2, mT(B2))
    left_sq = jnp.sum(G1 * mm(B1, mT(B1)), axis=(-2, -1))  # ||A1 B1||_F^2, [L, H]
    right_sq = jnp.sum(G2 * mm(mT(A2), A2), axis=(-2, -1))
    B1_rows = B1.reshape(n_layers, n_heads * d_head, d_model)
    A2_cols = jnp.moveaxis(A2, 2, 1).reshape(n_layers, d_model, n_heads * d_head)

    def pair_norms(_: None, pair: tuple[Array, Array]) -> tuple[None, Array]:
        lo, hi = pair
        C = mm(B1_rows[lo], A2_cols[hi])  # [k, H dh, H dh]
        C = C.reshape(lo.shape[0], n_heads, d_head, n_heads, d_head)
        left_side = jnp.einsum("khab,khbgc->khagc", G1[lo], C, precision=HIGHEST)
        right_side = jnp.einsum("khagb,kgbc->khagc", C, G2[hi], precision=HIGHEST)
        return None, jnp.sum(left_side * right_side, axis=(2, 4))  # [k, H, H]

    # A scan over steps: bounded memory, a compile time independent of depth.
    _, norm_sq = jax.lax.scan(pair_norms, None, (lo_steps, hi_steps))
    norm_sq = norm_sq.reshape(-1, n_heads, n_heads)[:n_pairs]
    left, right = np.triu_indices(n_layers, k=1)
    grid = jnp.zeros((n_layers, n_layers, n_heads, n_heads), dtype=norm_sq.dtype)
    grid = jnp.moveaxis(grid.at[left, right].set(norm_sq), 1, 2)  # [L, H, L, H]
    numerator = jnp.sqrt(jnp.maximum(grid, 0))
    return numerator / jnp.sqrt(left_sq[:, :, None, None] * right_sq[None, None, :, :])
