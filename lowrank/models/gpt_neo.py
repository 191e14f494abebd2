"""GPT-Neo: Hugging Face state dict -> canonical layer-stacked parameter tree.

HF GPT-Neo uses ``nn.Linear`` weights ``[out, in]``; its query, key and value projections
have no biases (the tree gets zero ``b_Q``, ``b_K``, ``b_V``) and the unembedding has no
bias (zero ``b_U``). Keys may carry a ``transformer.`` prefix; ``lm_head.weight`` is absent
when the embeddings are tied; the mask buffers ``attn.attention.bias`` and
``attn.attention.masked_bias`` are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from lowrank.models._common import Params, StateDictReader, stack_layers, transpose, zeros
from lowrank.models.config import ModelConfig

__all__ = ["convert_gpt_neo_state_dict", "gpt_neo_state_dict_shapes"]

_IGNORED = re.compile(r"h\.\d+\.attn\.attention\.(bias|masked_bias)")


def gpt_neo_state_dict_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF key (without ``transformer.``) -> shape, for every required GPT-Neo tensor."""
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
                p + "attn.attention.q_proj.weight": (hd, d),
                p + "attn.attention.k_proj.weight": (hd, d),
                p + "attn.attention.v_proj.weight": (hd, d),
                p + "attn.attention.out_proj.weight": (d, hd),
                p + "attn.attention.out_proj.bias": (d,),
                p + "ln_2.weight": (d,),
                p + "ln_2.bias": (d,),
                p + "mlp.c_fc.weight": (m, d),
                p + "mlp.c_fc.bias": (m,),
                p + "mlp.c_proj.weight": (d, m),
                p + "mlp.c_proj.bias": (d,),
            }
        )
    shapes["ln_f.weight"] = (d,)
    shapes["ln_f.bias"] = (d,)
    return shapes


def convert_gpt_neo_state_dict(
    state_dict: Mapping[str, Any], config: ModelConfig, *, dtype: Any = None
) -> Params:
    """Convert a GPT-Neo state dict (arrays) into the canonical tree.

    Args:
        state_dict: HF keys -> NumPy (or jax / abstract) arrays, read one key at a time.
        config: the model's :class:`ModelConfig` (family ``"gpt_neo"``).
        dtype: cast every tensor to this dtype (``None`` keeps the stored dtype).

    Raises:
        CheckpointError: an unexpected, missing or mis-shaped key.
    """
    if config.family != "gpt_neo":
        raise ValueError(
            f"convert_gpt_neo_state_dict: config is for {config.architecture}, not GPT-Neo"
        )
    L, H, d, dh = config.n_layers, config.n_heads, config.d_model, config.d_head
    ck = StateDictReader(
        state_dict,
        expected=gpt_neo_state_dict_shapes(config),
        optional={"lm_head.weight": (config.d_vocab, d)},
        ignored=_IGNORED,
        family="GPT-Neo",
        dtype=dtype,
    )

    def get(layer: int, name: str) -> Any:
        return ck.get(f"h.{layer}.{name}")

    def qkv_weight(proj: str) -> Any:
        # [H * dh, d] (out, in) -> [H, d, dh]
        return stack_layers(
            L,
            lambda l: get(l, f"attn.attention.{proj}.weight").reshape(H, dh, d).transpose(0, 2, 1),
        )

    def per_layer(name: str) -> Any:
        return stack_layers(L, lambda l: get(l, name))

    def per_layer_t(name: str) -> Any:
        return stack_layers(L, lambda l: transpose(get(l, name)))

    W_E = ck.get("wte.weight")
    W_U = transpose(ck.get("lm_head.weight") if ck.has("lm_head.weight") else W_E)
    return {
        "embed": {"W_E": W_E},
        "pos_embed": {"W_pos": ck.get("wpe.weight")},
        "blocks": {
            "ln1": {"w": per_layer("ln_1.weight"), "b": per_layer("ln_1.bias")},
            "attn": {
                "W_Q": qkv_weight("q_proj"),
                "W_K": qkv_weight("k_proj"),
                "W_V": qkv_weight("v_proj"),
                "b_Q": zeros((L, H, dh), like=W_E),
                "b_K": zeros((L, H, dh), like=W_E),
                "b_V": zeros((L, H, dh), like=W_E),
                # [d, H * dh] (out, in) -> [H, dh, d]
                "W_O": stack_layers(
                    L,
                    lambda l: transpose(get(l, "attn.attention.out_proj.weight")).reshape(H, dh, d),
                ),
                "b_O": per_layer("attn.attention.out_proj.bias"),
            },
            "ln2": {"w": per_layer("ln_2.weight"), "b": per_layer("ln_2.bias")},
            "mlp": {
                "W_in": per_layer_t("mlp.c_fc.weight"),
                "b_in": per_layer("mlp.c_fc.bias"),
                "W_out": per_layer_t("mlp.c_proj.weight"),
                "b_out": per_layer("mlp.c_proj.bias"),
            },
        },
        "ln_final": {"w": ck.get("ln_f.weight"), "b": ck.get("ln_f.bias")},
        "unembed": {"W_U": W_U, "b_U": zeros((config.d_vocab,), like=W_E)},
    }
