"""Model loading, TransformerLens-style weight processing and a JAX forward pass.

Reads GPT-2, GPT-Neo, GPT-NeoX (Pythia), Llama, Mistral, Qwen2, Gemma and Gemma-2
checkpoints into one canonical parameter tree (nested dicts, layer-stacked, TransformerLens
names)::

    embed.W_E          [d_vocab, d_model]
    pos_embed.W_pos    [n_ctx, d_model]       (learned positions only; not rotary models)
    blocks.ln1.w, .b   [L, d_model]           (absent once folded; RMSNorm: no .b)
    blocks.attn.W_Q    [L, H, d_model, d_head]
    blocks.attn.W_K, W_V  [L, H_kv, d_model, d_head]   (H_kv = n_kv_heads, grouped)
    blocks.attn.b_Q    [L, H, d_head]         blocks.attn.b_K, b_V  [L, H_kv, d_head]
    blocks.attn.W_O    [L, H, d_head, d_model]
    blocks.attn.b_O    [L, d_model]
    blocks.ln2.w, .b   [L, d_model]           (absent once folded; RMSNorm: no .b)
    blocks.mlp.W_gate  [L, d_model, d_mlp]    (gated MLPs only)
    blocks.mlp.W_in    [L, d_model, d_mlp]    blocks.mlp.b_in  [L, d_mlp]
    blocks.mlp.W_out   [L, d_mlp, d_model]    blocks.mlp.b_out [L, d_model]
    ln_final.w, .b     [d_model]              (absent once folded; RMSNorm: no .b)
    unembed.W_U        [d_model, d_vocab]     unembed.b_U      [d_vocab]
    blocks.ln1_post.w, blocks.ln2_post.w  [L, d_model]  (Gemma-2's post-norms; never folded)

Biases a checkpoint does not store are zeros. Gemma's ``W_E`` is its embedding times
``sqrt(d_model)`` and its norm weights are ``1 + w``, what its forward pass applies.

Example::

    model = load_pretrained()                 # the embedded 2-layer model, offline
    model = load_pretrained("gpt2")           # folded + centred, like TransformerLens
    logits = model(model.to_tokens("Hello"))  # [1, seq, d_vocab]
    copying = model.OV.eigenvalues            # [12, 12, 64]
"""

from lowrank.models._common import CheckpointError, Params
from lowrank.models.checkpoint import StateDict, open_state_dict
from lowrank.models.config import ModelConfig, RopeScaling, config_from_hf
from lowrank.models.export import gpt2_config_dict, gpt2_state_dict, save_pretrained
from lowrank.models.gpt2 import convert_gpt2_state_dict, gpt2_state_dict_shapes
from lowrank.models.gpt_neo import convert_gpt_neo_state_dict, gpt_neo_state_dict_shapes
from lowrank.models.gpt_neox import convert_gpt_neox_state_dict, gpt_neox_state_dict_shapes
from lowrank.models.hub import (
    EMBEDDED_MODEL,
    EMBEDDED_MODELS,
    available_locally,
    embedded_model_path,
    resolve_checkpoint,
)
from lowrank.models.llama import (
    convert_gemma_state_dict,
    convert_llama_state_dict,
    gemma_state_dict_shapes,
    llama_state_dict_shapes,
)
from lowrank.models.loading import (
    convert_state_dict,
    load_pretrained,
    load_tokenizer,
    place_params,
    processing_steps,
    read_config,
)
from lowrank.models.model import TransformerModel
from lowrank.models.processing import (
    center_unembed,
    center_writing_weights,
    fold_layer_norm,
    fold_value_biases,
    is_layer_norm_folded,
    is_rms_norm,
    process_params,
    refactor_factored_attn_matrices,
)
from lowrank.models.transformer import Transformer, forward, init_params

__all__ = [
    "EMBEDDED_MODEL",
    "EMBEDDED_MODELS",
    "CheckpointError",
    "ModelConfig",
    "Params",
    "RopeScaling",
    "StateDict",
    "Transformer",
    "TransformerModel",
    "available_locally",
    "center_unembed",
    "center_writing_weights",
    "config_from_hf",
    "convert_gemma_state_dict",
    "convert_gpt2_state_dict",
    "convert_gpt_neo_state_dict",
    "convert_gpt_neox_state_dict",
    "convert_llama_state_dict",
    "convert_state_dict",
    "embedded_model_path",
    "fold_layer_norm",
    "fold_value_biases",
    "forward",
    "gemma_state_dict_shapes",
    "gpt2_config_dict",
    "gpt2_state_dict",
    "gpt2_state_dict_shapes",
    "gpt_neo_state_dict_shapes",
    "gpt_neox_state_dict_shapes",
    "init_params",
    "is_layer_norm_folded",
    "is_rms_norm",
    "llama_state_dict_shapes",
    "load_pretrained",
    "load_tokenizer",
    "open_state_dict",
    "place_params",
    "process_params",
    "processing_steps",
    "read_config",
    "refactor_factored_attn_matrices",
    "resolve_checkpoint",
    "save_pretrained",
]
