"""Llama, Mistral and Qwen2: the Hugging Face layout of their state dict, and the converter.

The three share one layout: ``nn.Linear`` weights ``[out, in]`` under ``model.``;
separate ``q_proj``, ``k_proj``, ``v_proj`` with ``num_key_value_heads`` key/value heads
(stored grouped in the tree: ``W_K``, ``W_V`` ``[L, n_kv_heads, d_model, d_head]``,
``b_K``, ``b_V`` ``[L, n_kv_heads, d_head]``); RMSNorm weights without biases
(``ln1.w``, ``ln2.w``, ``ln_final.w``); a gated MLP whose ``gate_proj``, ``up_proj`` and
``down_proj`` become TransformerLens's ``W_gate``, ``W_in`` and ``W_out``. What differs is
which biases exist, read from the config: Qwen2 has query/key/value biases, Llama has
query/key/value and output biases with ``attention_bias``, Mistral has none; the tree holds
zeros for every bias a checkpoint does not (and for ``b_in``, ``b_out``, ``b_U``).
``lm_head.weight`` is absent when the embeddings are tied; older checkpoints' rotary
``inv_freq`` buffers are ignored. No ``W_pos``: positions are rotary.
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
    qkv_from_linear,
    state_dict_shapes,
    transpose,
)

__all__ = ["LLAMA_LAYOUT", "convert_llama_state_dict", "llama_state_dict_shapes"]

_ATTN = "layers.{i}.self_attn."
_HEADS = {"Q": "n_heads*d_head", "K": "n_kv_heads*d_head", "V": "n_kv_heads*d_head"}


def _projection(x: str) -> tuple[Tensor, Tensor]:
    """The weight and (``attn_qkv_bias``) bias rows of one of q/k/v."""
    name, width = f"{_ATTN}{x.lower()}_proj", _HEADS[x]
    return (
        Tensor(f"{name}.weight", (width, "d_model"), f"blocks.attn.W_{x}", qkv_from_linear),
        Tensor(f"{name}.bias", (width,), f"blocks.attn.b_{x}", bias_per_head, when="attn_qkv_bias"),
    )


LLAMA_LAYOUT = Layout(
    name="Llama",
    family="llama",
    prefixes=("model.",),
    ignored=r"(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",
    tensors=(
        Tensor("embed_tokens.weight", ("d_vocab", "d_model"), "embed.W_E"),
        Tensor("layers.{i}.input_layernorm.weight", ("d_model",), "blocks.ln1.w"),
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
        Tensor("layers.{i}.post_attention_layernorm.weight", ("d_model",), "blocks.ln2.w"),
        Tensor(
            "layers.{i}.mlp.gate_proj.weight", ("d_mlp", "d_model"), "blocks.mlp.W_gate", transpose
        ),
        Tensor("layers.{i}.mlp.up_proj.weight", ("d_mlp", "d_model"), "blocks.mlp.W_in", transpose),
        Tensor(
            "layers.{i}.mlp.down_proj.weight", ("d_model", "d_mlp"), "blocks.mlp.W_out", transpose
        ),
        Tensor("norm.weight", ("d_model",), "ln_final.w"),
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
