"""Flax linen forward pass over the canonical parameter tree.

The linen module's parameters *are* the canonical tree: ``Transformer(config).apply(
{"params": params}, tokens)`` with ``params`` as produced by the converters and processing
functions. The layers run in one ``nn.scan`` over the stacked layer axis; per-layer
attention settings (local / sliding windows, GPT-2's inverse-layer scaling) are scanned
arrays, so every layer shares one compiled body.

Every family difference is an option of :class:`~lowrank.models.config.ModelConfig`:
LayerNorm or RMSNorm (``normalization``), learned or rotary positions (``positional``,
with partial rotation, HF's ``rotate_half`` pairing ``(i, i + rotary_dim / 2)``, and
``linear`` / ``llama3`` frequency scaling), grouped-query attention (``n_kv_heads``: each
key/value head is broadcast over its group of query heads inside the attention, never
repeated), gated MLPs, parallel attention and MLP, Gemma-2's post-norms (``post_norms``),
attention scale (``attn_scale``) and soft-caps (``attn_softcap``, ``final_softcap``).

A tree without ``blocks.ln1``/``blocks.ln2``/``ln_final`` (folded norms, see
:mod:`lowrank.models.processing`) makes the norms normalise without scale or shift.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lowrank._util import compute_dtype
from lowrank.models._common import Params
from lowrank.models.config import ModelConfig
from lowrank.models.processing import is_layer_norm_folded

__all__ = ["ACTIVATION_FNS", "Transformer", "forward", "init_params", "rotary_frequencies"]

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


def _affine_params(
    module: nn.Module, suffix: str, shape: tuple[int, int], dtype: Any
) -> tuple[Array, Array]:
    """``W_{suffix} [d_in, d_out]`` and ``b_{suffix} [d_out]`` of ``module``, in that order."""
    W = module.param(f"W_{suffix}", _w_init, shape, dtype)
    return W, module.param(f"b_{suffix}", nn.initializers.zeros, shape[-1:], dtype)


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last axis, without parameters once folded.

    ``kind``: ``"LN"`` (LayerNorm, weight ``w`` and bias ``b``) or ``"RMS"`` (RMSNorm,
    weight ``w``); ``with_params=False`` normalises without scale or shift.
    """

    kind: str
    eps: float
    with_params: bool = True
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Normalise ``x [..., d]`` (statistics in float32 or wider), then scale and shift."""
        dtype = x.dtype
        x = x.astype(compute_dtype(dtype))
        if self.kind == "LN":
            x = x - x.mean(axis=-1, keepdims=True)
        ms = (x * x).mean(axis=-1, keepdims=True) + self.eps
        x = (x / jnp.sqrt(ms) if self.kind == "LN" else x * jax.lax.rsqrt(ms)).astype(dtype)
        if not self.with_params:
            return x
        d = x.shape[-1]
        x = x * self.param("w", nn.initializers.ones, (d,), self.param_dtype)
        if self.kind == "LN":
            x = x + self.param("b", nn.initializers.zeros, (d,), self.param_dtype)
        return x


def _softcap(x: Array, cap: float | None) -> Array:
    """``cap * tanh(x / cap)`` (Gemma-2's soft-capping); ``x`` itself for ``cap=None``."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def rotary_frequencies(config: ModelConfig) -> np.ndarray:
    """The RoPE inverse frequencies ``[rotary_dim / 2]`` (float64), scaled as configured.

    ``base ** (-2i / rotary_dim)``, then ``linear`` divides all of them by the factor and
    ``llama3`` divides those of wavelength above ``original / low_freq_factor``, keeps those
    below ``original / high_freq_factor`` and interpolates in between (as transformers).
    """
    dim = int(config.rotary_dim or config.d_head)
    inv = 1.0 / config.rotary_base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    s = config.rope_scaling
    if s is None:
        return inv
    if s.rope_type == "linear":
        return inv / s.factor
    wavelen = 2 * np.pi / inv
    old = s.original_max_position_embeddings
    scaled = np.where(wavelen > old / s.low_freq_factor, inv / s.factor, inv)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    medium = (wavelen >= old / s.high_freq_factor) & (wavelen <= old / s.low_freq_factor)
    return np.where(medium, (1 - smooth) * scaled / s.factor + smooth * scaled, scaled)


def rotary_angles(config: ModelConfig, positions: Any, dtype: Any = jnp.float32) -> Array:
    """RoPE angles ``[*positions.shape, rotary_dim]``: ``position x frequency``.

    Each frequency appears twice: for feature ``i`` and its ``rotate_half`` partner
    ``i + rotary_dim / 2``.
    """
    inv = jnp.asarray(rotary_frequencies(config), dtype=dtype)
    angles = jnp.asarray(positions).astype(dtype)[..., None] * inv
    return jnp.concatenate([angles, angles], axis=-1)


def _rotary_tables(config: ModelConfig, seq: int) -> tuple[Array, Array]:
    """``cos, sin [seq, rotary_dim]`` (float32) for positions ``0 .. seq - 1``."""
    angles = rotary_angles(config, jnp.arange(seq))
    return jnp.cos(angles), jnp.sin(angles)


def rotate(x: Array, cos: Array, sin: Array) -> Array:
    """RoPE on the first ``rotary_dim = cos.shape[-1]`` features of ``x``; the rest pass through.

    HF's ``rotate_half`` convention: feature ``i`` pairs with ``i + rotary_dim / 2``. ``cos`` and
    ``sin`` (of :func:`rotary_angles`) broadcast against ``x[..., :rotary_dim]``; so may ``x``
    against them (the result has the broadcast shape).
    """
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half = jnp.concatenate([-rot[..., r // 2 :], rot[..., : r // 2]], axis=-1)
    rotated = rot * cos.astype(x.dtype) + half * sin.astype(x.dtype)
    rest = jnp.broadcast_to(rest, (*rotated.shape[:-1], rest.shape[-1]))
    return jnp.concatenate([rotated, rest], axis=-1)


def _rotate(x: Array, cos: Array, sin: Array) -> Array:
    """:func:`rotate` of ``x [batch, seq, heads, d_head]`` by tables ``[seq, rotary_dim]``."""
    return rotate(x, cos[:, None, :], sin[:, None, :])


class Attention(nn.Module):
    """Causal attention with a per-call window and score divisor, optional RoPE and GQA.

    Grouped-query heads: ``n_kv_heads`` key/value heads, each read by ``n_heads // n_kv_heads``
    consecutive query heads. ``softcap``: the scaled scores are soft-capped before the mask.
    """

    n_heads: int
    d_head: int
    param_dtype: Any = jnp.float32
    precision: Any = None
    n_kv_heads: int | None = None
    softcap: float | None = None

    @nn.compact
    def __call__(
        self, x: Array, window: Array, scale: Array, rope: tuple[Array, Array] | None = None
    ) -> tuple[Array, Array]:
        """``x: [batch, seq, d]`` -> output ``[batch, seq, d]``, pattern ``[batch, H, q, k]``."""
        H, dh, d, pd = self.n_heads, self.d_head, x.shape[-1], self.param_dtype
        K = self.n_kv_heads or H
        ein = functools.partial(jnp.einsum, precision=self.precision)
        q, k, v = (
            ein("bsd,hde->bshe", x, self.param(f"W_{n}", _w_init, (h, d, dh), pd))
            + self.param(f"b_{n}", nn.initializers.zeros, (h, dh), pd)
            for n, h in (("Q", H), ("K", K), ("V", K))
        )
        W_O = self.param("W_O", _w_init, (H, dh, d), pd)
        b_O = self.param("b_O", nn.initializers.zeros, (d,), pd)
        if rope is not None:
            q, k = _rotate(q, *rope), _rotate(k, *rope)
        batch, seq = x.shape[:-2], x.shape[-2]
        q = q.reshape(*batch, seq, K, H // K, dh)  # query head h = (h // group, h % group)
        scores = ein("bqkge,bske->bkgqs", q, k).reshape(*batch, H, seq, seq) / scale
        qpos = jnp.arange(seq, dtype=jnp.int32)[:, None]
        kpos = jnp.arange(seq, dtype=jnp.int32)[None, :]
        allowed = (kpos <= qpos) & (qpos - kpos < window)
        scores = _softcap(scores.astype(compute_dtype(scores.dtype)), self.softcap)
        scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
        pattern = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        grouped = pattern.reshape(*batch, K, H // K, seq, seq)
        z = ein("bkgqs,bske->bqkge", grouped, v).reshape(*batch, seq, H, dh)
        return ein("bqhe,hed->bqd", z, W_O) + b_O, pattern


class MLP(nn.Module):
    """``act(x W_in + b_in) W_out + b_out``, or gated as TransformerLens's ``GatedMLP``.

    Gated: ``(act(x W_gate) * (x W_in) + b_in) W_out + b_out``.
    """

    d_mlp: int
    act_fn: str
    param_dtype: Any = jnp.float32
    precision: Any = None
    gated: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d, m, pd = x.shape[-1], self.d_mlp, self.param_dtype
        W_in, b_in = _affine_params(self, "in", (d, m), pd)
        W_out, b_out = _affine_params(self, "out", (m, d), pd)
        act = ACTIVATION_FNS[self.act_fn]
        if self.gated:
            W_gate = self.param("W_gate", _w_init, (d, m), pd)
            gate = act(jnp.matmul(x, W_gate, precision=self.precision))
            post = gate * jnp.matmul(x, W_in, precision=self.precision) + b_in
        else:
            post = act(jnp.matmul(x, W_in, precision=self.precision) + b_in)
        return jnp.matmul(post, W_out, precision=self.precision) + b_out


class _Stack(nn.Module):
    """The options the whole model and each of its blocks are built with (see Transformer)."""

    config: ModelConfig
    ln_weights: bool = True
    return_activations: bool = False
    param_dtype: Any = jnp.float32
    precision: Any = None


class Block(_Stack):
    """One pre-norm transformer block, written as a scan body ``(resid, xs, rope) -> ...``.

    Sequential: ``mid = x + attn(ln1(x))``, ``out = mid + mlp(ln2(mid))``; parallel
    (``parallel_attn_mlp``): ``out = x + attn(ln1(x)) + mlp(ln2(x))``, and the
    ``resid_mid`` activation is ``x + attn(ln1(x))``. With ``post_norms`` (Gemma-2) the
    attention and MLP outputs pass through ``ln1_post`` and ``ln2_post``, which keep their
    weights when the others are folded.
    """

    @nn.compact
    def __call__(
        self, resid: Array, xs: tuple[Array, Array], rope: tuple[Array, Array] | None = None
    ) -> tuple[Array, Any]:
        c, pd, prec = self.config, self.param_dtype, self.precision
        window, scale = xs
        norm = functools.partial(Norm, c.normalization, c.eps, param_dtype=pd)
        ln1, ln2 = norm(self.ln_weights, name="ln1"), norm(self.ln_weights, name="ln2")
        attn = Attention(c.n_heads, c.d_head, pd, prec, c.n_kv_heads, c.attn_softcap, name="attn")
        attn_out, pattern = attn(ln1(resid), window, scale, rope)
        mlp = MLP(c.d_mlp, c.act_fn, pd, prec, c.gated_mlp, name="mlp")
        if c.post_norms:
            attn_out = norm(name="ln1_post")(attn_out)
        mid = resid + attn_out
        mlp_out = mlp(ln2(resid if c.parallel_attn_mlp else mid))
        if c.post_norms:
            mlp_out = norm(name="ln2_post")(mlp_out)
        post = mid + mlp_out
        if not self.return_activations:
            return post, None
        return post, {"resid_pre": resid, "resid_mid": mid, "resid_post": post, "pattern": pattern}


class _Lookup(nn.Module):
    """Rows of a ``[rows, d_model]`` table (``W_E`` by token, ``W_pos`` by position)."""

    param_name: str
    rows: int
    d_model: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, indices: Array) -> Array:
        table = self.param(self.param_name, _w_init, (self.rows, self.d_model), self.param_dtype)
        return jnp.take(table, indices, axis=0)


class _Unembed(nn.Module):
    d_vocab: int
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        W_U, b_U = _affine_params(self, "U", (x.shape[-1], self.d_vocab), self.param_dtype)
        return jnp.matmul(x, W_U, precision=self.precision) + b_U


class Transformer(_Stack):
    """Decoder-only transformer: int tokens ``[batch, seq]`` -> logits ``[batch, seq, V]``.

    Attributes:
        config: the model's :class:`ModelConfig`.
        ln_weights: ``False`` for a tree with folded LayerNorms.
        return_activations: also return a dict of ``resid_pre``, ``resid_mid``,
            ``resid_post`` (``[L, batch, seq, d]``) and ``pattern`` (``[L, batch, H, q, k]``).
        param_dtype: dtype of parameters created by ``init``.
        precision: matmul precision (``None``: the backend default).
    """

    @nn.compact
    def __call__(self, tokens: Array) -> Any:
        """Logits ``[..., seq, d_vocab]`` of ``tokens`` (and the activations when asked)."""
        c, pd, prec = self.config, self.param_dtype, self.precision
        seq = tokens.shape[-1]
        resid = _Lookup("W_E", c.d_vocab, c.d_model, pd, name="embed")(tokens)
        rope = None
        if c.positional == "rotary":
            rope = _rotary_tables(c, seq)
        else:
            pos_embed = _Lookup("W_pos", c.n_ctx, c.d_model, pd, name="pos_embed")
            resid = resid + pos_embed(jnp.arange(seq))
        windows = jnp.asarray(np.asarray(c.attn_windows, dtype=np.int32))
        scales = jnp.asarray(np.asarray(c.attn_scales), dtype=resid.dtype)
        blocks = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast),
            length=c.n_layers,
        )(c, self.ln_weights, self.return_activations, pd, prec, name="blocks")
        resid, acts = blocks(resid, (windows, scales), rope)
        x = Norm(c.normalization, c.eps, self.ln_weights, pd, name="ln_final")(resid)
        logits = _softcap(_Unembed(c.d_vocab, pd, prec, name="unembed")(x), c.final_softcap)
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
