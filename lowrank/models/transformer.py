"""Flax linen forward pass over the canonical parameter tree.

The linen module's parameters *are* the canonical tree: ``Transformer(config).apply(
{"params": params}, tokens)`` with ``params`` as produced by the converters and processing
functions. The layers run in one ``nn.scan`` over the stacked layer axis; per-layer
attention settings (GPT-Neo's local windows, GPT-2's inverse-layer scaling) are scanned
arrays, so every layer shares one compiled body.

A tree without ``blocks.ln1``/``blocks.ln2``/``ln_final`` (folded LayerNorm, see
:mod:`lowrank.models.processing`) makes the LayerNorms normalise without scale or shift.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lowrank.models._common import Params
from lowrank.models.config import ModelConfig
from lowrank.models.processing import is_layer_norm_folded

__all__ = ["ACTIVATION_FNS", "Transformer", "forward", "init_params"]

Array = jax.Array

#: ``act_fn`` name -> function (the names of ``config.ACTIVATIONS``); ``gelu_new`` (GPT-2)
#: is the tanh approximation.
ACTIVATION_FNS: dict[str, Callable[[Array], Array]] = {
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

_w_init = nn.initializers.normal(stddev=0.02)


def _at_least_f32(dtype: Any) -> Any:
    """float32 for bfloat16/float16, the dtype itself otherwise (float32, float64)."""
    return jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype


class LayerNorm(nn.Module):
    """LayerNorm over the last axis; without weights (``with_params=False``) once folded."""

    eps: float
    with_params: bool = True
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dtype = x.dtype
        x = x.astype(_at_least_f32(dtype))  # statistics in float32 or wider
        x = x - x.mean(axis=-1, keepdims=True)
        x = (x / jnp.sqrt((x * x).mean(axis=-1, keepdims=True) + self.eps)).astype(dtype)
        if self.with_params:
            d = x.shape[-1]
            x = x * self.param("w", nn.initializers.ones, (d,), self.param_dtype)
            x = x + self.param("b", nn.initializers.zeros, (d,), self.param_dtype)
        return x


class Attention(nn.Module):
    """Causal multi-head attention with a per-call window and score divisor."""

    n_heads: int
    d_head: int
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array, window: Array, scale: Array) -> tuple[Array, Array]:
        """``x: [batch, seq, d]`` -> output ``[batch, seq, d]``, pattern ``[batch, H, q, k]``."""
        H, dh, d, pd = self.n_heads, self.d_head, x.shape[-1], self.param_dtype
        ein = functools.partial(jnp.einsum, precision=self.precision)
        q, k, v = (
            ein("bsd,hde->bshe", x, self.param(f"W_{n}", _w_init, (H, d, dh), pd))
            + self.param(f"b_{n}", nn.initializers.zeros, (H, dh), pd)
            for n in "QKV"
        )
        W_O = self.param("W_O", _w_init, (H, dh, d), pd)
        b_O = self.param("b_O", nn.initializers.zeros, (d,), pd)
        scores = ein("bqhe,bkhe->bhqk", q, k) / scale
        seq = x.shape[-2]
        qpos = jnp.arange(seq, dtype=jnp.int32)[:, None]
        kpos = jnp.arange(seq, dtype=jnp.int32)[None, :]
        allowed = (kpos <= qpos) & (qpos - kpos < window)
        scores = scores.astype(_at_least_f32(scores.dtype))
        scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
        pattern = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        z = ein("bhqk,bkhe->bqhe", pattern, v)
        return ein("bqhe,hed->bqd", z, W_O) + b_O, pattern


class MLP(nn.Module):
    d_mlp: int
    act_fn: str
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d, m, pd = x.shape[-1], self.d_mlp, self.param_dtype
        W_in = self.param("W_in", _w_init, (d, m), pd)
        b_in = self.param("b_in", nn.initializers.zeros, (m,), pd)
        W_out = self.param("W_out", _w_init, (m, d), pd)
        b_out = self.param("b_out", nn.initializers.zeros, (d,), pd)
        post = ACTIVATION_FNS[self.act_fn](jnp.matmul(x, W_in, precision=self.precision) + b_in)
        return jnp.matmul(post, W_out, precision=self.precision) + b_out


class Block(nn.Module):
    """One pre-LayerNorm transformer block, written as a scan body ``(resid, xs) -> ...``."""

    config: ModelConfig
    ln_weights: bool = True
    return_activations: bool = False
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, resid: Array, xs: tuple[Array, Array]) -> tuple[Array, Any]:
        c, pd, prec = self.config, self.param_dtype, self.precision
        window, scale = xs
        ln1 = LayerNorm(c.eps, self.ln_weights, pd, name="ln1")
        ln2 = LayerNorm(c.eps, self.ln_weights, pd, name="ln2")
        attn = Attention(c.n_heads, c.d_head, pd, prec, name="attn")
        attn_out, pattern = attn(ln1(resid), window, scale)
        mid = resid + attn_out
        post = mid + MLP(c.d_mlp, c.act_fn, pd, prec, name="mlp")(ln2(mid))
        if not self.return_activations:
            return post, None
        return post, {"resid_pre": resid, "resid_mid": mid, "resid_post": post, "pattern": pattern}


class _Embed(nn.Module):
    d_vocab: int
    d_model: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        W_E = self.param("W_E", _w_init, (self.d_vocab, self.d_model), self.param_dtype)
        return jnp.take(W_E, tokens, axis=0)


class _PosEmbed(nn.Module):
    n_ctx: int
    d_model: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, seq: int) -> Array:
        W_pos = self.param("W_pos", _w_init, (self.n_ctx, self.d_model), self.param_dtype)
        return W_pos[:seq]


class _Unembed(nn.Module):
    d_vocab: int
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d, V, pd = x.shape[-1], self.d_vocab, self.param_dtype
        W_U = self.param("W_U", _w_init, (d, V), pd)
        b_U = self.param("b_U", nn.initializers.zeros, (V,), pd)
        return jnp.matmul(x, W_U, precision=self.precision) + b_U


class Transformer(nn.Module):
    """GPT-2 / GPT-Neo decoder: int tokens ``[batch, seq]`` -> logits ``[batch, seq, V]``.

    Attributes:
        config: the model's :class:`ModelConfig`.
        ln_weights: ``False`` for a tree with folded LayerNorms.
        return_activations: also return a dict of ``resid_pre``, ``resid_mid``,
            ``resid_post`` (``[L, batch, seq, d]``) and ``pattern`` (``[L, batch, H, q, k]``).
        param_dtype: dtype of parameters created by ``init``.
        precision: matmul precision (``None``: the backend default).
    """

    config: ModelConfig
    ln_weights: bool = True
    return_activations: bool = False
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, tokens: Array) -> Any:
        c, pd, prec = self.config, self.param_dtype, self.precision
        resid = _Embed(c.d_vocab, c.d_model, pd, name="embed")(tokens)
        resid = resid + _PosEmbed(c.n_ctx, c.d_model, pd, name="pos_embed")(tokens.shape[-1])
        windows = jnp.asarray(np.asarray(c.attn_windows, dtype=np.int32))
        scales = jnp.asarray(np.asarray(c.attn_scales), dtype=resid.dtype)
        blocks = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=0,
            length=c.n_layers,
        )(c, self.ln_weights, self.return_activations, pd, prec, name="blocks")
        resid, acts = blocks(resid, (windows, scales))
        x = LayerNorm(c.eps, self.ln_weights, pd, name="ln_final")(resid)
        logits = _Unembed(c.d_vocab, pd, prec, name="unembed")(x)
        return (logits, acts) if self.return_activations else logits


def _check_tokens(tokens: Any, config: ModelConfig) -> Array:
    if isinstance(tokens, (list, tuple)):
        tokens = np.asarray(tokens)
    if not hasattr(tokens, "dtype") or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(
            f"forward: tokens must be an integer array [batch, seq] or [seq], got "
            f"{getattr(tokens, 'dtype', type(tokens).__name__)}"
        )
    if tokens.ndim not in (1, 2):
        raise ValueError(
            f"forward: tokens must have shape [batch, seq] or [seq], got {tuple(tokens.shape)}"
        )
    if tokens.shape[-1] > config.n_ctx:
        raise ValueError(
            f"forward: tokens has shape {tuple(tokens.shape)} but the model has only "
            f"n_ctx={config.n_ctx} positions (wanted seq <= {config.n_ctx})"
        )
    if tokens.shape[-1] == 0:
        raise ValueError(f"forward: tokens has shape {tuple(tokens.shape)}, an empty sequence")
    if not isinstance(tokens, jax.core.Tracer):  # concrete ids can be range-checked here
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= config.d_vocab:
            raise ValueError(
                f"forward: token ids must lie in [0, {config.d_vocab}) (d_vocab), got ids "
                f"from {low} to {high}"
            )
    return jnp.asarray(tokens)


def forward(
    params: Params,
    tokens: Any,
    config: ModelConfig,
    *,
    return_activations: bool = False,
    precision: Any = None,
) -> Any:
    """Logits ``[batch, seq, V]`` (or ``[seq, V]`` for tokens ``[seq]``); jittable.

    Args:
        params: canonical parameter tree (LayerNorm weights present or folded).
        tokens: int tokens ``[batch, seq]`` or ``[seq]``, ``seq <= config.n_ctx``.
        config: static model config (pass it as a static argument to ``jax.jit``).
        return_activations: also return the activation dict (see :class:`Transformer`),
            whose ``batch`` axis is dropped for ``[seq]`` input.
        precision: matmul precision, e.g. ``jax.lax.Precision.HIGHEST`` on TPU.
    """
    tokens = _check_tokens(tokens, config)
    single = tokens.ndim == 1
    if single:
        tokens = tokens[None]
    module = Transformer(
        config,
        ln_weights=not is_layer_norm_folded(params),
        return_activations=return_activations,
        param_dtype=params["embed"]["W_E"].dtype,
        precision=precision,
    )
    out = module.apply({"params": params}, tokens)
    if not single:
        return out
    if return_activations:
        logits, acts = out
        return logits[0], jax.tree_util.tree_map(lambda a: a[:, 0], acts)
    return out[0]


def init_params(
    config: ModelConfig, rng: Array, *, dtype: Any = jnp.float32, ln_weights: bool = True
) -> Params:
    """Random parameters in the canonical layout (normal(0.02) weights, zero biases).

    Use under ``jax.eval_shape`` to get the tree's shapes without allocating it.
    """
    module = Transformer(config, ln_weights=ln_weights, param_dtype=dtype)
    variables = jax.jit(module.init)(rng, jnp.zeros((1, 1), dtype=jnp.int32))
    return dict(variables["params"])
