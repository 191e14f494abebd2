"""Llama, Mistral, Qwen2, Gemma and Gemma-2: the Hugging Face layout, and the converters.

The five share one layout: ``nn.Linear`` weights ``[out, in]`` under ``model.``;
separate ``q_proj``, ``k_proj``, ``v_proj`` with ``num_key_value_heads`` key/value heads
(stored grouped in the tree: ``W_K``, ``W_V`` ``[L, n_kv_heads, d_model, d_head]``,
``b_K``, ``b_V`` ``[L, n_kv_heads, d_head]``); RMSNorm weights without biases
(``ln1.w``, ``ln2.w``, ``ln_final.w``); a gated MLP whose ``gate_proj``, ``up_proj`` and
``down_proj`` become TransformerLens's ``W_gate``, ``W_in`` and ``W_out``. What differs is
which biases exist, read from the config: Qwen2 has query/key/value biases, Llama and Gemma
have query/key/value and output biases with ``attention_bias``, Mistral has none; the tree
holds zeros for every bias a checkpoint does not (and for ``b_in``, ``b_out``, ``b_U``).
``lm_head.weight`` is absent when the embeddings are tied; older checkpoints' rotary
``inv_freq`` buffers are ignored. No ``W_pos``: positions are rotary.

Gemma's tables (:data:`GEMMA_LAYOUT`, :data:`GEMMA2_LAYOUT`) store what the forward pass
applies, as TransformerLens's ``convert_gemma_weights`` does: ``W_E`` is the embedding times
``sqrt(d_model)`` (a tied ``W_U`` is the unscaled one) and each norm weight is ``1 + w``
(Gemma's RMSNorm scales by ``1 + w``), so the forward pass is the plain one. Gemma-2 has four
norms a layer: ``input_layernorm`` (``ln1``), ``post_attention_layernorm`` (``ln1_post``, on
the attention output), ``pre_feedforward_layernorm`` (``ln2``) and
``post_feedforward_layernorm`` (``ln2_post``); in Gemma, ``post_attention_layernorm`` is
``ln2``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lowrank.models._common import Params
from lowrank.models.config import ModelConfig
from lowrank.models.conversion import convert
from lowrank.models.layout import (
    Layout,
    Tensor,
    bias_per_head,
    o_from_linear,
    plus_one,
    qkv_from_linear,
    scaled_embedding,
    state_dict_shapes,
    transpose,
)

__all__ = [
    "GEMMA2_LAYOUT",
    "GEMMA_LAYOUT",
    "LLAMA_LAYOUT",
    "convert_gemma_state_dict",
    "convert_llama_state_dict",
    "gemma_state_dict_shapes",
    "llama_state_dict_shapes",
]

_ATTN = "layers.{i}.self_attn."
_HEADS = {"Q": "n_heads*d_head", "K": "n_kv_heads*d_head", "V": "n_kv_heads*d_head"}
_NORM_ROWS = {  # HF norm key -> its leaf: Llama/Gemma, Gemma-2
    False: {"input_layernorm": "ln1", "post_attention_layernorm": "ln2"},
    True: {
        "input_layernorm": "ln1",
        "post_attention_layernorm": "ln1_post",
        "pre_feedforward_layernorm": "ln2",
        "post_feedforward_layernorm": "ln2_post",
    },
}


def _projection(x: str) -> tuple[Tensor, Tensor]:
    """The weight and (``attn_qkv_bias``) bias rows of one of q/k/v."""
    name, width = f"{_ATTN}{x.lower()}_proj", _HEADS[x]
    return (
        Tensor(f"{name}.weight", (width, "d_model"), f"blocks.attn.W_{x}", qkv_from_linear),
        Tensor(f"{name}.bias", (width,), f"blocks.attn.b_{x}", bias_per_head, when="attn_qkv_bias"),
    )


def _layout(name: str, family: str, *, gemma: bool = False, post_norms: bool = False) -> Layout:
    """The Llama table, with Gemma's effective weights (``gemma``) and Gemma-2's norms.

    ``post_norms``: four norms a layer (:data:`_NORM_ROWS`), the post-norms after what they
    normalise.
    """
    embed, norm = (scaled_embedding, plus_one) if gemma else (None, None)
    norms = [
        Tensor(f"layers.{{i}}.{key}.weight", ("d_model",), f"blocks.{leaf}.w", norm)
        for key, leaf in _NORM_ROWS[post_norms].items()
    ]
    return Layout(
        name=name,
        family=family,
        prefixes=("model.",),
        ignored=r"(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",
        tensors=(
            Tensor("embed_tokens.weight", ("d_vocab", "d_model"), "embed.W_E", embed),
            norms[0],
            *_projection("Q"),
            *_projection("K"),
            *_projection("V"),
            Tensor(
                _ATTN + "o_proj.weight",
                ("d_model", "n_heads*d_head"),
                "blocks.attn.W_O",
                o_from_linear,
            ),
            Tensor(_ATTN + "o_proj.bias", ("d_model",), "blocks.attn.b_O", when="attn_out_bias"),
            *norms[1:],
            Tensor(
                "layers.{i}.mlp.gate_proj.weight",
                ("d_mlp", "d_model"),
                "blocks.mlp.W_gate",
                transpose,
            ),
            Tensor(
                "layers.{i}.mlp.up_proj.weight", ("d_mlp", "d_model"), "blocks.mlp.W_in", transpose
            ),
            Tensor(
                "layers.{i}.mlp.down_proj.weight",
                ("d_model", "d_mlp"),
                "blocks.mlp.W_out",
                transpose,
            ),
            Tensor("norm.weight", ("d_model",), "ln_final.w", norm),
            Tensor(
                "lm_head.weight",
                ("d_vocab", "d_model"),
                "unembed.W_U",
                transpose,
                if_missing="embed_tokens.weight",
            ),
        ),
        zeros={
            "blocks.mlp.b_in": ("n_layers", "d_mlp"),
            "blocks.mlp.b_out": ("n_layers", "d_model"),
            "unembed.b_U": ("d_vocab",),
        },
    )


LLAMA_LAYOUT = _layout("Llama", "llama")
GEMMA_LAYOUT = _layout("Gemma", "gemma", gemma=True)
GEMMA2_LAYOUT = _layout("Gemma-2", "gemma2", gemma=True, post_norms=True)
_GEMMA_LAYOUTS = {layout.family: layout for layout in (GEMMA_LAYOUT, GEMMA2_LAYOUT)}


def llama_state_dict_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF key (without ``model.``) -> shape, for every required Llama/Mistral/Qwen2 tensor."""
    return state_dict_shapes(LLAMA_LAYOUT, config)


def convert_llama_state_dict(
    state_dict: Mapping[str, Any], config: ModelConfig, *, dtype: Any = None
) -> Params:
    """Convert a Llama, Mistral or Qwen2 state dict (arrays) into the canonical tree.

    See :func:`lowrank.models.conversion.convert`; ``config`` must be of the ``"llama"``
    family.
    """
    return convert(LLAMA_LAYOUT, state_dict, config, dtype=dtype)


def gemma_state_dict_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF key (without ``model.``) -> shape, for every required Gemma or Gemma-2 tensor."""
    return state_dict_shapes(_gemma_layout(config), config)


def convert_gemma_state_dict(
    state_dict: Mapping[str, Any], config: ModelConfig, *, dtype: Any = None
) -> Params:
    """Convert a Gemma or Gemma-2 state dict (arrays) into the canonical tree.

    ``W_E`` is scaled by ``sqrt(d_model)`` and the norm weights ``w`` become ``1 + w`` (see
    the module docstring); otherwise as :func:`lowrank.models.conversion.convert`.
    """
    return convert(_gemma_layout(config), state_dict, config, dtype=dtype)


def _gemma_layout(config: ModelConfig) -> Layout:
    """Gemma-2's table for a Gemma-2 config, Gemma's otherwise (which refuses other families)."""
    return _GEMMA_LAYOUTS.get(config.family, GEMMA_LAYOUT)
