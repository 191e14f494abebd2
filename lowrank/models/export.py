"""Canonical parameter tree -> Hugging Face GPT-2 checkpoint (the inverse of ``gpt2.py``).

:func:`gpt2_state_dict` lays an *unprocessed* canonical tree out as a ``GPT2LMHeadModel``
state dict: ``transformer.``-prefixed keys, ``Conv1D`` weights ``[in, out]``, queries, keys
and values fused into ``c_attn`` (columns ``[q | k | v]``, each ``(head, d_head)``), and
``lm_head.weight`` only when the embeddings are untied. :func:`save_pretrained` writes it as
``model.safetensors`` beside a ``config.json`` that ``transformers.AutoConfig`` reads, so the
directory loads both in :func:`lowrank.models.load_pretrained` and in
``transformers.GPT2LMHeadModel.from_pretrained``.

Round trip: ``convert_gpt2_state_dict(gpt2_state_dict(p, c), c) == p`` exactly, for every
unprocessed tree ``p`` whose ``b_U`` is zero (GPT-2 has no unembedding bias) and, when
``c.tie_word_embeddings``, whose ``W_U`` equals ``W_E.T``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from lowrank.models._common import LN_PATHS, Params, lookup
from lowrank.models.config import ModelConfig
from lowrank.models.gpt2 import gpt2_state_dict_shapes

__all__ = ["gpt2_config_dict", "gpt2_state_dict", "save_pretrained"]

_PREFIX = "transformer."
_GPT2_EOS = 50256  # GPT2Config's default bos_token_id / eos_token_id


def _leaf(params: Params, path: str) -> np.ndarray:
    node = lookup(params, path)
    if node is None:
        if path.startswith(LN_PATHS):
            raise ValueError(
                f"gpt2_state_dict: params has no {path!r}: the tree has folded LayerNorms. "
                "GPT-2 checkpoints hold LayerNorm weights, so export an unprocessed tree "
                "(load_pretrained(..., fold_ln=False, center_writing_weights=False, "
                "center_unembed=False, fold_value_biases=False))"
            )
        raise ValueError(f"gpt2_state_dict: params has no {path!r}")
    arr = np.asarray(node)
    if not np.issubdtype(arr.dtype, np.floating) and arr.dtype != jnp.bfloat16:
        raise TypeError(f"gpt2_state_dict: {path!r} must be a float array, got {arr.dtype}")
    if arr.dtype not in (np.float16, np.float32, np.float64):  # bfloat16 and other ml_dtypes
        arr = arr.astype(np.float32)
    return arr


def _check_shape(path: str, arr: np.ndarray, want: tuple[int, ...]) -> None:
    if arr.shape != want:
        raise ValueError(f"gpt2_state_dict: {path!r} has shape {arr.shape}, expected {want}")


def gpt2_state_dict(params: Params, config: ModelConfig) -> dict[str, np.ndarray]:
    """Hugging Face ``GPT2LMHeadModel`` state dict (NumPy) of an unprocessed canonical tree.

    Args:
        params: canonical tree with LayerNorm weights (see :mod:`lowrank.models`); NumPy or
            jax arrays. bfloat16 leaves are written as float32.
        config: its :class:`ModelConfig` (family ``"gpt2"``). ``tie_word_embeddings`` decides
            whether ``lm_head.weight`` is written.

    Returns:
        ``{"transformer.wte.weight": [d_vocab, d_model], ..., "lm_head.weight": ...}``, every
        array its own C-contiguous copy.

    Raises:
        ValueError: a processed (folded) tree, a wrong shape, a non-zero ``b_U``, or tied
            embeddings with ``W_U != W_E.T``.
    """
    if config.family != "gpt2":
        raise ValueError(f"gpt2_state_dict: config is for {config.architecture}, not GPT-2")
    L, H, d, dh = config.n_layers, config.n_heads, config.d_model, config.d_head
    m, V = config.d_mlp, config.d_vocab

    def leaf(path: str, shape: tuple[int, ...]) -> np.ndarray:
        arr = _leaf(params, path)
        _check_shape(path, arr, shape)
        return arr

    W_E = leaf("embed.W_E", (V, d))
    W_pos = leaf("pos_embed.W_pos", (config.n_ctx, d))
    ln1_w, ln1_b = leaf("blocks.ln1.w", (L, d)), leaf("blocks.ln1.b", (L, d))
    ln2_w, ln2_b = leaf("blocks.ln2.w", (L, d)), leaf("blocks.ln2.b", (L, d))
    W_QKV = [leaf(f"blocks.attn.W_{n}", (L, H, d, dh)) for n in "QKV"]
    b_QKV = [leaf(f"blocks.attn.b_{n}", (L, H, dh)) for n in "QKV"]
    W_O, b_O = leaf("blocks.attn.W_O", (L, H, dh, d)), leaf("blocks.attn.b_O", (L, d))
    W_in, b_in = leaf("blocks.mlp.W_in", (L, d, m)), leaf("blocks.mlp.b_in", (L, m))
    W_out, b_out = leaf("blocks.mlp.W_out", (L, m, d)), leaf("blocks.mlp.b_out", (L, d))
    lnf_w, lnf_b = leaf("ln_final.w", (d,)), leaf("ln_final.b", (d,))
    W_U, b_U = leaf("unembed.W_U", (d, V)), leaf("unembed.b_U", (V,))
    if np.any(b_U != 0):
        raise ValueError(
            "gpt2_state_dict: unembed.b_U is non-zero, but GPT-2's lm_head has no bias "
            "(a processed tree? export the unprocessed one)"
        )
    if config.tie_word_embeddings and not np.array_equal(W_U, W_E.T):
        raise ValueError(
            "gpt2_state_dict: config.tie_word_embeddings is True but unembed.W_U is not "
            "embed.W_E.T; use a config with tie_word_embeddings=False to write lm_head.weight"
        )

    def c(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x).copy()

    sd: dict[str, np.ndarray] = {"wte.weight": c(W_E), "wpe.weight": c(W_pos)}
    for layer in range(L):
        p = f"h.{layer}."
        # [H, d, dh] -> [d, H * dh] per projection, then [q | k | v] along the columns.
        c_attn_w = np.concatenate(
            [w[layer].transpose(1, 0, 2).reshape(d, H * dh) for w in W_QKV], axis=1
        )
        c_attn_b = np.concatenate([b[layer].reshape(H * dh) for b in b_QKV])
        sd.update(
            {
                p + "ln_1.weight": c(ln1_w[layer]),
                p + "ln_1.bias": c(ln1_b[layer]),
                p + "attn.c_attn.weight": c(c_attn_w),
                p + "attn.c_attn.bias": c(c_attn_b),
                p + "attn.c_proj.weight": c(W_O[layer].reshape(H * dh, d)),
                p + "attn.c_proj.bias": c(b_O[layer]),
                p + "ln_2.weight": c(ln2_w[layer]),
                p + "ln_2.bias": c(ln2_b[layer]),
                p + "mlp.c_fc.weight": c(W_in[layer]),
                p + "mlp.c_fc.bias": c(b_in[layer]),
                p + "mlp.c_proj.weight": c(W_out[layer]),
                p + "mlp.c_proj.bias": c(b_out[layer]),
            }
        )
    sd["ln_f.weight"] = c(lnf_w)
    sd["ln_f.bias"] = c(lnf_b)
    shapes = gpt2_state_dict_shapes(config)
    assert set(sd) == set(shapes) and all(sd[k].shape == shapes[k] for k in sd)
    out = {_PREFIX + k: v for k, v in sd.items()}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = c(W_U.T)
    return out


def gpt2_config_dict(config: ModelConfig, **extra: Any) -> dict[str, Any]:
    """The ``config.json`` dict of a ``GPT2LMHeadModel`` with ``config``'s sizes.

    Args:
        config: a GPT-2 :class:`ModelConfig` (``n_heads * d_head == d_model``, as GPT-2 needs).
        extra: further ``GPT2Config`` fields (``bos_token_id``, ``eos_token_id``, ...).
            GPT-2's default BOS/EOS id 50256 is dropped (``None``) when it lies outside a
            smaller vocabulary; dropout defaults to 0 (lowrank's forward pass has none).
    """
    from transformers import GPT2Config

    if config.family != "gpt2":
        raise ValueError(f"gpt2_config_dict: config is for {config.architecture}, not GPT-2")
    if config.n_heads * config.d_head != config.d_model:
        raise ValueError(
            f"gpt2_config_dict: GPT-2 needs n_heads * d_head == d_model, got "
            f"{config.n_heads} * {config.d_head} != {config.d_model}"
        )
    for name in ("bos_token_id", "eos_token_id"):
        if name not in extra and _GPT2_EOS >= config.d_vocab:
            extra[name] = None
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        extra.setdefault(name, 0.0)  # lowrank's forward pass has no dropout
    hf = GPT2Config(
        vocab_size=config.d_vocab,
        n_positions=config.n_ctx,
        n_embd=config.d_model,
        n_layer=config.n_layers,
        n_head=config.n_heads,
        n_inner=None if config.d_mlp == 4 * config.d_model else config.d_mlp,
        activation_function=config.act_fn,
        layer_norm_epsilon=config.eps,
        scale_attn_weights=config.use_attn_scale,
        scale_attn_by_inverse_layer_idx=config.scale_attn_by_inverse_layer_idx,
        tie_word_embeddings=config.tie_word_embeddings,
        architectures=["GPT2LMHeadModel"],
        **extra,
    )
    return dict(hf.to_dict())


def save_pretrained(
    params: Params,
    config: ModelConfig,
    directory: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (and the tokenizer) to ``directory``.

    The result loads with :func:`lowrank.models.load_pretrained` and with
    ``transformers.GPT2LMHeadModel.from_pretrained``.

    Args:
        params: unprocessed canonical tree (see :func:`gpt2_state_dict`).
        config: its GPT-2 :class:`ModelConfig`.
        directory: created if missing; existing files of the same names are replaced.
        tokenizer: a ``transformers`` tokenizer saved with its ``save_pretrained``; its BOS,
            EOS and PAD ids go into ``config.json``.

    Returns:
        The directory as a :class:`~pathlib.Path`.
    """
    import json

    from safetensors.numpy import save_file

    state_dict = gpt2_state_dict(params, config)
    extra: dict[str, Any] = {}
    if tokenizer is not None:
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, name, None)
            if value is not None:
                extra[name] = int(value)
    config_dict = gpt2_config_dict(config, **extra)
    out = Path(directory).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config_dict, indent=2, sort_keys=True) + "\n"
    (out / "config.json").write_text(text, encoding="utf-8")
    save_file(state_dict, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
