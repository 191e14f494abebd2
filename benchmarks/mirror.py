"""The TransformerLens twin of a lowrank model: a mirrored config and the same weights.

:func:`hooked_transformer` builds a ``HookedTransformer`` whose config mirrors a lowrank
:class:`~lowrank.models.ModelConfig` (LayerNorm or RMSNorm, folded or not; learned or rotary
positions, partial rotary, ``llama3`` and ``linear`` frequency scaling; grouped key/value heads;
gated MLPs; parallel blocks; local windows; Gemma-2's post-norms, score divisor and soft-caps)
and loads the lowrank tree's arrays with ``load_state_dict``, without any weight processing,
so that both libraries run on identical weights. A model TransformerLens cannot run as lowrank
does raises :class:`Unmirrorable`.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.helpers import flatten, hooked_config, unstack_layers

if TYPE_CHECKING:
    from benchmarks.shapes import Weights
    from lowrank.models import ModelConfig

#: ``ModelConfig`` fields that TransformerLens's config has under the same names.
_TL_FIELDS = (
    "d_model",
    "d_head",
    "n_heads",
    "d_mlp",
    "n_layers",
    "n_ctx",
    "d_vocab",
    "eps",
    "use_attn_scale",
    "scale_attn_by_inverse_layer_idx",
    "gated_mlp",
    "parallel_attn_mlp",
)
#: lowrank activation names that TransformerLens spells differently (the same function).
_TL_ACTIVATIONS = {"swish": "silu"}
#: Buffers of a ``HookedTransformer`` that are not weights (absent from lowrank's tree).
_TL_BUFFERS = (".mask", ".IGNORE", ".rotary_sin", ".rotary_cos")
#: Grouped key/value leaves: TransformerLens 3.9 stores them as ``_W_K`` ... ``[n_kv, ...]``.
_GROUPED = ("attn.W_K", "attn.W_V", "attn.b_K", "attn.b_V")


class Unmirrorable(ValueError):
    """A model that TransformerLens's ``HookedTransformer`` cannot run as lowrank does."""


def _unmirrorable(config: ModelConfig, why: str) -> Unmirrorable:
    return Unmirrorable(f"TransformerLens cannot mirror this {config.architecture} model: {why}")


def _activation(config: ModelConfig) -> str:
    """TransformerLens's name of the MLP activation."""
    from transformer_lens.utilities.activation_functions import SUPPORTED_ACTIVATIONS

    name = _TL_ACTIVATIONS.get(config.act_fn, config.act_fn)
    if name not in SUPPORTED_ACTIVATIONS:
        raise _unmirrorable(config, f"it has no activation {config.act_fn!r}")
    return name


def _rotary_fields(config: ModelConfig) -> dict[str, Any]:
    """Rotary options: NeoX-style halves, the rotated width, base and frequency scaling."""
    if config.positional != "rotary":
        return {}
    fields: dict[str, Any] = dict(
        positional_embedding_type="rotary",
        rotary_dim=config.rotary_dim,
        rotary_base=config.rotary_base,
        rotary_adjacent_pairs=False,
    )
    scaling = config.rope_scaling
    if scaling is None:
        return fields
    if scaling.rope_type == "llama3":
        return fields | dict(
            use_NTK_by_parts_rope=True,
            NTK_original_ctx_len=scaling.original_max_position_embeddings,
            NTK_by_parts_low_freq_factor=scaling.low_freq_factor,
            NTK_by_parts_high_freq_factor=scaling.high_freq_factor,
            NTK_by_parts_factor=scaling.factor,
        )
    if config.attn_types and "local" in config.attn_types:
        raise _unmirrorable(
            config, "it applies linear rotary scaling to global layers only, lowrank to all"
        )
    return fields | dict(rotary_scaling_factor=scaling.factor)


def _attention_fields(config: ModelConfig) -> dict[str, Any]:
    """Grouped heads, local windows, the score divisor and Gemma-2's soft-caps."""
    fields: dict[str, Any] = {}
    if config.n_kv_heads != config.n_heads:
        fields["n_key_value_heads"] = config.n_kv_heads
    local = config.attn_types is not None and "local" in config.attn_types
    fields["use_local_attn"] = local
    if local:
        fields.update(attn_types=list(config.attn_types or ()), window_size=config.window_size)
    if config.attn_scale is not None:
        fields.update(use_attn_scale=True, attn_scale=config.attn_scale)
    if config.attn_softcap is not None:
        fields["attn_scores_soft_cap"] = config.attn_softcap
    if config.final_softcap is not None:
        fields["output_logits_soft_cap"] = config.final_softcap
    return fields


def tl_config(config: ModelConfig, *, ln_folded: bool, device: str) -> Any:
    """A ``HookedTransformerConfig`` that runs the forward pass of ``config`` as lowrank does.

    Raises:
        Unmirrorable: a feature of ``config`` that TransformerLens does not implement.
    """
    fields: dict[str, Any] = {name: getattr(config, name) for name in _TL_FIELDS}
    fields.update(_attention_fields(config))
    fields.update(_rotary_fields(config))
    fields.update(
        act_fn=_activation(config),
        normalization_type=config.normalization + ("Pre" if ln_folded else ""),
        final_rms=config.normalization == "RMS",
        use_normalization_before_and_after=config.post_norms,
        original_architecture=config.architecture,
        init_weights=False,
    )
    return hooked_config(fields, device)


def tl_state_dict(params: dict[str, Any], config: ModelConfig) -> dict[str, np.ndarray]:
    """The canonical tree unstacked per layer (``blocks.{l}.attn.W_Q``), TL's names.

    Grouped key/value weights ``[n_kv, ...]`` go to TransformerLens's ``_W_K``, ``_W_V``,
    ``_b_K``, ``_b_V``.
    """
    state = unstack_layers(flatten(params), config.n_layers)
    if config.n_kv_heads == config.n_heads:
        return state
    renamed = {}
    for key, value in state.items():
        if key.endswith(_GROUPED):
            head, _, leaf = key.rpartition(".")
            key = f"{head}._{leaf}"
        renamed[key] = value
    return renamed


def hooked_transformer(weights: Weights, device: str) -> Any:
    """A ``HookedTransformer`` holding a copy of ``weights`` (no weight processing).

    Raises:
        Unmirrorable: see :func:`tl_config`.
        RuntimeError: the tree's keys are not the ``HookedTransformer``'s parameters.
    """
    import torch
    from transformer_lens import HookedTransformer

    ln_folded = "ln1" not in weights.params["blocks"]
    cfg = tl_config(weights.config, ln_folded=ln_folded, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg)
    state = tl_state_dict(weights.params, weights.config)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith(_TL_BUFFERS)]
    if missing or unexpected:
        raise RuntimeError(f"TL state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval()
