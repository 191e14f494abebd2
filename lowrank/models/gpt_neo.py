"""GPT-Neo: the Hugging Face layout of its state dict, and the converter over it.

HF GPT-Neo uses ``nn.Linear`` weights ``[out, in]``; its query, key and value projections
have no biases (the tree gets zero ``b_Q``, ``b_K``, ``b_V``) and the unembedding has no
bias (zero ``b_U``). Keys may carry a ``transformer.`` prefix; ``lm_head.weight`` is absent
when the embeddings are tied; the mask buffers ``attn.attention.bias`` and
``attn.attention.masked_bias`` are ignored.
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
    o_from_linear,
    qkv_from_linear,
    state_dict_shapes,
    transpose,
)

__all__ = ["GPT_NEO_LAYOUT", "convert_gpt_neo_state_dict", "gpt_neo_state_dict_shapes"]

_ATTN = "h.{i}.attn.attention."
_PER_HEAD_BIAS = ("n_layers", "n_heads", "d_head")

GPT_NEO_LAYOUT = Layout(
    name="GPT-Neo",
    family="gpt_neo",
    prefixes=("transformer.",),
    ignored=r"h\.\d+\.attn\.attention\.(bias|masked_bias)",
    tensors=(
        Tensor("wte.weight", ("d_vocab", "d_model"), "embed.W_E"),
        Tensor("wpe.weight", ("n_ctx", "d_model"), "pos_embed.W_pos"),
        Tensor("h.{i}.ln_1.weight", ("d_model",), "blocks.ln1.w"),
        Tensor("h.{i}.ln_1.bias", ("d_model",), "blocks.ln1.b"),
        Tensor(
            _ATTN + "q_proj.weight",
            ("n_heads*d_head", "d_model"),
            "blocks.attn.W_Q",
            qkv_from_linear,
        ),
        Tensor(
            _ATTN + "k_proj.weight",
            ("n_heads*d_head", "d_model"),
            "blocks.attn.W_K",
            qkv_from_linear,
        ),
        Tensor(
            _ATTN + "v_proj.weight",
            ("n_heads*d_head", "d_model"),
            "blocks.attn.W_V",
            qkv_from_linear,
        ),
        Tensor(
            _ATTN + "out_proj.weight",
            ("d_model", "n_heads*d_head"),
            "blocks.attn.W_O",
            o_from_linear,
        ),
        Tensor(_ATTN + "out_proj.bias", ("d_model",), "blocks.attn.b_O"),
        Tensor("h.{i}.ln_2.weight", ("d_model",), "blocks.ln2.w"),
        Tensor("h.{i}.ln_2.bias", ("d_model",), "blocks.ln2.b"),
        Tensor("h.{i}.mlp.c_fc.weight", ("d_mlp", "d_model"), "blocks.mlp.W_in", transpose),
        Tensor("h.{i}.mlp.c_fc.bias", ("d_mlp",), "blocks.mlp.b_in"),
        Tensor("h.{i}.mlp.c_proj.weight", ("d_model", "d_mlp"), "blocks.mlp.W_out", transpose),
        Tensor("h.{i}.mlp.c_proj.bias", ("d_model",), "blocks.mlp.b_out"),
        Tensor("ln_f.weight", ("d_model",), "ln_final.w"),
        Tensor("ln_f.bias", ("d_model",), "ln_final.b"),
        Tensor(
            "lm_head.weight",
            ("d_vocab", "d_model"),
            "unembed.W_U",
            transpose,
            if_missing="wte.weight",
        ),
    ),
    zeros={
        "blocks.attn.b_Q": _PER_HEAD_BIAS,
        "blocks.attn.b_K": _PER_HEAD_BIAS,
        "blocks.attn.b_V": _PER_HEAD_BIAS,
        "unembed.b_U": ("d_vocab",),
    },
)


def gpt_neo_state_dict_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF key (without ``transformer.``) -> shape, for every required GPT-Neo tensor."""
    return state_dict_shapes(GPT_NEO_LAYOUT, config)


def convert_gpt_neo_state_dict(
    state_dict: Mapping[str, Any], config: ModelConfig, *, dtype: Any = None
) -> Params:
    """Convert a GPT-Neo state dict (arrays) into the canonical tree.

    See :func:`lowrank.models.conversion.convert`; ``config`` must be a GPT-Neo config.
    """
    return convert(GPT_NEO_LAYOUT, state_dict, config, dtype=dtype)
