"""Llama, Mistral, Qwen2, Gemma and Gemma-2 (one HF layout): HF parity, the grouped tree,
configs, errors.

The checkpoints (``conftest.build_llama``) have 3 layers, 4 query heads sharing 2 key/value
heads, llama3 rope scaling (Llama), a sliding window of 5 on every layer (Mistral) or of 4
on the last layer (Qwen2), q/k/v biases and tied embeddings (Qwen2), heads 16 wide with
tied embeddings (Gemma), and heads 16 wide with a window of 5 on the even layers, post-norms,
a score divisor sqrt(12) and soft-caps (Gemma-2).
"""

import itertools
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import log_softmax
from conftest import (
    NO_PROCESSING,
    ROTARY_FAMILY,
    TOKEN_SEQ,
    assert_default_processing,
    assert_matches_tl_conversion,
    flatten,
    hf_logits,
    hf_numpy_state_dict,
    tl_rotary_model,
    tl_tree,
)

from lowrank.models import (
    CheckpointError,
    ModelConfig,
    RopeScaling,
    config_from_hf,
    convert_gemma_state_dict,
    convert_llama_state_dict,
    convert_state_dict,
    forward,
    init_params,
    load_pretrained,
    process_params,
    processing_steps,
)
from lowrank.models.transformer import rotary_frequencies

L, H, KV, D, DH, M, V = 3, 4, 2, 32, 8, 48, 101

_forward = jax.jit(forward, static_argnames=("config", "return_activations"))

#: (variant, storage dtype, transformers overrides) of the parity checkpoints.
CASES = {
    "llama": ("llama", "float32", {}),
    "llama-bf16": ("llama", "bfloat16", {}),
    "llama-bias-tied": ("llama", "float32", dict(attention_bias=True, tie_word_embeddings=True)),
    "mistral": ("mistral", "float32", {}),
    "mistral-head_dim16": ("mistral", "float32", dict(head_dim=16)),
    "qwen2": ("qwen2", "float32", {}),
    "qwen2-bf16": ("qwen2", "bfloat16", {}),
    "gemma": ("gemma", "float32", {}),
    "gemma-bf16": ("gemma", "bfloat16", {}),
    "gemma2": ("gemma2", "float32", {}),
    "gemma2-bf16": ("gemma2", "bfloat16", {}),
}
GEMMA_DH = 16


@pytest.fixture(scope="module")
def ckpt(rotary_checkpoint):
    """Factory: a case name of :data:`CASES` -> its checkpoint."""
    return lambda case: rotary_checkpoint(CASES[case][0], CASES[case][1], **CASES[case][2])


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(ckpt, tokens, case):
    """Unprocessed float32 logits equal HF's to 1e-4 (bf16 storage: the stored weights)."""
    c = ckpt(case)
    model = load_pretrained(c.path, **NO_PROCESSING)
    ref = hf_logits(c, tokens)
    ours = np.asarray(model(tokens))
    assert ours.shape == ref.shape == (2, TOKEN_SEQ, V)
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_the_options_are_exercised(ckpt, tokens):
    """Each variant's feature changes the logits: without it the HF parity would fail."""
    for case, change in [
        ("llama", dict(rope_scaling=None)),
        ("mistral", dict(attn_types=None)),
        ("qwen2", dict(attn_types=None)),
        ("llama", dict(rotary_base=500.0)),
        ("gemma2", dict(attn_scale=None)),
        ("gemma2", dict(attn_softcap=None)),
        ("gemma2", dict(final_softcap=None)),
        ("gemma2", dict(post_norms=False)),
    ]:
        c = ckpt(case)
        model = load_pretrained(c.path, **NO_PROCESSING)
        config = ModelConfig(**{**model.config.__dict__, **change})
        ours = np.asarray(_forward(model.params, tokens, config=config))
        assert np.abs(ours - hf_logits(c, tokens)).max() > 1e-2, (case, change)


def test_configs(ckpt):
    llama, mistral, qwen2 = (config_from_hf(ckpt(c).path) for c in ("llama", "mistral", "qwen2"))
    for c in (llama, mistral, qwen2):
        assert (c.n_heads, c.n_kv_heads, c.group_size, c.d_head) == (H, KV, 2, DH)
        assert c.normalization == "RMS" and c.positional == "rotary" and c.rotary_dim == DH
        assert c.gated_mlp and not c.parallel_attn_mlp and c.act_fn == "silu"
    assert llama.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
    assert llama.attn_types == ("global",) * L and not llama.tie_word_embeddings
    assert mistral.attn_windows == (5, 5, 5) and mistral.rotary_base == 100.0
    assert qwen2.attn_types == ("global", "global", "local") and qwen2.window_size == 4
    assert (qwen2.attn_qkv_bias, qwen2.attn_out_bias) == (True, False)
    assert (llama.attn_qkv_bias, mistral.attn_out_bias) == (False, False)
    assert qwen2.tie_word_embeddings
    assert config_from_hf(ckpt("mistral-head_dim16").path).d_head == 16
    ignored = config_from_hf({"model_type": "llama", "num_hidden_layers": 2, "sliding_window": 4})
    assert ignored.attn_types == ("global", "global")  # HF Llama never slides


def test_gemma_configs(ckpt):
    gemma, gemma2 = (config_from_hf(ckpt(c).path) for c in ("gemma", "gemma2"))
    for c in (gemma, gemma2):
        assert (c.n_heads, c.n_kv_heads, c.d_head, c.rotary_dim, c.d_model) == (H, KV, 16, 16, D)
        assert c.normalization == "RMS" and c.gated_mlp and c.act_fn == "gelu_pytorch_tanh"
        assert not (c.attn_qkv_bias or c.attn_out_bias)
    assert gemma.attn_types == ("global",) * L and gemma.attn_scales == (4.0,) * L
    assert gemma.tie_word_embeddings and not gemma.post_norms
    assert (gemma.attn_softcap, gemma.final_softcap) == (None, None)
    assert gemma2.attn_windows == (5, 24, 5) and gemma2.post_norms
    assert gemma2.attn_scales == (np.sqrt(12.0),) * L
    assert (gemma2.attn_softcap, gemma2.final_softcap) == (2.0, 5.0)
    legacy = config_from_hf({"model_type": "gemma", "num_hidden_layers": 2, "hidden_act": "gelu"})
    assert legacy.act_fn == "gelu_pytorch_tanh"  # transformers reads Gemma's "gelu" as tanh
    uncapped = {"attn_logit_softcapping": None, "final_logit_softcapping": None}
    c = config_from_hf({"model_type": "gemma2", "num_hidden_layers": 2, **uncapped})
    assert (c.attn_softcap, c.final_softcap) == (None, None)


def canonical_llama_shapes(L, H, KV, d, dh, m, V, post_norms=False):
    """The documented grouped RMS tree, written out independently of lowrank's tables."""
    post = {"blocks.ln1_post.w": (L, d), "blocks.ln2_post.w": (L, d)} if post_norms else {}
    return {
        **post,
        "embed.W_E": (V, d),
        "blocks.ln1.w": (L, d),
        "blocks.attn.W_Q": (L, H, d, dh),
        "blocks.attn.W_K": (L, KV, d, dh),
        "blocks.attn.W_V": (L, KV, d, dh),
        "blocks.attn.W_O": (L, H, dh, d),
        "blocks.attn.b_Q": (L, H, dh),
        "blocks.attn.b_K": (L, KV, dh),
        "blocks.attn.b_V": (L, KV, dh),
        "blocks.attn.b_O": (L, d),
        "blocks.ln2.w": (L, d),
        "blocks.mlp.W_gate": (L, d, m),
        "blocks.mlp.W_in": (L, d, m),
        "blocks.mlp.b_in": (L, m),
        "blocks.mlp.W_out": (L, m, d),
        "blocks.mlp.b_out": (L, d),
        "ln_final.w": (d,),
        "unembed.W_U": (d, V),
        "unembed.b_U": (V,),
    }


@pytest.mark.parametrize("case", ["llama", "mistral", "qwen2"])
def test_tree_layout_by_hand(ckpt, case):
    c = ckpt(case)
    sd = hf_numpy_state_dict(c)
    tree = flatten(convert_llama_state_dict(sd, config_from_hf(c.path)))
    assert {k: v.shape for k, v in tree.items()} == canonical_llama_shapes(L, H, KV, D, DH, M, V)
    p = "model.layers.1."
    np.testing.assert_array_equal(
        tree["blocks.attn.W_K"][1, 1], sd[p + "self_attn.k_proj.weight"][8:16].T
    )
    np.testing.assert_array_equal(
        tree["blocks.attn.W_Q"][1, 3], sd[p + "self_attn.q_proj.weight"][24:].T
    )
    np.testing.assert_array_equal(
        tree["blocks.attn.W_O"][1, 2], sd[p + "self_attn.o_proj.weight"][:, 16:24].T
    )
    np.testing.assert_array_equal(tree["blocks.mlp.W_gate"][1], sd[p + "mlp.gate_proj.weight"].T)
    np.testing.assert_array_equal(tree["blocks.mlp.W_in"][1], sd[p + "mlp.up_proj.weight"].T)
    np.testing.assert_array_equal(tree["ln_final.w"], sd["model.norm.weight"])
    unstored = ["blocks.attn.b_O", "blocks.mlp.b_in", "blocks.mlp.b_out", "unembed.b_U"]
    if case == "qwen2":
        np.testing.assert_array_equal(
            tree["blocks.attn.b_V"][1, 1], sd[p + "self_attn.v_proj.bias"][8:]
        )
        np.testing.assert_array_equal(tree["unembed.W_U"], tree["embed.W_E"].T)  # tied
    else:
        unstored += ["blocks.attn.b_Q", "blocks.attn.b_K", "blocks.attn.b_V"]
        np.testing.assert_array_equal(tree["unembed.W_U"], sd["lm_head.weight"].T)
    for key in unstored:
        assert not tree[key].any(), key


@pytest.mark.parametrize("case", ["gemma", "gemma2"])
def test_gemma_tree_by_hand(ckpt, case):
    """Effective weights: W_E * sqrt(d_model) (a tied W_U unscaled), norm weights 1 + w; in
    Gemma-2, post_attention_layernorm is ln1_post and pre_feedforward_layernorm ln2.
    """
    c = ckpt(case)
    sd = hf_numpy_state_dict(c)
    tree = flatten(convert_gemma_state_dict(sd, config_from_hf(c.path)))
    want = canonical_llama_shapes(L, H, KV, D, GEMMA_DH, M, V, post_norms=case == "gemma2")
    assert {k: v.shape for k, v in tree.items()} == want
    embed, p = sd["model.embed_tokens.weight"], "model.layers.1."
    np.testing.assert_allclose(tree["embed.W_E"], embed * np.float32(np.sqrt(D)), rtol=1e-7)
    W_U = sd["lm_head.weight"] if case == "gemma2" else embed  # gemma: tied
    np.testing.assert_array_equal(tree["unembed.W_U"], W_U.T)
    np.testing.assert_array_equal(
        tree["blocks.attn.W_Q"][1, 3], sd[p + "self_attn.q_proj.weight"][48:].T
    )
    norms = {"ln1": "input_layernorm", "ln2": "post_attention_layernorm"}
    if case == "gemma2":
        norms.update(ln1_post="post_attention_layernorm", ln2="pre_feedforward_layernorm")
        norms.update(ln2_post="post_feedforward_layernorm")
    for leaf, key in norms.items():
        np.testing.assert_array_equal(tree[f"blocks.{leaf}.w"][1], 1 + sd[f"{p}{key}.weight"])
    np.testing.assert_array_equal(tree["ln_final.w"], 1 + sd["model.norm.weight"])


@pytest.mark.parametrize("case", ["llama", "mistral", "qwen2", "gemma", "gemma2"])
def test_matches_transformer_lens_conversion(ckpt, case):
    """Unprocessed trees equal TransformerLens's conversion exactly (Gemma: the embedding
    scaled by sqrt(d_model), norm weights 1 + w).
    """
    c = ckpt(case)
    convert = convert_gemma_state_dict if case.startswith("gemma") else convert_llama_state_dict
    ours = flatten(convert(hf_numpy_state_dict(c), config_from_hf(c.path)))
    assert_matches_tl_conversion(c, ours)


def test_activations_and_sliding_windows(ckpt, tokens):
    import torch

    for case, windows in [("mistral", (5, 5, 5)), ("qwen2", (24, 24, 4)), ("gemma2", (5, 24, 5))]:
        c = ckpt(case)
        model = load_pretrained(c.path, **NO_PROCESSING)
        logits, acts = jax.jit(lambda m, t: m(t, return_activations=True))(model, tokens)
        with torch.no_grad():
            out = c.hf_model(
                torch.as_tensor(tokens, dtype=torch.long),
                output_hidden_states=True,
                output_attentions=True,
            )
        assert acts["pattern"].shape == (L, 2, H, TOKEN_SEQ, TOKEN_SEQ)
        q, k = np.indices((TOKEN_SEQ, TOKEN_SEQ))
        for layer, window in enumerate(windows):
            pattern = np.asarray(acts["pattern"][layer])
            np.testing.assert_allclose(pattern, out.attentions[layer].numpy(), atol=1e-5)
            allowed = (k <= q) & (q - k < window)
            assert not pattern[..., ~allowed].any() and (pattern[..., allowed] > 0).all()
            ref = out.hidden_states[layer].numpy()
            np.testing.assert_allclose(acts["resid_pre"][layer], ref, atol=1e-4)
        np.testing.assert_allclose(acts["resid_post"][:-1], acts["resid_pre"][1:])
        np.testing.assert_allclose(logits, out.logits.numpy(), atol=1e-4)


@pytest.mark.parametrize("case", ["llama", "qwen2"])
def test_rotary_frequencies_match_transformers(ckpt, case):
    """llama3 (all three bands) and linear scaling, as transformers computes them."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = ckpt(case).hf_model.config
    rope_type = hf_config.rope_parameters["rope_type"]
    if case == "qwen2":  # linear scaling on the qwen2 config
        hf_config.rope_parameters = dict(hf_config.rope_parameters, rope_type="linear", factor=3.0)
        rope_type = "linear"
    config = config_from_hf(hf_config)
    assert config.rope_scaling is not None and config.rope_scaling.rope_type == rope_type
    ref, _ = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    np.testing.assert_allclose(rotary_frequencies(config), ref.numpy(), rtol=1e-6)


def test_grouped_views_and_circuits(ckpt):
    """W_K/W_V repeat the grouped leaves; OV/QK broadcast them without a copy."""
    model = load_pretrained(ckpt("qwen2").path, **NO_PROCESSING)
    W_K, W_V = (np.asarray(model.params["blocks"]["attn"][n]) for n in ("W_K", "W_V"))
    assert W_K.shape == W_V.shape == (L, KV, D, DH)
    assert model.W_K.shape == model.W_V.shape == (L, H, D, DH)
    assert model.b_K.shape == model.b_V.shape == (L, H, DH)
    for h in range(H):  # query head h reads key/value head h // 2
        np.testing.assert_array_equal(model.W_K[:, h], W_K[:, h // 2])
        np.testing.assert_array_equal(
            model.b_V[:, h], model.params["blocks"]["attn"]["b_V"][:, h // 2]
        )
    OV, QK = model.OV, model.QK
    assert OV.shape == QK.shape == (L, KV, 2, D, D)
    assert OV.A.shape == (L, KV, 1, D, DH) and OV.B.shape == (L, KV, 2, DH, D)
    assert QK.A.shape == (L, KV, 2, D, DH) and QK.B.shape == (L, KV, 1, DH, D)
    W_V_rep, W_Q, W_O = np.asarray(model.W_V), np.asarray(model.W_Q), np.asarray(model.W_O)
    W_K_rep = np.asarray(model.W_K)
    np.testing.assert_allclose(OV.AB.reshape(L, H, D, D), W_V_rep @ W_O, atol=1e-5)
    ref = W_Q @ np.swapaxes(W_K_rep, -1, -2)
    np.testing.assert_allclose(QK.AB.reshape(L, H, D, D), ref, atol=1e-5)
    core = np.asarray(jnp.matmul(OV.B, OV.A)).reshape(L, H, DH, DH)  # what eigvals reads
    np.testing.assert_allclose(core, W_O @ W_V_rep, atol=1e-5)
    assert model.W_gate.shape == (L, D, M)
    with pytest.raises(AttributeError, match="uses rotary position embeddings.*no learned W_pos"):
        model.W_pos  # noqa: B018
    assert not hasattr(model, "W_pos")


def test_bf16_storage_loads_as_bf16(ckpt, tokens):
    c = ckpt("llama-bf16")
    model = load_pretrained(c.path, dtype=jnp.bfloat16, **NO_PROCESSING)
    assert {v.dtype for v in flatten(model.params).values()} == {jnp.dtype(jnp.bfloat16)}
    out = np.asarray(model(tokens), np.float32)
    ref = hf_logits(c, tokens)
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_processing_defaults_and_refused_steps(ckpt, tokens):
    """TransformerLens's defaults for RMSNorm models: all but centring writing weights."""
    c = ckpt("qwen2")
    assert_default_processing(
        c,
        tokens,
        fold_ln=True,
        center_writing_weights=False,
        center_unembed=True,
        fold_value_biases=True,
    )
    message = r"refactor_factored_attn_matrices=True for Qwen2ForCausalLM: refactoring grouped"
    with pytest.raises(NotImplementedError, match=message):
        load_pretrained(c.path, refactor_factored_attn_matrices=True)
    message = "TransformerLens does not centre the writing weights of RMSNorm"
    with pytest.raises(ValueError, match=message):
        load_pretrained(c.path, center_writing_weights=True)
    unprocessed = load_pretrained(c.path, **NO_PROCESSING)
    with pytest.raises(ValueError, match="center_writing_weights=True for an RMSNorm tree"):
        process_params(unprocessed.params)


def test_softcapped_logits_are_not_centred(ckpt, tokens):
    """Soft-capping is not shift invariant: TransformerLens, and so lowrank, skips
    center_unembed for Gemma-2 by default and refuses it when asked.
    """
    c = ckpt("gemma2")
    assert not processing_steps(config_from_hf(c.path))["center_unembed"]
    message = "center_unembed=True for Gemma2ForCausalLM: TransformerLens does not centre"
    with pytest.raises(ValueError, match=message):
        load_pretrained(c.path, center_unembed=True)
    model = load_pretrained(c.path)
    assert model.ln_folded and set(model.params["blocks"]) >= {"ln1_post", "ln2_post"}
    ref = log_softmax(hf_logits(c, tokens))
    np.testing.assert_allclose(log_softmax(model(tokens)), ref, atol=1e-4)
    centred = process_params(
        load_pretrained(c.path, **NO_PROCESSING).params,
        center_writing_weights=False,
        center_unembed=True,
    )
    logits = _forward(centred, tokens, config=model.config)
    assert np.abs(log_softmax(logits) - ref).max() > 1e-3


#: (case, fold_ln, center_unembed, fold_value_biases): every combination TransformerLens
#: allows for RMSNorm models (it never centres their writing weights, nor the unembedding
#: of soft-capped Gemma-2), and Llama's attention biases (which TransformerLens's Llama
#: conversion drops) folded once.
PROCESSING = [
    (case, *flags)
    for case in ("llama", "mistral", "qwen2", "gemma", "gemma2")
    for flags in itertools.product([False, True], repeat=3)
    if not (case == "gemma2" and flags[1])
] + [("llama-bias-tied", True, False, True)]


@pytest.mark.parametrize("case, fold_ln, center_unembed, fold_value_biases", PROCESSING)
def test_processing_matches_transformer_lens(
    ckpt, tokens, case, fold_ln, center_unembed, fold_value_biases
):
    """The trees agree with TransformerLens's to 1e-5 (grouped K/V and biases folded as its
    ``_W_K``, ``_b_V``), and the log-probabilities equal HF's.
    """
    flags = dict(
        fold_ln=fold_ln, center_unembed=center_unembed, fold_value_biases=fold_value_biases
    )
    c = ckpt(case)
    ours = load_pretrained(c.path, center_writing_weights=False, **flags)
    assert ours.ln_folded == fold_ln
    logits = np.asarray(ours(tokens))
    np.testing.assert_allclose(log_softmax(logits), log_softmax(hf_logits(c, tokens)), atol=1e-4)
    if case == "llama-bias-tied":  # TransformerLens's Llama conversion drops attention biases
        return
    ref, got = (
        tl_tree(tl_rotary_model(c, center_writing_weights=False, **flags)),
        flatten(ours.params),
    )
    assert set(ref) == set(got)
    for key, value in got.items():
        np.testing.assert_allclose(value, ref[key], rtol=0, atol=1e-5, err_msg=key)


# ------------------------------------------------------------------- published configs
_GEMMA = {
    "architectures": ["GemmaForCausalLM"],
    "model_type": "gemma",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "head_dim": 256,
    "hidden_act": "gelu",
    "initializer_range": 0.02,
    "max_position_embeddings": 8192,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 256000,
}
_GEMMA_2 = {
    **_GEMMA,
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "attn_logit_softcapping": 50.0,
    "cache_implementation": "hybrid",
    "final_logit_softcapping": 30.0,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_size": 4096,
    "torch_dtype": "float32",
}
del _GEMMA_2["rope_scaling"]

#: Published config.json dicts of Gemma and Gemma-2 (written from the hub files), by name.
GEMMA_FAMILY: dict[str, dict] = {
    "gemma-2b": {
        **_GEMMA,
        "hidden_size": 2048,
        "intermediate_size": 16384,
        "num_attention_heads": 8,
        "num_hidden_layers": 18,
        "num_key_value_heads": 1,
    },
    "gemma-7b": {
        **_GEMMA,
        "hidden_size": 3072,
        "intermediate_size": 24576,
        "num_attention_heads": 16,
        "num_hidden_layers": 28,
        "num_key_value_heads": 16,
    },
    "gemma-2-2b": {
        **_GEMMA_2,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_attention_heads": 8,
        "num_hidden_layers": 26,
        "num_key_value_heads": 4,
    },
    "gemma-2-9b": {
        **_GEMMA_2,
        "hidden_size": 3584,
        "intermediate_size": 14336,
        "num_attention_heads": 16,
        "num_hidden_layers": 42,
        "num_key_value_heads": 8,
    },
    "gemma-2-27b": {
        **_GEMMA_2,
        "head_dim": 128,
        "hidden_size": 4608,
        "intermediate_size": 36864,
        "num_attention_heads": 32,
        "num_hidden_layers": 46,
        "num_key_value_heads": 16,
        "query_pre_attn_scalar": 144,
    },
}


def abstract_hf_llama(c: dict) -> dict[str, tuple[int, ...]]:
    """HF Llama-layout tensor shapes (nn.Linear [out, in]), by hand."""
    d, H, KV = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    dh, m, V = c.get("head_dim", d // H), c["intermediate_size"], c["vocab_size"]
    shapes = {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,)}
    if not c.get("tie_word_embeddings", c["model_type"].startswith("gemma")):
        shapes["lm_head.weight"] = (V, d)
    qwen2 = c["model_type"] == "qwen2"
    norms = ["input_layernorm", "post_attention_layernorm"]
    if c["model_type"] == "gemma2":
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({f"{p}{norm}.weight": (d,) for norm in norms})
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (H * dh, d),
                p + "self_attn.k_proj.weight": (KV * dh, d),
                p + "self_attn.v_proj.weight": (KV * dh, d),
                p + "self_attn.o_proj.weight": (d, H * dh),
                p + "mlp.gate_proj.weight": (m, d),
                p + "mlp.up_proj.weight": (m, d),
                p + "mlp.down_proj.weight": (d, m),
            }
        )
        if qwen2:
            shapes.update(
                {
                    p + "self_attn.q_proj.bias": (H * dh,),
                    p + "self_attn.k_proj.bias": (KV * dh,),
                    p + "self_attn.v_proj.bias": (KV * dh,),
                }
            )
    return shapes


PUBLISHED = {
    **{n: c for n, c in ROTARY_FAMILY.items() if c["model_type"] != "gpt_neox"},
    **GEMMA_FAMILY,
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_configs_abstract(name):
    """Real-size grouped trees, never materialised: converter and linen init agree."""
    hf = PUBLISHED[name]
    config = config_from_hf(hf)
    d, H, KV = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"]
    assert (config.n_layers, config.n_heads, config.n_kv_heads, config.d_model) == (
        hf["num_hidden_layers"], H, KV, d,
    )  # fmt: skip
    assert config.d_head == hf.get("head_dim", 64 if "0.5B" in name else 128)
    assert config.rotary_base == hf["rope_theta"] and config.n_ctx == hf["max_position_embeddings"]
    if name.startswith("Llama"):
        assert config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    else:
        assert config.rope_scaling is None
    gemma2 = hf["model_type"] == "gemma2"
    if name.startswith("Mistral"):
        windows = (4096,) * 32
    elif gemma2:  # even layers slide
        windows = (4096, 8192) * (config.n_layers // 2)
    else:
        windows = (config.n_ctx,) * config.n_layers
    assert config.attn_windows == windows
    if name.startswith("gemma"):
        assert config.act_fn == "gelu_pytorch_tanh" and config.post_norms == gemma2
        scale = np.sqrt(hf.get("query_pre_attn_scalar", config.d_head))
        assert config.attn_scales == (scale,) * config.n_layers  # 12.0 for gemma-2-27b
        caps = (50.0, 30.0) if gemma2 else (None, None)
        assert (config.attn_softcap, config.final_softcap) == caps
    dh, m, V = config.d_head, hf["intermediate_size"], hf["vocab_size"]
    want = canonical_llama_shapes(config.n_layers, H, KV, d, dh, m, V, post_norms=gemma2)
    abstract = {k: jax.ShapeDtypeStruct(s, jnp.bfloat16) for k, s in abstract_hf_llama(hf).items()}
    converted = jax.eval_shape(lambda sd: convert_state_dict(sd, config), abstract)
    assert {k: v.shape for k, v in flatten(converted).items()} == want
    assert {v.dtype for v in flatten(converted).values()} == {jnp.dtype(jnp.bfloat16)}
    initialised = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
    assert {k: v.shape for k, v in flatten(initialised).items()} == want


def test_mismatched_head_dim(ckpt, tmp_path):
    """A checkpoint whose q/k/v/o rows disagree with heads * head_dim fails on the first."""
    c = ckpt("gemma")
    sd = hf_numpy_state_dict(c)
    config = config_from_hf({**json.loads((c.path / "config.json").read_text()), "head_dim": 8})
    message = (
        "Gemma state dict: key 'model.layers.0.self_attn.q_proj.weight' has shape (64, 32), "
        "expected (32, 32)"
    )
    with pytest.raises(CheckpointError, match=re.escape(message)):
        convert_gemma_state_dict(sd, config)
    hf = json.loads((c.path / "config.json").read_text())
    del hf["head_dim"]  # GemmaConfig's default head_dim is 256
    (tmp_path / "config.json").write_text(json.dumps(hf))
    shutil.copy(c.path / "model.safetensors", tmp_path / "model.safetensors")
    message = "has shape (64, 32), expected (1024, 32)"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_pretrained(tmp_path)


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "cfg, message",
    [
        (
            {"architectures": ["OPTForCausalLM"]},
            "unsupported architecture 'OPTForCausalLM': lowrank.models reads GPT2LMHeadModel, "
            "GPT2Model, GPTNeoForCausalLM, GPTNeoModel, GPTNeoXForCausalLM, Gemma2ForCausalLM, "
            "GemmaForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM",
        ),
        (
            {"model_type": "gemma2", "attn_logit_softcapping": 0},
            "config_from_hf: attn_logit_softcapping must be a number in (0, 1e+30], got 0 (int)",
        ),
        (
            {"model_type": "gemma2", "query_pre_attn_scalar": "256"},
            "config_from_hf: query_pre_attn_scalar must be a number in (0, 1e+30], got '256'",
        ),
        (
            {"model_type": "gemma2", "hidden_activation": 3},
            "config_from_hf: hidden_activation must be a string, got 3 (int)",
        ),
        (
            {"model_type": "llama", "num_attention_heads": 6, "num_key_value_heads": 4},
            "config_from_hf: num_attention_heads (6) must be a multiple of num_key_value_heads (4)",
        ),
        (
            {"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            "config_from_hf: rope_scaling type 'yarn' is not supported; lowrank implements "
            "'linear', 'llama3' (or none)",
        ),
        (
            {"model_type": "qwen2", "rope_scaling": {"type": "dynamic", "factor": 2.0}},
            "config_from_hf: rope_scaling type 'dynamic' is not supported",
        ),
        (
            {"model_type": "mistral", "rope_parameters": {"rope_type": "longrope"}},
            "config_from_hf: rope_parameters type 'longrope' is not supported",
        ),
        (
            {"model_type": "llama", "rope_scaling": "llama3"},
            "config_from_hf: rope_scaling must be an object such as",
        ),
        (
            {"model_type": "llama", "rope_theta": "1e4"},
            "config_from_hf: rope_theta must be a number in (0, 1e+30], got '1e4' (str)",
        ),
        (
            {"model_type": "llama", "num_key_value_heads": 0},
            "config_from_hf: num_key_value_heads must be a positive integer (at most 100000)",
        ),
        (
            {"model_type": "llama", "rms_norm_eps": -1.0},
            "config_from_hf: rms_norm_eps must be a number from 0 to 1, got -1.0 (float)",
        ),
        (
            {"model_type": "llama", "mlp_bias": True},
            "config_from_hf: LlamaForCausalLM with mlp_bias=true is not supported",
        ),
        (
            {"model_type": "mistral", "sliding_window": 0},
            "config_from_hf: sliding_window must be a positive integer",
        ),
        (
            {"model_type": "qwen2", "attention_bias": "yes"},
            "config_from_hf: attention_bias must be true or false, got 'yes' (str)",
        ),
    ],
)
def test_bad_configs(cfg, message):
    with pytest.raises(ValueError) as info:
        config_from_hf(cfg)
    assert str(info.value).startswith(message), str(info.value)


def test_unknown_rope_type_in_a_transformers_object():
    from transformers import LlamaConfig

    hf = LlamaConfig(num_hidden_layers=1)
    hf.rope_parameters = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        config_from_hf(hf)


BASE = dict(
    architecture="LlamaForCausalLM", n_layers=2, n_heads=4, d_model=16, d_head=4, d_mlp=8,
    d_vocab=11, n_ctx=8, act_fn="silu", normalization="RMS", positional="rotary",
)  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_kv_heads=3), "ModelConfig: n_heads (4) must be a multiple of n_kv_heads (3)"),
        (dict(n_kv_heads=0), "ModelConfig: n_kv_heads must be a positive integer"),
        (
            dict(rotary_dim=6),
            "ModelConfig: rotary_dim must be a positive integer at most d_head (4)",
        ),
        (dict(rotary_dim=3, d_head=8), "ModelConfig: rotary_dim must be even, got 3"),
        (dict(rotary_base=0.0), "ModelConfig: rotary_base must be a number in (0, 1e+30]"),
        (dict(normalization="BN"), "ModelConfig: normalization must be one of ('LN', 'RMS')"),
        (dict(positional="alibi"), "ModelConfig: positional must be one of ('learned', 'rotary')"),
        (
            dict(positional="learned", rotary_dim=4),
            "ModelConfig: rotary_dim and rope_scaling need positional='rotary'",
        ),
        (dict(rope_scaling={"factor": 2}), "ModelConfig: rope_scaling must be a RopeScaling"),
        (dict(attn_softcap=0.0), "ModelConfig: attn_softcap must be a number in (0, 1e+30]"),
        (dict(attn_scale=-1.0), "ModelConfig: attn_scale must be a number in (0, 1e+30]"),
    ],
)
def test_model_config_validation(kwargs, message):
    with pytest.raises((ValueError, TypeError)) as info:
        ModelConfig(**{**BASE, **kwargs})
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rope_type="yarn", factor=2.0), "rope_scaling type 'yarn' is not supported"),
        (dict(rope_type="linear", factor=0.0), "RopeScaling('linear'): factor must be a number"),
        (
            dict(rope_type="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0),
            "RopeScaling('llama3'): high_freq_factor (1.0) must exceed low_freq_factor (4.0)",
        ),
    ],
)
def test_rope_scaling_validation(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RopeScaling(**kwargs)


def test_biases_follow_the_config(ckpt):
    """Qwen2 must store q/k/v biases; Llama without attention_bias must not."""
    qwen2, llama = ckpt("qwen2"), ckpt("llama")
    sd = {
        k: v
        for k, v in hf_numpy_state_dict(qwen2).items()
        if k != "model.layers.2.self_attn.k_proj.bias"
    }
    message = (
        "Llama state dict: missing key 'layers.2.self_attn.k_proj.bias' (expected shape (16,))"
    )
    with pytest.raises(CheckpointError, match=re.escape(message)):
        convert_llama_state_dict(sd, config_from_hf(qwen2.path))
    sd = dict(hf_numpy_state_dict(llama), **{"model.layers.0.self_attn.q_proj.bias": np.zeros(32)})
    with pytest.raises(
        CheckpointError, match="unexpected key 'model.layers.0.self_attn.q_proj.bias'"
    ):
        convert_llama_state_dict(sd, config_from_hf(llama.path))
    sd = dict(
        hf_numpy_state_dict(llama), **{"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4)}
    )
    assert "blocks" in convert_llama_state_dict(sd, config_from_hf(llama.path))  # buffer ignored
    sd = dict(hf_numpy_state_dict(llama))
    sd["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 32), np.float32)
    message = "'model.layers.0.self_attn.k_proj.weight' has shape (32, 32), expected (16, 32)"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        convert_llama_state_dict(sd, config_from_hf(llama.path))


@pytest.mark.parametrize("case", ["llama", "mistral", "qwen2", "gemma", "gemma2"])
def test_unprocessed_matches_transformer_lens(ckpt, tokens, case):
    """TransformerLens's tree and forward pass (RMS, gated MLP, GQA, llama3 rope, windows,
    Gemma-2's post-norms and soft-caps) agree with ours; TL ignores Qwen2's sliding window
    and runs Gemma's MLP with the exact GELU, so those logits are not compared.
    """
    import torch

    c = ckpt(case)
    tl = tl_rotary_model(c, **NO_PROCESSING)
    model = load_pretrained(c.path, **NO_PROCESSING)
    ref, got = tl_tree(tl), flatten(model.params)
    assert set(ref) == set(got)
    for key, value in got.items():
        np.testing.assert_array_equal(value, ref[key], err_msg=key)
    if case not in ("qwen2", "gemma"):
        with torch.no_grad():
            tl_logits = tl(torch.as_tensor(tokens, dtype=torch.long)).numpy()
        np.testing.assert_allclose(np.asarray(model(tokens)), tl_logits, rtol=0, atol=1e-4)
