"""The benchmarked operations: one :class:`Op` each, lowrank and TransformerLens side by side.

Every lowrank callable takes ``(model, tokens)`` and is jitted on its own (unused arguments are
pruned by ``jax.jit``). Every TransformerLens callable takes a :class:`TorchSide` and builds
its ``FactoredMatrix`` afresh, because TL caches the SVD on the instance and a reused instance
would make every call after the first free.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable
from typing import Any, Literal

import jax
import numpy as np

import lowrank
from benchmarks.shapes import Weights
from benchmarks.tl_reference import reference_model
from lowrank.models import ModelConfig

F32 = 4  # bytes


@dataclasses.dataclass
class TorchSide:
    """The TransformerLens inputs: stacked attention weights, embeddings and tokens.

    They are torch tensors made from the same NumPy arrays as the lowrank model. Grouped
    key/value weights are repeated per query head, as TransformerLens's ``W_K``, ``W_V``.
    """

    weights: Weights
    device: str
    tokens: Any  # torch.LongTensor [batch, seq]

    def __post_init__(self) -> None:
        import torch
        import transformer_lens  # noqa: F401  (imported here, not inside the first timed call)

        flat = self.weights.flat()
        group = self.weights.config.group_size
        for key in ("blocks.attn.W_K", "blocks.attn.W_V"):
            flat[key] = np.repeat(flat[key], group, axis=1)
        tensor = lambda key: torch.from_numpy(flat[key]).to(self.device)  # noqa: E731
        self.W_Q, self.W_K = tensor("blocks.attn.W_Q"), tensor("blocks.attn.W_K")
        self.W_V, self.W_O = tensor("blocks.attn.W_V"), tensor("blocks.attn.W_O")
        self.W_E, self.W_U = tensor("embed.W_E"), tensor("unembed.W_U")
        self.tokens = self.tokens.to(self.device)

    @functools.cached_property
    def model(self) -> Any:
        """TL's model of the same weights, built on first use (it copies them).

        A ``HookedTransformer`` under TransformerLens 3.x, a ``TransformerBridge`` under 4.x
        (see :mod:`benchmarks.tl_reference`).
        """
        return reference_model(self.weights, self.device)

    def OV(self) -> Any:
        """The OV circuits ``W_V @ W_O`` as a TransformerLens ``FactoredMatrix``."""
        from transformer_lens import FactoredMatrix

        return FactoredMatrix(self.W_V, self.W_O)

    def QK(self) -> Any:
        """The QK circuits ``W_Q @ W_K^T`` as a TransformerLens ``FactoredMatrix``."""
        from transformer_lens import FactoredMatrix

        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))


#: ``(config, tokens shape) -> (bytes, flops)`` of one TL call.
Cost = Callable[[ModelConfig, tuple[int, int]], tuple[float, float]]


@dataclasses.dataclass(frozen=True)
class Op:
    """One benchmarked operation.

    Attributes:
        name: the op's name on the command line and in the results.
        lowrank: ``(model, tokens) -> result``; jitted.
        reference: ``(TorchSide) -> result``: the TransformerLens recipe.
        compare: ``(lowrank result, TL result) -> max relative error`` (NumPy inputs).
        cost: ``(config, tokens shape) -> (bytes, flops)``: a rough estimate of one TL call,
            used to skip TL where it would run out of memory or time.
        description: one line for the README.
        setup: ``(TorchSide) -> None``, run before TL is timed (e.g. building a model).
    """

    name: str
    lowrank: Callable[[Any, Any], Any]
    reference: Callable[[TorchSide], Any]
    compare: Callable[[Any, Any], float]
    cost: Cost
    description: str
    setup: Callable[[TorchSide], Any] | None = None


# ------------------------------------------------------------------------- comparisons
def _f64(x: Any) -> np.ndarray:
    return np.asarray(x).astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def rel_error(a: Any, b: Any, axis: Any = None) -> float:
    """``max |a - b| / max |b|``, the max of ``|b|`` taken over ``axis`` (all axes by default)."""
    a, b = _f64(a), _f64(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: lowrank {a.shape}, TL {b.shape}")
    scale = np.max(np.abs(b), axis=axis, keepdims=axis is not None)
    return float(np.max(np.abs(a - b) / np.maximum(scale, np.finfo(np.float32).tiny)))


def eig_error(a: Any, b: Any) -> float:
    """Max error between two sets of eigenvalues, compared as multisets per head.

    Compares sorted moduli and sorted real parts, relative to the head's spectral radius
    (sorting complex numbers directly mis-pairs near-ties).
    """
    a, b = _f64(a), _f64(b)
    radius = np.maximum(np.max(np.abs(b), axis=-1, keepdims=True), np.finfo(np.float32).tiny)
    moduli = np.abs(np.sort(np.abs(a), axis=-1) - np.sort(np.abs(b), axis=-1))
    reals = np.abs(np.sort(a.real, axis=-1) - np.sort(b.real, axis=-1))
    return float(np.max(np.maximum(moduli, reals) / radius))


def _per_head_error(a: Any, b: Any) -> float:
    """:func:`rel_error` relative to each head's largest value (the last axis's)."""
    return rel_error(a, b, axis=-1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - np.max(x, axis=-1, keepdims=True)
    return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def logprob_error(a: Any, b: Any) -> float:
    """:func:`rel_error` of the log-softmax of two sets of logits (the last axis's).

    Log-probabilities do not depend on a constant added to all logits of a position.
    """
    return rel_error(_log_softmax(_f64(a)), _log_softmax(_f64(b)))


def svd_error(a: Any, b: Any) -> float:
    """Max error between two SVDs: singular values per head, and ``U diag(S) V^T x``.

    ``x`` are random probes, which makes the comparison invariant to the signs and rotations of
    singular vectors that an SVD may choose.
    """
    (U1, S1, Vh1), (U2, S2, V2) = [[np.asarray(x, dtype=np.float32) for x in r] for r in (a, b)]
    x = np.random.default_rng(0).standard_normal((Vh1.shape[-1], 8)).astype(np.float32)
    y1 = U1 @ (S1[..., :, None] * (Vh1 @ x))
    y2 = U2 @ (S2[..., :, None] * (np.swapaxes(V2, -1, -2) @ x))
    return max(rel_error(S1, S2, axis=-1), rel_error(y1, y2, axis=(-2, -1)))


def _numpy(x: Any) -> Any:
    """Results as NumPy (nested tuples kept): jax arrays and torch tensors alike."""
    if isinstance(x, (tuple, list)):
        return tuple(_numpy(v) for v in x)
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def compare(op: Op, ours: Any, theirs: Any) -> float:
    """Max relative error between the lowrank and TransformerLens results of ``op``."""
    return op.compare(_numpy(ours), _numpy(theirs))


# --------------------------------------------------------------------- cost estimates
def _sizes(c: ModelConfig) -> tuple[int, int, int, int, int]:
    return c.n_layers * c.n_heads, c.d_model, c.d_head, c.d_vocab, c.n_layers


def _cost_ov_eig(c: ModelConfig, _: Any) -> tuple[float, float]:
    n, d, dh, _, _ = _sizes(c)
    return n * dh * dh * 3 * F32, n * (2 * d * dh * dh + 25 * dh**3)


def _cost_ov_svd(c: ModelConfig, _: Any) -> tuple[float, float]:
    n, d, dh, _, _ = _sizes(c)  # SVDs of A [d, dh] and B [dh, d], then U_a @ U_m, V_b @ V_m
    return n * (4 * d * dh + 4 * dh * dh) * F32, n * (2 * 25 * d * dh * dh + 4 * d * dh * dh)


def _cost_full_ov(c: ModelConfig, _: Any) -> tuple[float, float]:
    n, d, dh, V, _ = _sizes(c)  # W_E W_V and W_O W_U: [n, V, dh] each, then B A [n, dh, dh]
    return 2 * n * V * dh * F32, n * (4 * V * d * dh + 2 * V * dh * dh)


def _cost_composition(c: ModelConfig, tokens_shape: Any) -> tuple[float, float]:
    n, d, dh, _, _ = _sizes(c)  # torch.matmul broadcasting copies both operands n^2 times
    svd_bytes, svd_flops = _cost_ov_svd(c, tokens_shape)
    nbytes = n * n * (2 * dh * d + 2 * dh * dh) * F32 + 2 * svd_bytes
    return nbytes, n * n * 2 * dh * dh * d + 2 * svd_flops


def _cost_forward(c: ModelConfig, tokens_shape: tuple[int, int]) -> tuple[float, float]:
    batch, seq = tokens_shape
    L, d, V, m = c.n_layers, c.d_model, c.d_vocab, c.d_mlp
    params = L * (4 * d * d + 2 * d * m) + 2 * V * d + c.n_ctx * d
    activations = batch * seq * (2 * V + 8 * L * d + 2 * L * m) + 3 * batch * L * c.n_heads * seq**2
    flops = 2 * batch * seq * (L * (4 * d * d + 2 * d * m) + d * V) + 4 * batch * L * seq**2 * d
    return (params + activations) * F32, flops  # TL's model copies the weights


# ----------------------------------------------------------------- TransformerLens recipes
def _tl_copying(t: TorchSide) -> Any:
    eig = (t.W_E @ t.OV() @ t.W_U).eigenvalues
    return eig.sum(-1).real / eig.abs().sum(-1)


def _tl_composition(t: TorchSide, kind: str) -> Any:
    """``HookedTransformer.all_composition_scores`` on the stacked weights."""
    import torch
    from transformer_lens.utilities import composition_scores

    right = {"Q": lambda: t.QK(), "K": lambda: t.QK().T, "V": lambda: t.OV()}[kind]()
    scores = composition_scores(t.OV(), right, broadcast_dims=True)
    layers = torch.arange(t.W_V.shape[0], device=scores.device)
    mask = layers[:, None, None, None] < layers[None, None, :, None]
    return torch.where(mask, scores, torch.zeros_like(scores))


def _composition(kind: Literal["Q", "K", "V"]) -> Op:
    return Op(
        name=f"composition_{kind}",
        lowrank=lambda m, _: lowrank.circuits.composition_scores(m, kind),
        reference=lambda t: _tl_composition(t, kind),
        compare=rel_error,
        cost=_cost_composition,
        description=f"{kind}-composition scores of all head pairs, [L, H, L, H]",
    )


#: The OV-circuit ops' comparison, TL cost estimate and description, by name.
_OV_OPS: dict[str, tuple[Callable[[Any, Any], float], Cost, str]] = {
    "ov_eigenvalues": (eig_error, _cost_ov_eig, "eigenvalues of every head's OV circuit W_V W_O"),
    "ov_singular_values": (_per_head_error, _cost_ov_svd, "singular values of every OV circuit"),
    "ov_svd": (svd_error, _cost_ov_svd, "thin SVD (U, S, V) of every OV circuit"),
    "ov_norm": (rel_error, _cost_ov_svd, "Frobenius norm of every OV circuit"),
}


def _per_query_head(ov: Any, result: Any) -> Any:
    """Results of a grouped ``OV [L, n_kv, group, d, d]`` as TL's per-head ``[L, H, ...]``."""
    if ov.ndim == 4:
        return result
    return jax.tree.map(lambda x: x.reshape(x.shape[0], -1, *x.shape[3:]), result)


def _ov_op(name: str, ours: Callable[[Any], Any], theirs: Callable[[Any], Any]) -> Op:
    """The op ``name`` of every head's OV circuit: ``ours(model.OV)`` vs ``theirs(TL's OV)``."""
    compare, cost, description = _OV_OPS[name]
    lowrank_fn = lambda m, _: _per_query_head(m.OV, ours(m.OV))  # noqa: E731
    return Op(name, lowrank_fn, lambda t: theirs(t.OV()), compare, cost, description)


OPS: tuple[Op, ...] = (
    _ov_op("ov_eigenvalues", lowrank.eigvals, operator.attrgetter("eigenvalues")),
    _ov_op("ov_singular_values", lowrank.svdvals, operator.attrgetter("S")),
    _ov_op("ov_svd", lowrank.svd, operator.methodcaller("svd")),
    _ov_op("ov_norm", lowrank.norm, operator.methodcaller("norm")),
    Op(
        "full_ov_copying",
        lambda m, _: lowrank.circuits.copying_scores(m),
        _tl_copying,
        rel_error,
        _cost_full_ov,
        "copying score sum(eig).real / sum(|eig|) of every full OV circuit W_E W_V W_O W_U",
    ),
    _composition("Q"),
    _composition("K"),
    _composition("V"),
    Op(
        "forward",
        lambda m, tokens: lowrank.models.forward(m.params, tokens, m.config),
        lambda t: t.model(t.tokens),
        logprob_error,
        _cost_forward,
        "log-softmax of the whole model's logits on a fixed batch of tokens",
        setup=lambda t: t.model,
    ),
)
OPS_BY_NAME = {op.name: op for op in OPS}
