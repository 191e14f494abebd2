"""GPT-NeoX (Pythia): the Hugging Face layout of its state dict, and the converter over it.

HF GPT-NeoX uses ``nn.Linear`` weights ``[out, in]`` under ``gpt_neox.`` and fuses queries,
keys and values into one ``query_key_value`` whose rows are interleaved head by head
(``(head, q/k/v, d_head)``). Biases exist with ``attention_bias`` (the default; zeros in the
tree otherwise). The unembedding is ``embed_out.weight`` in the published checkpoints and
``lm_head.weight`` in transformers >= 5 (both read; absent when tied), without a bias (zero
``b_U``). The mask and rotary buffers of older checkpoints (``attention.bias``,
``attention.masked_bias``, ``attention.rotary_emb.inv_freq``) are ignored. No ``W_pos``:
positions are rotary.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lowrank.models._common import Params
from lowrank.models.config import ModelConfig
from lowrank.models.conversion import convert
from lowrank.models.layout import (
    Layout,
    Split,
    Tensor,
    bias_per_head,
    o_from_linear,
    qkv_from_linear,
    state_dict_shapes,
    transpose,
)

__all__ = ["GPT_NEOX_LAYOUT", "convert_gpt_neox_state_dict", "gpt_neox_state_dict_shapes"]

_LAYER = "layers.{i}."
_QKV = ("blocks.attn.W_Q", "blocks.attn.W_K", "blocks.attn.W_V")
_QKV_BIAS = ("blocks.attn.b_Q", "blocks.attn.b_K", "blocks.attn.b_V")
_PER_HEAD = Split(axis=0, per_head=True)

GPT_NEOX_LAYOUT = Layout(
    name="GPT-NeoX",
    family="gpt_neox",
    prefixes=("gpt_neox.",),
    ignored=r"layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)",
    aliases={"embed_out.weight": "lm_head.weight"},
    tensors=(
        Tensor("embed_in.weight", ("d_vocab", "d_model"), "embed.W_E"),
        Tensor(_LAYER + "input_layernorm.weight", ("d_model",), "blocks.ln1.w"),
        Tensor(_LAYER + "input_layernorm.bias", ("d_model",), "blocks.ln1.b"),
        Tensor(_LAYER + "post_attention_layernorm.weight", ("d_model",), "blocks.ln2.w"),
        Tensor(_LAYER + "post_attention_layernorm.bias", ("d_model",), "blocks.ln2.b"),
        Tensor(
            _LAYER + "attention.query_key_value.weight",
            ("3*n_heads*d_head", "d_model"),
            _QKV,
            qkv_from_linear,
            split=_PER_HEAD,
        ),
        Tensor(
            _LAYER + "attention.query_key_value.bias",
            ("3*n_heads*d_head",),
            _QKV_BIAS,
            bias_per_head,
            split=_PER_HEAD,
            when="attn_qkv_bias",
        ),
        Tensor(
            _LAYER + "attention.dense.weight",
            ("d_model", "n_heads*d_head"),
            "blocks.attn.W_O",
            o_from_linear,
        ),
        Tensor(
            _LAYER + "attention.dense.bias", ("d_model",), "blocks.attn.b_O", when="attn_out_bias"
        ),
        Tensor(
            _LAYER + "mlp.dense_h_to_4h.weight", ("d_mlp", "d_model"), "blocks.mlp.W_in", transpose
        ),
        Tensor(_LAYER + "mlp.dense_h_to_4h.bias", ("d_mlp",), "blocks.mlp.b_in"),
        Tensor(
            _LAYER + "mlp.dense_4h_to_h.weight",
            ("d_model", "d_mlp"),
            "blocks.mlp.W_out",
            transpose,
        ),
        Tensor(_LAYER + "mlp.dense_4h_to_h.bias", ("d_model",), "blocks.mlp.b_out"),
        Tensor("final_layer_norm.weight", ("d_model",), "ln_final.w"),
        Tensor("final_layer_norm.bias", ("d_model",), "ln_final.b"),
        Tensor(
            "lm_head.weight",
            ("d_vocab", "d_model"),
            "unembed.W_U",
            transpose,
            if_missing="embed_in.weight",
        ),
    ),
    zeros={"unembed.b_U": ("d_vocab",)},
)


def gpt_neox_state_dict_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF key (without ``gpt_neox.``) -> shape, for every required GPT-NeoX tensor."""
    return state_dict_shapes(GPT_NEOX_LAYOUT, config)


def convert_gpt_neox_state_dict(
    state_dict: Mapping[str, Any], config: ModelConfig, *, dtype: Any = None
) -> Params:
    """Convert a GPT-NeoX state dict (arrays) into the canonical tree.

    See :func:`lowrank.models.conversion.convert`; ``config`` must be a GPT-NeoX config.
    """
    return convert(GPT_NEOX_LAYOUT, state_dict, config, dtype=dtype)
