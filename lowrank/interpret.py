"""Reading weights through the vocabulary: SVD interpreter, spectra, top entries.

The SVD interpreter follows TransformerLens's ``SVDInterpreter``: the right singular vectors
of a head's OV circuit (or of a layer's ``W_in^T``, ``W_gate^T`` / ``W_out``) live in the residual
stream, and
projecting them through the unembedding ``W_U`` says which tokens each direction promotes.
A singular vector's sign is arbitrary, so the top tokens of both signs are reported.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from lowrank import circuits, linalg
from lowrank._util import mm
from lowrank.factored import FactoredMatrix

Array = jax.Array
Kind = Literal["OV", "w_in", "w_gate", "w_out"]

__all__ = [
    "SingularDirections",
    "effective_rank",
    "embedding_spectra",
    "row_top_k",
    "svd_directions",
    "top_entries",
    "unembed_directions",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SingularDirections:
    """Top singular directions of one matrix, read out through ``W_U``.

    Attributes:
        singular_values: ``[n]``, descending.
        activations: ``[n, d_vocab]``: ``Vh[i] @ W_U`` (TransformerLens's vectors, transposed).
        top_tokens: ``[n, 2, k]`` token ids with the largest activations for the direction
            (index 0) and for its negation (index 1).
        top_values: ``[n, 2, k]`` the matching activations (of the direction or its negation).
    """

    singular_values: Array
    activations: Array
    top_tokens: Array
    top_values: Array

    def token_strings(self, tokenizer: Any) -> list[list[list[str]]]:
        """Decoded ``top_tokens`` as nested lists ``[n][2][k]``."""
        ids = np.asarray(self.top_tokens)
        return [[[tokenizer.decode([int(t)]) for t in side] for side in row] for row in ids]

    def table(self, tokenizer: Any = None) -> str:
        """One line per direction and sign: singular value and the quoted top tokens."""
        ids = np.asarray(self.top_tokens)
        lines = []
        for i, (s, row) in enumerate(zip(np.asarray(self.singular_values), ids, strict=True)):
            for sign, side in zip("+-", row, strict=True):
                words = [repr(tokenizer.decode([int(t)])) if tokenizer else f"#{t}" for t in side]
                lines.append(f"{i:>3} {sign} S={s:<9.4g} " + " ".join(words))
        return "\n".join(lines)


def _check_index(name: str, value: int, size: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"svd_directions: {name} must be an integer, got {value!r}")
    if not 0 <= value < size:
        raise ValueError(f"svd_directions: {name} must be in 0..{size - 1}, got {value}")


def _interpreted_matrix(model: Any, kind: str, layer: int, head: int | None) -> Any:
    """The matrix whose right singular vectors live in the residual stream."""
    n_layers, n_heads = model.W_O.shape[:2]
    _check_index("layer", layer, n_layers)
    if kind == "OV":
        if head is None:
            raise ValueError("svd_directions: kind 'OV' needs a head index")
        _check_index("head", head, n_heads)
        W_V = circuits.kv_weights(model)[1]  # grouped: query head h reads h // group
        return FactoredMatrix(W_V[layer, head // (n_heads // W_V.shape[1])], model.W_O[layer, head])
    if head is not None:
        raise ValueError(f"svd_directions: kind {kind!r} is per layer; got head={head}")
    if kind in ("w_in", "w_gate"):
        mlp = model.params["blocks"]["mlp"]
        if kind == "w_gate" and "W_gate" not in mlp:
            raise ValueError("svd_directions: kind 'w_gate' needs a gated MLP (this one has none)")
        w_in = mlp["W_in" if kind == "w_in" else "W_gate"][layer].T  # [d_mlp, d_model]
        ln2 = model.params["blocks"].get("ln2")
        return w_in if ln2 is None else w_in * ln2["w"][layer]  # unfolded LN scales inputs
    if kind == "w_out":
        return model.W_out[layer]  # [d_mlp, d_model]
    raise ValueError(
        f"svd_directions: kind must be 'OV', 'w_in', 'w_gate' or 'w_out', got {kind!r}"
    )


def svd_directions(
    model: Any,
    kind: Kind,
    layer: int,
    head: int | None = None,
    *,
    num_vectors: int | None = None,
    top_k: int = 10,
) -> SingularDirections:
    """Top ``num_vectors`` singular directions of an OV circuit or MLP matrix, read via ``W_U``.

    Args:
        model: a model with ``W_V``, ``W_O``, ``W_in``, ``W_out``, ``W_U`` (and ``params``);
            grouped-query models are read from their grouped ``W_V`` (no repeated copy).
        kind: ``"OV"`` (needs ``head``), ``"w_in"``, ``"w_gate"`` or ``"w_out"``. In a gated
            MLP (Llama, Mistral, Qwen2, Gemma: ``down(act(gate(x)) * up(x))``) ``"w_in"`` is
            the up projection (HF's ``up_proj``), ``"w_gate"`` the gate projection
            (``gate_proj``) and ``"w_out"`` the down projection (``down_proj``), as
            TransformerLens names them; ``"w_gate"`` needs a gated MLP.
        layer, head: which matrix.
        num_vectors: how many singular directions, largest first (default: up to 10).
        top_k: tokens per direction and sign.
    """
    matrix = _interpreted_matrix(model, kind, layer, head)
    _, S, Vh = linalg.svd(matrix)
    if num_vectors is None:
        num_vectors = min(10, S.shape[-1])
    if not 1 <= num_vectors <= S.shape[-1]:
        raise ValueError(
            f"svd_directions: num_vectors must be in 1..{S.shape[-1]} for this matrix, "
            f"got {num_vectors}"
        )
    d_vocab = model.W_U.shape[-1]
    if not 1 <= top_k <= d_vocab:
        raise ValueError(f"svd_directions: top_k must be in 1..{d_vocab}, got {top_k}")
    return _directions(S[:num_vectors], Vh[:num_vectors], model.W_U, top_k)


def _directions(S: Array, Vh: Array, readout: Array | None, top_k: int) -> SingularDirections:
    """Package singular directions ``Vh [n, r]`` read out through ``readout [r, V]``."""
    activations = Vh if readout is None else mm(Vh, readout)
    if not 1 <= top_k <= activations.shape[-1]:
        raise ValueError(f"top_k must be in 1..{activations.shape[-1]}, got {top_k}")
    pos_vals, pos_ids = jax.lax.top_k(activations, top_k)
    neg_vals, neg_ids = jax.lax.top_k(-activations, top_k)
    return SingularDirections(
        singular_values=S,
        activations=activations,
        top_tokens=jnp.stack([pos_ids, neg_ids], axis=1),
        top_values=jnp.stack([pos_vals, neg_vals], axis=1),
    )


def unembed_directions(model: Any, *, num_vectors: int = 10, top_k: int = 10) -> SingularDirections:
    """Top singular directions of the unembedding ``W_U [d_model, V]`` in token space.

    ``activations[i]`` is the ``i``-th right singular vector of ``W_U`` (a vector over the
    vocabulary); its top tokens of either sign are the tokens that direction separates.
    """
    _, S, Vh = linalg.svd(model.W_U)
    if not 1 <= num_vectors <= S.shape[-1]:
        raise ValueError(f"unembed_directions: num_vectors must be in 1..{S.shape[-1]}")
    return _directions(S[:num_vectors], Vh[:num_vectors], None, top_k)


def effective_rank(S: Array, rel_threshold: float = 0.01) -> Array:
    """Number of singular values above ``rel_threshold`` times the largest, ``S: [..., k]``."""
    if not 0 < rel_threshold < 1:
        raise ValueError(f"effective_rank: rel_threshold must be in (0, 1), got {rel_threshold}")
    top = jnp.max(S, axis=-1, keepdims=True)
    return jnp.sum(S > rel_threshold * top, axis=-1)


def embedding_spectra(
    model: Any, tokens: Array | None = None, positions: Array | None = None
) -> dict[str, Array]:
    """Singular values of ``W_E``, ``W_U``, ``W_pos`` and of token-plus-position embeddings.

    A model with rotary positions has no ``W_pos``: its spectra are those of ``W_E`` and ``W_U``
    alone (and ``positions`` must be ``None``).

    Args:
        tokens, positions: index vectors; the rows ``W_E[t] + W_pos[p]`` for every pair form the
            ``"W_E + W_pos"`` matrix (default: the first 256 tokens, every position).

    Returns:
        ``{"W_E": [k], "W_U": [k], "W_pos": [k], "W_E + W_pos": [k]}``, the last two only for
        learned positions.
    """
    spectra = {"W_E": linalg.svdvals(model.W_E), "W_U": linalg.svdvals(model.W_U)}
    if model.config.positional != "learned":
        if positions is not None:
            raise ValueError(
                f"embedding_spectra: positions given, but the model's positions are "
                f"{model.config.positional} (no W_pos)"
            )
        return spectra
    tokens = jnp.arange(min(256, model.W_E.shape[0])) if tokens is None else jnp.asarray(tokens)
    positions = jnp.arange(model.W_pos.shape[0]) if positions is None else jnp.asarray(positions)
    grid = model.W_E[tokens][:, None, :] + model.W_pos[positions][None, :, :]
    return {
        **spectra,
        "W_pos": linalg.svdvals(model.W_pos),
        "W_E + W_pos": linalg.svdvals(grid.reshape(-1, grid.shape[-1])),
    }


def _row_blocks(M: FactoredMatrix, chunk: int) -> tuple[Array, int]:
    """``A`` padded to whole chunks of rows: ``[n_chunks, chunk, m]``, and the row count."""
    if M.ndim != 2:
        raise ValueError(f"expected a single matrix [l, r], got a FactoredMatrix of {M.shape}")
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    rows = M.ldim
    n_chunks = -(-rows // chunk)
    A = jnp.pad(M.A, ((0, n_chunks * chunk - rows), (0, 0)))
    return A.reshape(n_chunks, chunk, M.mdim), rows


def row_top_k(M: FactoredMatrix, k: int, *, chunk: int = 1024) -> tuple[Array, Array]:
    """Top ``k`` entries of every row of ``A @ B`` (e.g. a ``V x V`` circuit) by row blocks.

    Returns:
        ``values [l, k]`` and column ``indices [l, k]``; at most ``chunk x r`` entries of the
        product exist at a time.
    """
    blocks, rows = _row_blocks(M, chunk)
    if not 1 <= k <= M.rdim:
        raise ValueError(f"row_top_k: k must be in 1..{M.rdim}, got {k}")

    def block_top(a: Array) -> tuple[Array, Array]:
        return jax.lax.top_k(mm(a, M.B), k)

    values, indices = jax.lax.map(block_top, blocks)
    return values.reshape(-1, k)[:rows], indices.reshape(-1, k)[:rows]


def top_entries(M: FactoredMatrix, k: int, *, chunk: int = 1024) -> tuple[Array, Array, Array]:
    """The ``k`` largest entries of ``A @ B`` without forming it.

    Returns:
        ``values [k]`` (descending), ``rows [k]``, ``cols [k]``.
    """
    if not 1 <= k <= M.ldim * M.rdim:
        raise ValueError(f"top_entries: k must be in 1..{M.ldim * M.rdim}, got {k}")
    values, cols = row_top_k(M, min(k, M.rdim), chunk=chunk)
    flat_values, flat = jax.lax.top_k(values.reshape(-1), k)
    width = values.shape[1]
    return flat_values, flat // width, cols.reshape(-1)[flat]
