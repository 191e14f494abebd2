"""GPT-2: Hugging Face state dict -> canonical layer-stacked parameter tree.

HF GPT-2 stores its projections as ``Conv1D`` weights ``[in, out]`` and fuses queries, keys
and values into one ``c_attn`` of shape ``[d_model, 3 * d_model]`` (columns ``[q | k | v]``,
each split into heads ``(head, d_head)``). Keys may carry a ``transformer.`` prefix
(``GPT2LMHeadModel``) or not (``GPT2Model``, the original hub files); ``lm_head.weight`` is
absent when the embeddings are tied; the causal-mask buffers ``attn.bias`` and
``attn.masked_bias`` are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from lowrank.models._common import Params, StateDictReader, stack_layers, transpose, zeros
from lowrank.models.config import ModelConfig

__all__ = ["convert_gpt2_state_dict", "gpt2_state_dict_shapes"]

_IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


def gpt2_state_dict_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF key (without ``transformer.``) -> shape, for every required GPT-2 tensor."""
    d, m, hd = config.d_model, config.d_mlp, config.n_heads * config.d_head
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (config.d_vocab, d),
        "wpe.weight": (config.n_ctx, d),
    }
    for layer in range(config.n_layers):
        p = f"h.{layer}."
        shapes.update(
            {
                p + "ln_1.weight": (d,),
                p + "ln_1.bias": (d,),
                p + "attn.c_attn.weight": (d, 3 * hd),
                p + "attn.c_attn.bias": (3 * hd,),
                p + "attn.c_proj.weight": (hd, d),
                p + "attn.c_proj.bias": (d,),
                p + "ln_2.weight": (d,),
                p + "ln_2.bias": (d,),
                p + "mlp.c_fc.weight": (d, m),
                p + "mlp.c_fc.bias": (m,),
                p + "mlp.c_proj.weight": (m, d),
                p + "mlp.c_proj.bias": (d,),
            }
        )
    shapes["ln_f.weight"] = (d,)
    shapes["ln_f.bias"] = (d,)
    return shapes


def convert_gpt2_state_dict(
    state_dict: Mapping[str, Any], config: ModelConfig, *, dtype: Any = None
) -> Params:
    """Convert a GPT-2 state dict (arrays) into the canonical tree.

    Args:
        state_dict: HF keys -> NumPy (or jax / abstract) arrays; read one key at a time, so a
            lazy mapping over a memory-mapped file works.
        config: the model's :class:`ModelConfig` (family ``"gpt2"``).
        dtype: cast every tensor to this dtype (``None`` keeps the stored dtype).

    Returns:
        The canonical tree (see :mod:`lowrank.models`), NumPy arrays for NumPy input.

    Raises:
        CheckpointError: an unexpected, missing or mis-shaped key.
    """
    if config.family != "gpt2":
        raise ValueError(f"convert_gpt2_state_dict: config is for {config.architecture}, not GPT-2")
    L, H, d, dh = config.n_layers, config.n_heads, config.d_model, config.d_head
    hd = H * dh
    ck = StateDictReader(
        state_dict,
        expected=gpt2_state_dict_shapes(config),
        optional={"lm_head.weight": (config.d_vocab, d)},
        ignored=_IGNORED,
        family="GPT-2",
        dtype=dtype,
    )

    def get(layer: int, name: str) -> Any:
        return ck.get(f"h.{layer}.{name}")

    def qkv_weight(i: int) -> Any:
        def layer(l: int) -> Any:
            w = get(l, "attn.c_attn.weight")[:, i * hd : (i + 1) * hd]
            return w.reshape(d, H, dh).transpose(1, 0, 2)

        return stack_layers(L, layer)

    def qkv_bias(i: int) -> Any:
        return stack_layers(
            L, lambda l: get(l, "attn.c_attn.bias")[i * hd : (i + 1) * hd].reshape(H, dh)
        )

    def per_layer(name: str) -> Any:
        return stack_layers(L, lambda l: get(l, name))

    W_E = ck.get("wte.weight")
    W_U = transpose(ck.get("lm_head.weight") if ck.has("lm_head.weight") else W_E)
    return {
        "embed": {"W_E": W_E},
        "pos_embed": {"W_pos": ck.get("wpe.weight")},
        "blocks": {
            "ln1": {"w": per_layer("ln_1.weight"), "b": per_layer("ln_1.bias")},
            "attn": {
                "W_Q": qkv_weight(0),
                "W_K": qkv_weight(1),
                "W_V": qkv_weight(2),
                "b_Q": qkv_bias(0),
                "b_K": qkv_bias(1),
                "b_V": qkv_bias(2),
                "W_O": stack_layers(L, lambda l: get(l, "attn.c_proj.weight").reshape(H, dh, d)),
                "b_O": per_layer("attn.c_proj.bias"),
            },
            "ln2": {"w": per_layer("ln_2.weight"), "b": per_layer("ln_2.bias")},
            "mlp": {
                "W_in": per_layer("mlp.c_fc.weight"),
                "b_in": per_layer("mlp.c_fc.bias"),
                "W_out": per_layer("mlp.c_proj.weight"),
                "b_out": per_layer("mlp.c_proj.bias"),
            },
        },
        "ln_final": {"w": ck.get("ln_f.weight"), "b": ck.get("ln_f.bias")},
        "unembed": {"W_U": W_U, "b_U": zeros((config.d_vocab,), like=W_E)},
    }
