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
from lowrank.models.gpt2 import gpt2_style_rows
from lowrank.models.layout import (
    Layout,
    Tensor,
    o_from_linear,
    qkv_from_linear,
    state_dict_shapes,
)

__all__ = ["GPT_NEO_LAYOUT", "convert_gpt_neo_state_dict", "gpt_neo_state_dict_shapes"]

_ATTN = "h.{i}.attn.attention."
_PER_HEAD_BIAS = ("n_layers", "n_heads", "d_head")


def _projection(name: str, leaf: str) -> Tensor:
    rows = "d_model" if name == "out_proj" else "n_heads*d_head"
    cols = "n_heads*d_head" if name == "out_proj" else "d_model"
    transform = o_from_linear if name == "out_proj" else qkv_from_linear
    return Tensor(f"{_ATTN}{name}.weight", (rows, cols), leaf, transform)


GPT_NEO_LAYOUT = Layout(
    name="GPT-Neo",
    family="gpt_neo",
    prefixes=("transformer.",),
    ignored=r"h\.\d+\.attn\.attention\.(bias|masked_bias)",
    tensors=gpt2_style_rows(
        (
            _projection("q_proj", "blocks.attn.W_Q"),
            _projection("k_proj", "blocks.attn.W_K"),
            _projection("v_proj", "blocks.attn.W_V"),
            _projection("out_proj", "blocks.attn.W_O"),
            Tensor(_ATTN + "out_proj.bias", ("d_model",), "blocks.attn.b_O"),
        ),
        linear=True,
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
