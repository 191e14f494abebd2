"""Circuits of attention heads, batched over ``[L, H]`` and kept factored.

Every function takes a model (anything with TransformerLens-named weights ``W_E``, ``W_pos``,
``W_U``, ``W_Q``, ``W_K``, ``W_V`` ``[L, H, d_model, d_head]`` and ``W_O``
``[L, H, d_head, d_model]``, such as :class:`lowrank.models.TransformerModel`) and is
jittable with the model as an argument. Nothing ``d_vocab x d_vocab`` or
``[L, H, d_model, d_model]`` is formed unless a function returns it on purpose.

Grouped-query attention: a model whose ``W_K_grouped`` / ``W_V_grouped`` are
``[L, n_kv_heads, d_model, d_head]`` (``n_kv_heads < H``, query head ``h`` reading key/value
head ``h // group``) is analysed from those grouped weights, never from a copy repeated per
query head. Numeric results keep TransformerLens's per-query-head shapes and meaning
(``[L, H]`` copying scores, ``[L, H, L, H]`` composition scores, ...). The circuits that are
returned as a :class:`FactoredMatrix` split the head axis instead, ``[L, n_kv_heads, group,
l, r]``, with the key/value factor broadcast over ``group`` (size 1 there); reshape a
per-head result of one to ``[L, H, ...]`` (``x.reshape(L, H, *x.shape[3:])``).
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lowrank import linalg
from lowrank._util import HIGHEST, mm, mT, upcast
from lowrank.chain import cyclic_core
from lowrank.factored import FactoredMatrix
from lowrank.models.processing import is_layer_norm_folded
from lowrank.models.transformer import rotary_angles, rotate

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
    "kv_weights",
    "ov_circuit",
    "ov_eigenvalues",
    "positional_qk_circuit",
    "qk_circuit",
    "relative_position_profile",
    "rotary_positional_pattern",
    "rotary_qk_circuit",
]


class _Heads(NamedTuple):
    """Attention weights with the head axis split as ``[L, n_kv_heads, group, ...]``.

    ``Q [..., d_model, d_head]`` and ``O [..., d_head, d_model]`` are per query head;
    ``K`` and ``V [L, n_kv_heads, 1, d_model, d_head]`` are per key/value head (size-1 group
    axis, broadcast). Without grouping ``n_kv_heads = H`` and ``group = 1``.
    """

    Q: Array
    K: Array
    V: Array
    O: Array


def kv_weights(model: Any) -> tuple[Array, Array]:
    """The stored key and value weights ``W_K, W_V [L, n_kv_heads, d_model, d_head]``.

    ``model.W_K_grouped`` / ``model.W_V_grouped`` where the model has them (grouped-query
    models keep fewer key/value heads than query heads), else ``model.W_K`` / ``model.W_V``.

    Raises:
        ValueError: if the query heads cannot be shared evenly by the key/value heads.
    """
    W_K, W_V = (_stored(model, name) for name in ("W_K", "W_V"))
    n_heads, n_kv = model.W_Q.shape[1], W_K.shape[1]
    if W_K.shape != W_V.shape or W_K.ndim != 4 or n_kv == 0 or n_heads % n_kv:
        raise ValueError(
            "kv_weights: W_K and W_V must both be [L, n_kv_heads, d_model, d_head] with "
            f"n_kv_heads dividing the {n_heads} query heads of W_Q "
            f"{tuple(model.W_Q.shape)}; got {tuple(W_K.shape)} and {tuple(W_V.shape)}"
        )
    return W_K, W_V


def _stored(model: Any, name: str) -> Array:
    grouped = getattr(model, f"{name}_grouped", None)
    return getattr(model, name) if grouped is None else grouped


def _split(x: Array, n_kv: int) -> Array:
    """``[L, H, ...] -> [L, n_kv, H // n_kv, ...]`` (a reshape)."""
    return x.reshape(x.shape[0], n_kv, x.shape[1] // n_kv, *x.shape[2:])


def _merge(x: Array) -> Array:
    """``[L, n_kv, group, ...] -> [L, n_kv * group, ...]`` (a reshape)."""
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _heads(model: Any) -> _Heads:
    W_K, W_V = kv_weights(model)
    n_kv = W_K.shape[1]
    return _Heads(
        _split(model.W_Q, n_kv), W_K[:, :, None], W_V[:, :, None], _split(model.W_O, n_kv)
    )


def _circuit(A: Array, B: Array) -> FactoredMatrix:
    """``FactoredMatrix(A, B)`` of split factors; ``[L, H, l, r]`` when nothing is grouped."""
    if A.shape[2] == B.shape[2] == 1:
        return FactoredMatrix(A[:, :, 0], B[:, :, 0])
    return FactoredMatrix(A, B)


def ov_circuit(model: Any) -> FactoredMatrix:
    """``W_V @ W_O`` per head: ``FactoredMatrix [L, H, d_model, d_model]`` of rank ``d_head``.

    Grouped-query models: ``[L, n_kv_heads, group, d_model, d_model]`` (module docstring).
    """
    h = _heads(model)
    return _circuit(h.V, h.O)


def qk_circuit(model: Any) -> FactoredMatrix:
    """``W_Q @ W_K^T`` per head: ``FactoredMatrix [L, H, d_model, d_model]``.

    Ignores the rotary embedding of rotary models, as TransformerLens's ``model.QK`` does;
    :func:`rotary_qk_circuit` is the rotary-aware circuit, one per relative offset.
    Grouped-query models: ``[L, n_kv_heads, group, d_model, d_model]`` (module docstring).
    """
    h = _heads(model)
    return _circuit(h.Q, mT(h.K))


def full_ov_circuit(model: Any) -> FactoredMatrix:
    """``W_E @ W_V @ W_O @ W_U``: ``FactoredMatrix [L, H, d_vocab, d_vocab]``.

    Its factors ``W_E W_V [L, H, V, d_head]`` and ``W_O W_U [L, H, d_head, V]`` are formed (that
    is what returning it means; grouped-query models form ``W_E W_V`` once per key/value head,
    shape as in the module docstring); for its eigenvalues use :func:`copying_scores`, which
    never forms them.
    """
    h = _heads(model)
    return _circuit(mm(model.W_E, h.V), mm(h.O, model.W_U))


def full_qk_circuit(model: Any) -> FactoredMatrix:
    """``W_E @ W_Q @ W_K^T @ W_E^T``: token-by-token attention scores, ``[L, H, V, V]``."""
    h = _heads(model)
    return _circuit(mm(model.W_E, h.Q), mT(mm(model.W_E, h.K)))


def positional_qk_circuit(model: Any) -> FactoredMatrix:
    """``W_pos @ W_Q @ W_K^T @ W_pos^T``: position-by-position scores, ``[L, H, n_ctx, n_ctx]``."""
    h = _heads(model)
    return _circuit(mm(model.W_pos, h.Q), mT(mm(model.W_pos, h.K)))


def _rotary_config(model: Any, where: str) -> Any:
    """``model.config`` of a rotary model; ``ValueError`` for any other model."""
    config = getattr(model, "config", None)
    positional = getattr(config, "positional", None)
    if positional == "rotary":
        return config
    if positional is None:
        raise ValueError(
            f"{where}: model has no config with positional='rotary' (a ModelConfig), so its "
            "rotation is unknown; pass a rotary TransformerModel"
        )
    raise ValueError(
        f"{where}: model has {positional} position embeddings, not rotary ones; for learned "
        "positions (W_pos) use positional_qk_circuit"
    )


def _int_offsets(offsets: Any, where: str) -> Array:
    """``offsets`` as an integer array; ``ValueError`` for any other dtype."""
    dtype = getattr(offsets, "dtype", None)
    if dtype is None:
        dtype = np.asarray(offsets).dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(
            f"{where}: offsets must be integers (query position minus key position), got "
            f"dtype {dtype}"
        )
    return jnp.asarray(offsets)


def _rotate_by(x: Array, offsets: Array, config: Any, *, trailing: int = 1) -> Array:
    """``R(delta) x`` over the last axis, with the offsets' axes before the last ``trailing``.

    ``x [..., *t, d_head] -> [..., *offsets.shape, *t, d_head]`` (``t``: ``trailing - 1``
    axes). ``R(delta)`` is the forward pass's own rotation of a query at position ``delta``
    (:func:`~lowrank.models.transformer.rotate` by
    :func:`~lowrank.models.transformer.rotary_angles`): it rotates the first ``rotary_dim``
    features and keeps the rest. Since the forward pass rotates ``q`` by ``R(i)`` and ``k`` by
    ``R(j)``, ``R(i) q . R(j) k = R(i - j) q . k``.
    """
    angles = rotary_angles(config, offsets, dtype=x.dtype)  # [*o, rotary_dim]
    angles = angles.reshape(*offsets.shape, *(1,) * (trailing - 1), angles.shape[-1])
    x = x.reshape(*x.shape[:-trailing], *(1,) * offsets.ndim, *x.shape[-trailing:])
    return rotate(x, jnp.cos(angles), jnp.sin(angles))


def rotary_qk_circuit(model: Any, offsets: Any) -> FactoredMatrix:
    """``W_Q R(delta) W_K^T`` per head and relative offset: ``[L, H, n_offsets, d_model, d_model]``.

    The bilinear form of a rotary head between a query residual at position ``i`` and a key
    residual at ``j = i - delta``: ``x_i W_Q R(delta) W_K^T x_j`` is the forward pass's score
    before the divisor (and without biases). ``R(delta)`` is the model's own rotation (its
    ``rotary_dim``, base and ``rope_scaling``, the frequencies of
    :func:`~lowrank.models.transformer.rotary_frequencies`), the identity on the pass-through
    features; the forward pass rotates ``q_i`` by ``R(i)`` and ``k_j`` by ``R(j)``, and
    ``R(i) q . R(j) k = R(i - j) q . k``.

    TransformerLens's ``model.QK`` ignores the rotation, and so do :func:`qk_circuit` and
    ``TransformerModel.QK`` (``W_Q W_K^T``, the circuit at ``delta = 0``); this function is the
    rotary-aware one. Kept factored: ``A = W_Q R(delta) [..., d_model, d_head]`` (formed once
    per offset), ``B = W_K^T [..., d_head, d_model]`` broadcast over the offsets. Grouped-query
    models: ``[L, n_kv_heads, group, n_offsets, d_model, d_model]`` with ``B`` the grouped
    ``W_K^T [L, n_kv_heads, 1, 1, d_head, d_model]``, as :func:`qk_circuit`.

    Args:
        model: a rotary model (``model.config.positional == "rotary"``).
        offsets: integer offsets ``delta`` (query position minus key position; 0 and negative
            values allowed), any shape; its axes replace ``n_offsets`` (a scalar drops it).

    Raises:
        ValueError: for a model without rotary embeddings (use :func:`positional_qk_circuit`)
            or offsets that are not integers.
    """
    where = "rotary_qk_circuit"
    config = _rotary_config(model, where)
    offsets = _int_offsets(offsets, where)
    h = _heads(model)
    A = _rotate_by(upcast(h.Q), offsets, config, trailing=2)  # each row of W_Q
    KT = mT(upcast(h.K))  # [L, n_kv, 1, d_head, d_model]
    return _circuit(A, KT.reshape(*KT.shape[:3], *(1,) * offsets.ndim, *KT.shape[3:]))


def _default_residual(model: Any) -> Array:
    """The mean normalised token embedding, as each layer's ``W_Q``/``W_K`` read it: ``[L, d]``.

    Each row of ``W_E`` is normalised as the first norm normalises (LayerNorm: centred, then
    divided by its root mean square; RMSNorm: divided by it), the rows are averaged, and the
    ``ln1`` weight (and LayerNorm bias) of each layer applied when they are not folded.
    """
    config = model.config
    E = upcast(model.W_E)
    if config.normalization == "LN":
        E = E - jnp.mean(E, axis=-1, keepdims=True)
    E = E * jax.lax.rsqrt(jnp.mean(E * E, axis=-1, keepdims=True) + config.eps)
    x = jnp.broadcast_to(jnp.mean(E, axis=0), (config.n_layers, config.d_model))
    params = getattr(model, "params", None)
    if params is None or is_layer_norm_folded(params):
        return x
    ln1 = params["blocks"]["ln1"]
    x = x * upcast(ln1["w"])
    return x + upcast(ln1["b"]) if "b" in ln1 else x


def _residual(model: Any, x: Any, where: str) -> Array:
    """``x`` as ``[L, d_model]`` (the default of :func:`_default_residual` for ``None``)."""
    if x is None:
        return _default_residual(model)
    n_layers, d_model = model.W_Q.shape[0], model.W_Q.shape[2]
    x = jnp.asarray(x)
    if x.ndim not in (1, 2) or x.shape[-1] != d_model or x.shape[:-1] not in ((), (n_layers,)):
        raise ValueError(
            f"{where}: x must be [d_model] or [L, d_model] = [{n_layers}, {d_model}], got "
            f"{tuple(x.shape)}"
        )
    return jnp.broadcast_to(upcast(x), (n_layers, d_model))


def relative_position_profile(model: Any, offsets: Any, x: Any = None) -> Array:
    """Each rotary head's score for a key ``delta`` tokens back, from the weights: ``[L, H, n]``.

    ``profile[l, h, delta] = x_l W_Q R(delta) W_K^T x_l``: the bilinear form of
    :func:`rotary_qk_circuit` evaluated on one residual vector ``x_l`` as both query and key,
    so that only the position (the rotation) differs between query and key. The default
    ``x_l`` is the mean over the vocabulary of the token embeddings normalised as the first
    norm normalises them (and scaled by layer ``l``'s ``ln1`` weights when not folded). As
    the form is bilinear, that makes ``profile[delta]`` exactly the expected score between a
    query token and a key token drawn independently and uniformly from the vocabulary
    ``delta`` positions apart (residual = normalised embedding): the part of the score that
    depends on position alone, with token identity averaged out. A previous-token head has
    its maximum at ``delta = 1``. Like the circuits it ignores biases and the score divisor
    (divide by ``model.config.attn_scales[l]`` for the logits the softmax sees); for layers
    after the first the embedding is only the first-order part of the residual stream.

    Computed without any ``d_model x d_model`` matrix: ``R(delta)`` rotates ``x_l W_Q``
    ``[L, H, d_head]``, which is dotted with ``x_l W_K`` (once per key/value head).

    Args:
        model: a rotary model.
        offsets: integer offsets ``delta`` (query position minus key position), any shape; its
            axes are the trailing axes of the result.
        x: the residual vector that ``W_Q`` and ``W_K`` read (after the first norm),
            ``[d_model]`` or per layer ``[L, d_model]``; ``None`` for the default above.

    Returns:
        ``[L, H, *offsets.shape]`` (per query head also for grouped-query models).

    Raises:
        ValueError: as :func:`rotary_qk_circuit`, or for ``x`` of the wrong shape.
    """
    where = "relative_position_profile"
    config = _rotary_config(model, where)
    offsets = _int_offsets(offsets, where)
    x = _residual(model, x, where)
    h = _heads(model)
    q = jnp.einsum("ld,lkgde->lkge", x, upcast(h.Q), precision=HIGHEST)  # [L, n_kv, g, dh]
    k = jnp.einsum("ld,lkgde->lkge", x, upcast(h.K), precision=HIGHEST)  # [L, n_kv, 1, dh]
    q = _rotate_by(q, offsets, config)  # [L, n_kv, group, *o, d_head]
    k = k.reshape(*k.shape[:3], *(1,) * offsets.ndim, k.shape[-1])
    return _merge(jnp.sum(q * k, axis=-1))


def rotary_positional_pattern(model: Any, n_positions: int, x: Any = None) -> Array:
    """Query-by-key scores of a constant input on a rotary model: ``[L, H, n, n]``.

    The rotary analogue of :func:`positional_qk_circuit`: the score between query position
    ``i`` and key position ``j`` when every position holds the same residual ``x`` (default:
    the mean normalised embedding of :func:`relative_position_profile`), so that only the
    rotation distinguishes positions. It is Toeplitz, ``pattern[..., i, j] =
    relative_position_profile(model, i - j, x)``, and computed from the ``n`` offsets, never
    from a dense circuit. Entries the model never computes (keys after the query, ``j > i``,
    and keys outside a local layer's window) are ``-inf``, so ``jax.nn.softmax(pattern /
    scale, axis=-1)`` is the attention pattern of that input; to plot, map them to NaN
    (``jnp.where(jnp.isfinite(p), p, jnp.nan)``). Scores exclude biases and the divisor.

    Args:
        model: a rotary model.
        n_positions: the number of positions ``n`` (a positive Python int).
        x: as in :func:`relative_position_profile`.

    Raises:
        ValueError: as :func:`relative_position_profile`, or for a bad ``n_positions``.
    """
    where = "rotary_positional_pattern"
    config = _rotary_config(model, where)
    if isinstance(n_positions, bool) or not isinstance(n_positions, (int, np.integer)):
        raise ValueError(f"{where}: n_positions must be a Python int, got {n_positions!r}")
    if n_positions < 1:
        raise ValueError(f"{where}: n_positions must be positive, got {n_positions}")
    n = int(n_positions)
    profile = relative_position_profile(model, np.arange(n), x)  # [L, H, n]
    delta = np.arange(n)[:, None] - np.arange(n)[None, :]  # [query, key]
    pattern = profile[..., np.clip(delta, 0, None)]
    windows = np.asarray(config.attn_windows)[:, None, None, None]
    allowed = (delta >= 0) & (delta < windows)  # [L, 1, n, n]
    return jnp.where(jnp.asarray(allowed), pattern, jnp.asarray(-jnp.inf, pattern.dtype))


def ov_eigenvalues(model: Any, *, full: bool = True) -> Array:
    """Nonzero eigenvalues of each head's (full) OV circuit, ``[L, H, d_head]`` complex.

    Args:
        model: the model.
        full: the full OV circuit ``W_E W_V W_O W_U`` (default), via the ``d_head x d_head``
            core ``W_O (W_U W_E) W_V`` in which ``W_U W_E`` is shared by all heads; ``False``
            uses the OV circuit ``W_V W_O`` alone (core ``W_O W_V``). Grouped value weights
            enter the core once per key/value head.
    """
    h = _heads(model)
    if full:
        core = cyclic_core(model.W_E, h.V, h.O, model.W_U)
    else:
        core = mm(h.O, h.V)
    return _merge(linalg.eigvals(core))


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


def _right_factors(h: _Heads, kind: str) -> tuple[Array, Array]:
    """The later head's factors ``A2 [L, n_kv, g_A, d_model, d_head]``, ``B2 [..., d_model]``."""
    if kind == "Q":  # writes into the queries: QK
        return h.Q, mT(h.K)
    if kind == "K":  # writes into the keys: QK^T
        return h.K, mT(h.Q)
    if kind == "V":  # writes into the values: OV
        return h.V, h.O
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
    layer pairs at a time. Grouped-query models: the key/value factors (and their Gram
    matrices) enter once per key/value head and are broadcast over its query heads inside
    the small ``d_head x d_head`` products; the scores are per query head, as
    TransformerLens's (which repeats ``W_K``, ``W_V`` per query head).

    Args:
        schedule: the layer pairs of each step (:func:`composition_schedule`, the default).
            :func:`lowrank.sharding.composition_scores` passes one whose steps are split over
            devices.

    Returns:
        ``[L, H, L, H]`` (left layer, left head, right layer, right head), zero unless
        ``left layer < right layer``. Compare with :func:`composition_baseline`.
    """
    h = _heads(model)  # left = V O of an earlier head, right = A2 @ B2
    A2, B2 = _right_factors(h, kind)
    n_layers, n_kv, group, d_model, d_head = h.Q.shape
    n_heads = n_kv * group
    n_pairs = n_layers * (n_layers - 1) // 2
    steps = composition_schedule(n_layers, n_heads, d_head) if schedule is None else schedule
    lo_steps, hi_steps = jnp.asarray(steps[0]), jnp.asarray(steps[1])
    if lo_steps.ndim != 2 or lo_steps.shape != hi_steps.shape or lo_steps.size < n_pairs:
        raise ValueError(
            "composition_scores: schedule must be two [steps, pairs_per_step] arrays covering "
            f"all {n_pairs} layer pairs, got shapes {lo_steps.shape} and {hi_steps.shape}"
        )
    G1 = mm(mT(h.V), h.V)[:, :, 0]  # [L, n_kv, dh, dh]: once per key/value head
    G2 = mm(B2, mT(B2))  # [L, n_kv, g_B, dh, dh]
    left_sq = _merge(jnp.sum(G1[:, :, None] * mm(h.O, mT(h.O)), axis=(-2, -1)))  # [L, H]
    right_sq = _merge(jnp.sum(G2 * mm(mT(A2), A2), axis=(-2, -1)))
    B1_rows = model.W_O.reshape(n_layers, n_heads * d_head, d_model)

    def pair_norms(_: None, pair: tuple[Array, Array]) -> tuple[None, Array]:
        lo, hi = pair
        k = lo.shape[0]
        # Indices: k pair, (u, j) left head (kv head, member), (v, m|n) right head.
        C = jnp.einsum("kid,kvmde->kvmie", B1_rows[lo], A2[hi], precision=HIGHEST)
        C = C.reshape(k, n_kv, A2.shape[2], n_kv, group, d_head, d_head)
        left_side = jnp.einsum("kuab,kvmujbe->kvmujae", G1[lo], C, precision=HIGHEST)
        right_side = jnp.einsum("kvmujae,kvnec->kvmnujac", C, G2[hi], precision=HIGHEST)
        sq = jnp.einsum("kvmujac,kvmnujac->kvmnuj", left_side, right_side, precision=HIGHEST)
        return None, jnp.swapaxes(sq.reshape(k, n_heads, n_heads), 1, 2)  # [k, H, H]

    # A scan over steps: bounded memory, a compile time independent of depth.
    _, norm_sq = jax.lax.scan(pair_norms, None, (lo_steps, hi_steps))
    norm_sq = norm_sq.reshape(-1, n_heads, n_heads)[:n_pairs]
    left, right = np.triu_indices(n_layers, k=1)
    grid = jnp.zeros((n_layers, n_layers, n_heads, n_heads), dtype=norm_sq.dtype)
    grid = jnp.moveaxis(grid.at[left, right].set(norm_sq), 1, 2)  # [L, H, L, H]
    numerator = jnp.sqrt(jnp.maximum(grid, 0))
    return numerator / jnp.sqrt(left_sq[:, :, None, None] * right_sq[None, None, :, :])
