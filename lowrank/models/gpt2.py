"""GPT-2: the Hugging Face layout of its state dict, and the converter over it.

HF GPT-2 stores its projections as ``Conv1D`` weights ``[in, out]`` and fuses queries, keys
and values into one ``c_attn`` of shape ``[d_model, 3 * d_model]`` (columns ``[q | k | v]``,
each split into heads ``(head, d_head)``). Keys may carry a ``transformer.`` prefix
(``GPT2LMHeadModel``) or not (``GPT2Model``, the original hub files); ``lm_head.weight`` is
absent when the embeddings are tied; the causal-mask buffers ``attn.bias`` and
``attn.masked_bias`` are ignored. GPT-2 has no unembedding bias (the tree gets zero ``b_U``).
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
    o_from_conv1d,
    qkv_from_conv1d,
    state_dict_shapes,
    transpose,
)

__all__ = [
    "GPT2_LAYOUT",
    "convert_gpt2_state_dict",
    "gpt2_state_dict_shapes",
    "gpt2_style_rows",
]

_QKV = ("blocks.attn.W_Q", "blocks.attn.W_K", "blocks.attn.W_V")
_QKV_BIAS = ("blocks.attn.b_Q", "blocks.attn.b_K", "blocks.attn.b_V")


def gpt2_style_rows(attention: tuple[Tensor, ...], *, linear: bool) -> tuple[Tensor, ...]:
    """GPT-2's rows with ``attention`` as the attention rows; GPT-Neo shares all but those.

    Args:
        attention: the rows of ``h.{i}.attn...``, between ``ln_1`` and ``ln_2``.
        linear: MLP weights stored as ``nn.Linear`` ``[out, in]`` (GPT-Neo), not ``Conv1D``
            ``[in, out]`` (GPT-2).
    """

    def mlp(name: str, d_in: str, d_out: str, leaf: str) -> Tensor:
        if linear:
            return Tensor(f"h.{{i}}.mlp.{name}.weight", (d_out, d_in), leaf, transpose)
        return Tensor(f"h.{{i}}.mlp.{name}.weight", (d_in, d_out), leaf)

    return (
        Tensor("wte.weight", ("d_vocab", "d_model"), "embed.W_E"),
        Tensor("wpe.weight", ("n_ctx", "d_model"), "pos_embed.W_pos"),
        Tensor("h.{i}.ln_1.weight", ("d_model",), "blocks.ln1.w"),
        Tensor("h.{i}.ln_1.bias", ("d_model",), "blocks.ln1.b"),
        *attention,
        Tensor("h.{i}.ln_2.weight", ("d_model",), "blocks.ln2.w"),
        Tensor("h.{i}.ln_2.bias", ("d_model",), "blocks.ln2.b"),
        mlp("c_fc", "d_model", "d_mlp", "blocks.mlp.W_in"),
        Tensor("h.{i}.mlp.c_fc.bias", ("d_mlp",), "blocks.mlp.b_in"),
        mlp("c_proj", "d_mlp", "d_model", "blocks.mlp.W_out"),
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
    )


GPT2_LAYOUT = Layout(
    name="GPT-2",
    family="gpt2",
    prefixes=("transformer.",),
    ignored=r"h\.\d+\.attn\.(bias|masked_bias)",
    tensors=gpt2_style_rows(
        (
            Tensor(
                "h.{i}.attn.c_attn.weight",
                ("d_model", "3*n_heads*d_head"),
                _QKV,
                qkv_from_conv1d,
                split=Split(axis=1),
            ),
            Tensor(
                "h.{i}.attn.c_attn.bias",
                ("3*n_heads*d_head",),
                _QKV_BIAS,
                bias_per_head,
                split=Split(axis=0),
            ),
            Tensor(
                "h.{i}.attn.c_proj.weight",
                ("n_heads*d_head", "d_model"),
                "blocks.attn.W_O",
                o_from_conv1d,
            ),
            Tensor("h.{i}.attn.c_proj.bias", ("d_model",), "blocks.attn.b_O"),
        ),
        linear=False,
    ),
    zeros={"unembed.b_U": ("d_vocab",)},
)


def gpt2_state_dict_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF key (without ``transformer.``) -> shape, for every required GPT-2 tensor."""
    return state_dict_shapes(GPT2_LAYOUT, config)


def convert_gpt2_state_dict(
    state_dict: Mapping[str, Any], config: ModelConfig, *, dtype: Any = None
) -> Params:
    """Convert a GPT-2 state dict (arrays) into the canonical tree.

    See :func:`lowrank.models.conversion.convert`; ``config`` must be a GPT-2 config.
    """
    return convert(GPT2_LAYOUT, state_dict, config, dtype=dtype)
