"""GPT-NeoX (Pythia): HF parity, the interleaved fused layout, configs, errors.

The checkpoints (``conftest.build_gpt_neox``) have 2 layers, 2 heads of width 16 rotated on
their first quarter (rotary_dim 4), parallel attention and MLP, LayerNorm, untied
``embed_out``.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    NO_PROCESSING,
    ROTARY_FAMILY,
    TOKEN_SEQ,
    assert_default_processing,
    assert_matches_tl_conversion,
    canonical_shapes,
    flatten,
    hf_logits,
    hf_numpy_state_dict,
    tl_rotary_model,
    tl_tree,
)

from lowrank.models import (
    CheckpointError,
    ModelConfig,
    config_from_hf,
    convert_gpt_neox_state_dict,
    forward,
    init_params,
    load_pretrained,
)

L, H, D, DH, M, V = 2, 2, 32, 16, 64, 101

#: (storage dtype, transformers overrides) of the parity checkpoints.
CASES = {
    "parallel": ("float32", {}),
    "parallel-bf16": ("bfloat16", {}),
    "sequential": ("float32", dict(use_parallel_residual=False)),
    "tied-no-bias": ("float32", dict(tie_word_embeddings=True, attention_bias=False)),
    "full-rotary-linear": (
        "float32",
        dict(rotary_pct=1.0, rope_scaling=dict(rope_type="linear", factor=2.0)),
    ),
}


@pytest.fixture(scope="module")
def ckpt(rotary_checkpoint):
    return lambda case: rotary_checkpoint("gpt_neox", CASES[case][0], **CASES[case][1])


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(ckpt, tokens, case):
    c = ckpt(case)
    model = load_pretrained(c.path, **NO_PROCESSING)
    ref = hf_logits(c, tokens)
    ours = np.asarray(model(tokens))
    assert ours.shape == ref.shape == (2, TOKEN_SEQ, V)
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_config(ckpt):
    c = config_from_hf(ckpt("parallel").path)
    assert (c.n_layers, c.n_heads, c.n_kv_heads, c.d_head, c.rotary_dim) == (L, H, H, DH, 4)
    assert c.normalization == "LN" and c.positional == "rotary" and c.rotary_base == 100.0
    assert c.parallel_attn_mlp and not c.gated_mlp and c.act_fn == "gelu"
    assert c.attn_qkv_bias and c.attn_out_bias and not c.tie_word_embeddings
    assert not config_from_hf(ckpt("sequential").path).parallel_attn_mlp
    full = config_from_hf(ckpt("full-rotary-linear").path)
    assert full.rotary_dim == DH and full.rope_scaling.rope_type == "linear"


def test_the_options_are_exercised(ckpt, tokens):
    """Parallel blocks and partial rotation change the logits (the parity is meaningful)."""
    c = ckpt("parallel")
    model = load_pretrained(c.path, **NO_PROCESSING)
    for change in (dict(parallel_attn_mlp=False), dict(rotary_dim=DH), dict(rotary_dim=2)):
        config = ModelConfig(**{**model.config.__dict__, **change})
        ours = np.asarray(forward(model.params, tokens, config))
        assert np.abs(ours - hf_logits(c, tokens)).max() > 1e-2, change


def test_interleaved_qkv_by_hand(ckpt):
    """Rows of query_key_value run (head, q/k/v, d_head): head 1's keys are rows 64:80."""
    c = ckpt("parallel")
    sd = hf_numpy_state_dict(c)
    tree = flatten(convert_gpt_neox_state_dict(sd, config_from_hf(c.path)))
    p = "gpt_neox.layers.1.attention."
    qkv, bias = sd[p + "query_key_value.weight"], sd[p + "query_key_value.bias"]
    np.testing.assert_array_equal(tree["blocks.attn.W_K"][1, 1], qkv[64:80].T)
    np.testing.assert_array_equal(tree["blocks.attn.W_Q"][1, 0], qkv[0:16].T)
    np.testing.assert_array_equal(tree["blocks.attn.b_V"][1, 1], bias[80:96])
    np.testing.assert_array_equal(tree["blocks.attn.W_O"][1, 1], sd[p + "dense.weight"][:, 16:].T)
    np.testing.assert_array_equal(tree["unembed.W_U"], sd["lm_head.weight"].T)
    assert "pos_embed" not in flatten(tree) and tree["blocks.ln1.b"].shape == (L, D)
    assert not tree["unembed.b_U"].any()


def test_published_checkpoint_keys(ckpt):
    """Pythia files: ``embed_out.weight`` and the mask / rotary buffers of old versions."""
    c = ckpt("parallel")
    config = config_from_hf(c.path)
    sd = hf_numpy_state_dict(c)
    old = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in sd.items()}
    old["gpt_neox.layers.0.attention.bias"] = np.tril(np.ones((1, 1, 24, 24), bool))
    old["gpt_neox.layers.1.attention.masked_bias"] = np.array(-1e9, np.float32)
    old["gpt_neox.layers.1.attention.rotary_emb.inv_freq"] = np.ones(2, np.float32)
    new, ours = (
        flatten(convert_gpt_neox_state_dict(sd, config)),
        flatten(convert_gpt_neox_state_dict(old, config)),
    )
    for key in new:
        np.testing.assert_array_equal(ours[key], new[key], err_msg=key)
    both = dict(old, **{"lm_head.weight": sd["lm_head.weight"]})
    with pytest.raises(CheckpointError, match="'lm_head.weight' appears twice"):
        convert_gpt_neox_state_dict(both, config)
    tied = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    tree = convert_gpt_neox_state_dict(tied, config)
    np.testing.assert_array_equal(tree["unembed"]["W_U"], tree["embed"]["W_E"].T)


def test_biases_follow_the_config(ckpt):
    c = ckpt("tied-no-bias")
    sd = hf_numpy_state_dict(c)
    assert not any(k.endswith(("query_key_value.bias", "dense.bias")) for k in sd)
    tree = flatten(convert_gpt_neox_state_dict(sd, config_from_hf(c.path)))
    for key in ("b_Q", "b_K", "b_V", "b_O"):
        assert not tree[f"blocks.attn.{key}"].any(), key
    sd["gpt_neox.layers.0.attention.dense.bias"] = np.zeros(D, np.float32)
    with pytest.raises(CheckpointError, match="unexpected key 'gpt_neox.layers.0.attention.dense"):
        convert_gpt_neox_state_dict(sd, config_from_hf(c.path))


def test_matches_transformer_lens_conversion(ckpt):
    c = ckpt("parallel")
    ours = flatten(convert_gpt_neox_state_dict(hf_numpy_state_dict(c), config_from_hf(c.path)))
    assert_matches_tl_conversion(c, ours)


def test_model_views(ckpt, tokens):
    model = load_pretrained(ckpt("parallel").path, **NO_PROCESSING)
    assert model.OV.shape == model.QK.shape == (L, H, D, D)  # no grouping: [L, H, ...]
    np.testing.assert_allclose(
        model.OV.AB, np.asarray(model.W_V) @ np.asarray(model.W_O), atol=1e-5
    )
    with pytest.raises(AttributeError, match="GPTNeoXForCausalLM uses rotary position"):
        model.W_pos  # noqa: B018
    logits, acts = model(tokens[0], return_activations=True)
    assert logits.shape == (TOKEN_SEQ, V) and acts["pattern"].shape == (L, H, TOKEN_SEQ, TOKEN_SEQ)
    mid = acts["resid_mid"] - acts["resid_pre"]  # attention output, read by nothing but post
    assert np.abs(np.asarray(mid)).max() > 0


def test_processing_defaults(ckpt, tokens):
    """TransformerLens's defaults: fold, centre writing weights (no W_pos), centre unembed,
    fold value biases.
    """
    model = assert_default_processing(
        ckpt("parallel"),
        tokens,
        fold_ln=True,
        center_writing_weights=True,
        center_unembed=True,
        fold_value_biases=True,
    )
    assert np.abs(np.asarray(model.W_E).mean(-1)).max() < 1e-6


# ------------------------------------------------------------------- published configs
PYTHIA = [n for n, c in ROTARY_FAMILY.items() if c["model_type"] == "gpt_neox"]


def abstract_hf_gpt_neox(c: dict) -> dict[str, tuple[int, ...]]:
    """HF GPT-NeoX tensor shapes (nn.Linear [out, in]) as the Pythia files store them."""
    d, m, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    shapes = {
        "gpt_neox.embed_in.weight": (V, d),
        "gpt_neox.final_layer_norm.weight": (d,),
        "gpt_neox.final_layer_norm.bias": (d,),
        "embed_out.weight": (V, d),
    }
    for i in range(c["num_hidden_layers"]):
        p = f"gpt_neox.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[p + norm + ".weight"] = shapes[p + norm + ".bias"] = (d,)
        shapes.update(
            {
                p + "attention.query_key_value.weight": (3 * d, d),
                p + "attention.query_key_value.bias": (3 * d,),
                p + "attention.dense.weight": (d, d),
                p + "attention.dense.bias": (d,),
                p + "mlp.dense_h_to_4h.weight": (m, d),
                p + "mlp.dense_h_to_4h.bias": (m,),
                p + "mlp.dense_4h_to_h.weight": (d, m),
                p + "mlp.dense_4h_to_h.bias": (d,),
            }
        )
    return shapes


@pytest.mark.parametrize("name", PYTHIA)
def test_published_configs_abstract(name):
    hf = ROTARY_FAMILY[name]
    config = config_from_hf(hf)
    L, H, d, V = (
        hf["num_hidden_layers"],
        hf["num_attention_heads"],
        hf["hidden_size"],
        hf["vocab_size"],
    )
    dh, m = d // H, 4 * d
    assert (config.n_layers, config.n_heads, config.d_head, config.d_mlp) == (L, H, dh, m)
    assert config.rotary_dim == dh // 4 and config.parallel_attn_mlp and config.n_ctx == 2048
    want = canonical_shapes(L, H, d, dh, m, V, n_ctx=2048)
    del want["pos_embed.W_pos"]  # rotary: no learned positions
    abstract = {
        k: jax.ShapeDtypeStruct(s, jnp.float16) for k, s in abstract_hf_gpt_neox(hf).items()
    }
    converted = jax.eval_shape(lambda sd: convert_gpt_neox_state_dict(sd, config), abstract)
    assert {k: v.shape for k, v in flatten(converted).items()} == want
    initialised = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
    assert {k: v.shape for k, v in flatten(initialised).items()} == want


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "cfg, message",
    [
        (
            {"hidden_size": 64, "num_attention_heads": 4, "head_dim": 32},
            "config_from_hf: head_dim 32 does not match hidden_size / num_attention_heads = "
            "64 / 4 = 16; GPT-NeoX heads are hidden_size / num_attention_heads wide",
        ),
        (
            {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
            "config_from_hf: rope_scaling type 'dynamic' is not supported; lowrank implements "
            "'linear', 'llama3' (or none)",
        ),
        ({"rotary_pct": 1.5}, "config_from_hf: rotary_pct must be a number in (0, 1], got 1.5"),
        ({"layer_norm_eps": "x"}, "config_from_hf: layer_norm_eps must be a number from 0 to 1"),
        ({"use_parallel_residual": 1}, "config_from_hf: use_parallel_residual must be true or"),
    ],
)
def test_bad_configs(cfg, message):
    with pytest.raises(ValueError) as info:
        config_from_hf({"model_type": "gpt_neox", "num_hidden_layers": 2, **cfg})
    assert str(info.value).startswith(message), str(info.value)


def test_wrong_family(ckpt):
    sd = hf_numpy_state_dict(ckpt("parallel"))
    with pytest.raises(ValueError, match=re.escape("config is for GPT2LMHeadModel, not GPT-NeoX")):
        convert_gpt_neox_state_dict(sd, config_from_hf({"model_type": "gpt2"}))


# ------------------------------------------------------------ TransformerLens processing
@pytest.mark.parametrize("fold_ln", [False, True])
@pytest.mark.parametrize("center_writing_weights", [False, True])
@pytest.mark.parametrize("center_unembed", [False, True])
@pytest.mark.parametrize("fold_value_biases", [False, True])
def test_processing_matches_transformer_lens(
    ckpt, tokens, fold_ln, center_writing_weights, center_unembed, fold_value_biases
):
    """Every combination of TransformerLens's steps on GPT-NeoX, tree and logits vs TL."""
    import torch

    flags = dict(
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
    )
    c = ckpt("parallel")
    tl = tl_rotary_model(c, **flags)
    ours = load_pretrained(c.path, **flags)
    assert ours.ln_folded == fold_ln
    ref, got = tl_tree(tl), flatten(ours.params)
    assert set(ref) == set(got)
    for key, value in got.items():
        np.testing.assert_allclose(value, ref[key], rtol=0, atol=1e-5, err_msg=key)
    with torch.no_grad():
        tl_logits = tl(torch.as_tensor(tokens, dtype=torch.long)).numpy()
    np.testing.assert_allclose(np.asarray(ours(tokens)), tl_logits, rtol=0, atol=1e-4)
