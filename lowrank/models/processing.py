"""Weight processing on the canonical tree, with TransformerLens's formulas and order.

Every function takes a parameter tree and returns a new one (inputs are never modified);
each works alone, on NumPy arrays (host) and on jax arrays (also under ``jax.jit``).

**Folded LayerNorm is marked by absence.** :func:`fold_layer_norm` moves the LayerNorm
(or RMSNorm) scales and shifts into the weights that read the normalised stream and then
*removes* the ``blocks.ln1``, ``blocks.ln2`` and ``ln_final`` entries, exactly as
TransformerLens drops them when it swaps ``LayerNorm`` for ``LayerNormPre`` (``RMSNorm``
for ``RMSNormPre``). The forward pass reads the tree: a missing norm entry means "normalise,
no weight, no bias". A tree is an RMSNorm tree when its norms have a weight ``w`` and no
bias ``b``; TransformerLens neither centres its folded weights nor its writing weights.
Folding a tree that has no LayerNorm entries raises, so it cannot happen twice; the other
steps are idempotent.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank._deadlock import Serial
from lowrank._util import HIGHEST, upcast
from lowrank.factored import FactoredMatrix
from lowrank.linalg import svd
from lowrank.models._common import LN_PATHS, Params, lookup, updated

__all__ = [
    "center_unembed",
    "center_writing_weights",
    "fold_layer_norm",
    "fold_value_biases",
    "is_layer_norm_folded",
    "is_rms_norm",
    "process_params",
    "refactor_factored_attn_matrices",
]


def _get(params: Params, path: str, fn: str) -> Any:
    node = lookup(params, path)
    if node is None:
        raise ValueError(f"{fn}: params has no entry {path!r} (is it a lowrank tree?)")
    return node


def _zeros_like(x: Any) -> Any:
    return np.zeros_like(x) if isinstance(x, np.ndarray) else jnp.zeros_like(x)


def _centre(x: Any, axis: int) -> Any:
    return x - x.mean(axis=axis, keepdims=True)


def _scale_centre(W: Any, scale: Any, axis: int, centre: bool) -> Any:
    """``W * scale``, then centred over ``axis``; NumPy centres the fresh product in place."""
    W = W * scale
    if not centre:
        return W
    if isinstance(W, np.ndarray):
        W -= W.mean(axis=axis, keepdims=True)
        return W
    return _centre(W, axis)


def _einsum(spec: str, *operands: Any) -> Any:
    """A contraction without a full-size temporary; float32-exact on every backend."""
    if all(isinstance(x, np.ndarray) for x in operands):
        return np.einsum(spec, *operands)
    return jnp.einsum(spec, *operands, precision=HIGHEST)


def is_layer_norm_folded(params: Params) -> bool:
    """Whether ``params`` has its LayerNorms folded (no ``ln1``, ``ln2``, ``ln_final``).

    Raises:
        ValueError: some LayerNorm entries are present and others are not.
    """
    present = [p for p in LN_PATHS if lookup(params, p) is not None]
    if present and len(present) != len(LN_PATHS):
        missing = [p for p in LN_PATHS if p not in present]
        raise ValueError(
            f"params has LayerNorm entries {present} but not {missing}: either all "
            "LayerNorms carry weights or all are folded"
        )
    return not present


def fold_layer_norm(params: Params, *, center_weights: bool = True) -> Params:
    """Fold every norm's scale (and LayerNorm's shift) into the weights that read its output.

    For a reader ``W`` with bias ``b`` after LayerNorm ``(w, b_ln)``:
    ``b <- b + sum_d b_ln[d] W[d]``, ``W <- w[d] W[d]``, then (``center_weights``) ``W`` is
    centred over ``d_model``, which is harmless because LayerNorm output has zero mean.
    After RMSNorm ``w`` (no ``b``; TransformerLens's ``RMSPre``): ``W <- w[d] W[d]`` only,
    never centred (RMSNorm output does not have zero mean). ``ln1`` folds into ``W_Q, W_K,
    W_V`` (and ``b_Q, b_K, b_V``; grouped keys and values alike), ``ln2`` into
    ``W_in``/``b_in`` and ``W_gate``, ``ln_final`` into ``W_U``/``b_U``. The norm entries
    are removed.

    Raises:
        ValueError: the norms are already folded; a gated MLP after a LayerNorm shift (the
            shift enters the gate's activation and cannot be folded).
    """
    fn = "fold_layer_norm"
    if is_layer_norm_folded(params):
        raise ValueError(
            f"{fn}: the LayerNorms are already folded (params has no 'blocks.ln1', "
            "'blocks.ln2', 'ln_final'); folding twice would be wrong"
        )
    rms = is_rms_norm(params)
    centre = center_weights and not rms

    def norm(path: str) -> tuple[Any, Any]:  # (scale, shift); no shift for RMSNorm
        return _get(params, f"{path}.w", fn), None if rms else _get(params, f"{path}.b", fn)

    updates: dict[str, Any] = {}
    w1, b1 = norm("blocks.ln1")
    for x in "QKV":
        W = _get(params, f"blocks.attn.W_{x}", fn)  # [L, H (H_kv for K, V), d, dh]
        if b1 is not None:
            b = _get(params, f"blocks.attn.b_{x}", fn)  # [L, H, dh]
            updates[f"blocks.attn.b_{x}"] = b + _einsum("lhde,ld->lhe", W, b1)
        updates[f"blocks.attn.W_{x}"] = _scale_centre(W, w1[:, None, :, None], -2, centre)

    w2, b2 = norm("blocks.ln2")
    W_gate = lookup(params, "blocks.mlp.W_gate")  # [L, d, d_mlp] (gated MLPs)
    W_in = _get(params, "blocks.mlp.W_in", fn)  # [L, d, d_mlp]
    if b2 is not None:
        if W_gate is not None:
            raise ValueError(
                f"{fn}: a gated MLP (W_gate) after a LayerNorm with a shift cannot be folded"
            )
        b_in = _get(params, "blocks.mlp.b_in", fn)
        updates["blocks.mlp.b_in"] = b_in + _einsum("ldm,ld->lm", W_in, b2)
    updates["blocks.mlp.W_in"] = _scale_centre(W_in, w2[:, :, None], -2, centre)
    if W_gate is not None:
        updates["blocks.mlp.W_gate"] = _scale_centre(W_gate, w2[:, :, None], -2, centre)

    wf, bf = norm("ln_final")
    W_U = _get(params, "unembed.W_U", fn)  # [d, V]
    if bf is not None:
        updates["unembed.b_U"] = _get(params, "unembed.b_U", fn) + _einsum("dv,d->v", W_U, bf)
    updates["unembed.W_U"] = _scale_centre(W_U, wf[:, None], -2, centre)
    return updated(params, updates, remove=LN_PATHS)


def is_rms_norm(params: Params) -> bool:
    """Whether ``params`` has unfolded RMSNorms (norm weights ``w`` without biases ``b``)."""
    return lookup(params, "blocks.ln1.w") is not None and lookup(params, "blocks.ln1.b") is None


def center_writing_weights(params: Params) -> Params:
    """Centre everything that writes to the residual stream over ``d_model``.

    ``W_E``, ``W_pos`` (learned positions only), ``W_O``, ``b_O``, ``W_out``, ``b_out`` lose
    their mean over the ``d_model`` axis. Every LayerNorm subtracts the mean of its input,
    so this does not change the model's output. RMSNorm does not: TransformerLens never
    centres RMSNorm models, and :func:`process_params` refuses to.
    """
    fn = "center_writing_weights"
    paths = (
        "embed.W_E",
        "pos_embed.W_pos",
        "blocks.attn.W_O",
        "blocks.attn.b_O",
        "blocks.mlp.W_out",
        "blocks.mlp.b_out",
    )
    present = [p for p in paths if p != "pos_embed.W_pos" or lookup(params, p) is not None]
    return updated(params, {p: _centre(_get(params, p, fn), -1) for p in present})


def center_unembed(params: Params) -> Params:
    """Centre ``W_U`` and ``b_U`` over the vocabulary (softmax is shift invariant).

    Changes the logits by a per-position constant; log-probabilities are unchanged.
    """
    fn = "center_unembed"
    return updated(
        params,
        {
            "unembed.W_U": _centre(_get(params, "unembed.W_U", fn), -1),
            "unembed.b_U": _centre(_get(params, "unembed.b_U", fn), -1),
        },
    )


def fold_value_biases(params: Params) -> Params:
    """Move the value biases into the output bias: ``b_O += sum_{h,e} b_V[h,e] W_O[h,e]``.

    Attention patterns sum to one, so each head's value bias adds a constant to the layer's
    output; ``b_V`` becomes zero. Grouped value biases ``[L, H_kv, dh]`` serve every query
    head of their group (``W_O`` is read as ``[L, H_kv, group, dh, d]``).
    """
    fn = "fold_value_biases"
    b_V = _get(params, "blocks.attn.b_V", fn)  # [L, H_kv, dh]
    W_O = _get(params, "blocks.attn.W_O", fn)  # [L, H, dh, d]
    b_O = _get(params, "blocks.attn.b_O", fn)  # [L, d]
    L, kv = b_V.shape[:2]
    grouped = W_O.reshape(L, kv, W_O.shape[1] // kv, *W_O.shape[2:])
    return updated(
        params,
        {
            "blocks.attn.b_O": b_O + _einsum("lke,lkged->ld", b_V, grouped),
            "blocks.attn.b_V": _zeros_like(b_V),
        },
    )


def _svd(run: Serial, A: Any, B: Any) -> tuple[Any, Any, Any]:
    """:func:`lowrank.svd` of ``FactoredMatrix(A, B)``, run after ``run``'s previous one.

    Two decompositions at once can deadlock jaxlib's CPU kernels. Returns NumPy arrays for
    NumPy factors.
    """
    host = isinstance(A, np.ndarray) and isinstance(B, np.ndarray)
    U, S, Vh = run(lambda A, B: svd(FactoredMatrix(A, B)), jnp.asarray(A), jnp.asarray(B))
    return (np.asarray(U), np.asarray(S), np.asarray(Vh)) if host else (U, S, Vh)


def refactor_factored_attn_matrices(params: Params) -> Params:
    """Re-factor ``QK`` and ``OV`` into balanced, orthogonal factors (TransformerLens's step).

    ``[W_Q; b_Q] @ [W_K; b_K]^T`` (biases as an extra input row) is rewritten as
    ``(U sqrt(S)) (sqrt(S) V^T)``; ``b_V`` is folded into ``b_O`` and ``W_V @ W_O = U S V^T``
    becomes ``W_V = U S``, ``W_O = V^T``. Attention scores and outputs are unchanged; the
    signs of singular vectors are arbitrary, so only the products are unique.
    """
    fn = "refactor_factored_attn_matrices"
    get = lambda p: _get(params, f"blocks.attn.{p}", fn)  # noqa: E731
    if get("W_K").shape[1] != get("W_Q").shape[1]:
        raise NotImplementedError(
            f"{fn}: grouped-query attention (W_K {tuple(get('W_K').shape)} for W_Q "
            f"{tuple(get('W_Q').shape)}) is not supported"
        )
    xp = np if all(isinstance(get(p), np.ndarray) for p in ("W_Q", "W_K", "b_Q", "b_K")) else jnp
    W_Q_eff = xp.concatenate([get("W_Q"), get("b_Q")[..., None, :]], axis=-2)  # [L,H,d+1,dh]
    W_K_eff = xp.concatenate([get("W_K"), get("b_K")[..., None, :]], axis=-2)
    run = Serial()
    U, S, Vh = _svd(run, W_Q_eff, xp.swapaxes(W_K_eff, -1, -2))
    root = xp.sqrt(S)
    Q_even = U * root[..., None, :]
    K_even = xp.swapaxes(root[..., :, None] * Vh, -1, -2)

    b_V, W_O = get("b_V"), get("W_O")
    b_O = get("b_O") + _einsum("lhe,lhed->ld", b_V, W_O)
    U, S, Vh = _svd(run, get("W_V"), W_O)
    return updated(
        params,
        {
            "blocks.attn.W_Q": Q_even[..., :-1, :],
            "blocks.attn.b_Q": Q_even[..., -1, :],
            "blocks.attn.W_K": K_even[..., :-1, :],
            "blocks.attn.b_K": K_even[..., -1, :],
            "blocks.attn.W_V": U * S[..., None, :],
            "blocks.attn.W_O": Vh,
            "blocks.attn.b_V": _zeros_like(b_V),
            "blocks.attn.b_O": b_O,
        },
    )


def process_params(
    params: Params,
    *,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
    refactor_factored_attn_matrices: bool = False,
) -> Params:
    """Apply the selected steps in TransformerLens's order.

    ``fold_layer_norm`` -> ``center_writing_weights`` -> ``center_unembed`` ->
    ``fold_value_biases`` (then ``b_O`` is centred again when centring writing weights) ->
    ``refactor_factored_attn_matrices``. Low-precision floats are processed in float32 and
    cast back, as TransformerLens does.

    Raises:
        ValueError: ``center_writing_weights`` for an RMSNorm tree (TransformerLens skips
            it: RMSNorm does not subtract the mean, so centring would change the model).
    """
    if center_writing_weights and is_rms_norm(params):
        raise ValueError(
            "process_params: center_writing_weights=True for an RMSNorm tree: RMSNorm does "
            "not subtract the mean, so centring would change the model (TransformerLens "
            "skips it); pass center_writing_weights=False"
        )
    dtypes = jax.tree_util.tree_map(lambda x: x.dtype, params)
    params = jax.tree_util.tree_map(upcast, params)
    if fold_ln:
        params = _fold_layer_norm(params)
    if center_writing_weights:
        params = _center_writing_weights(params)
    if center_unembed:
        params = _center_unembed(params)
    if fold_value_biases:
        params = _fold_value_biases(params)
        if center_writing_weights:
            b_O = _get(params, "blocks.attn.b_O", "process_params")
            params = updated(params, {"blocks.attn.b_O": _centre(b_O, -1)})
    if refactor_factored_attn_matrices:
        params = _refactor_factored_attn_matrices(params)
    return _restore_dtypes(params, dtypes)


def _restore_dtypes(params: Params, dtypes: Any) -> Params:
    """Cast every leaf back to the dtype its path had before processing."""
    flat_dtypes = dict(jax.tree_util.tree_flatten_with_path(dtypes)[0])
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.astype(flat_dtypes[path]) if x.dtype != flat_dtypes[path] else x,
        params,
    )


_fold_layer_norm = fold_layer_norm
_center_writing_weights = center_writing_weights
_center_unembed = center_unembed
_fold_value_biases = fold_value_biases
_refactor_factored_attn_matrices = refactor_factored_attn_matrices
