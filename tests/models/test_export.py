"""Canonical tree -> HF GPT-2 checkpoint: exact round trip, HF torch logits, config, errors."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import flatten, hf_numpy_state_dict

from lowrank.models import (
    ModelConfig,
    config_from_hf,
    convert_gpt2_state_dict,
    forward,
    gpt2_state_dict,
    init_params,
    load_pretrained,
    process_params,
    save_pretrained,
)

CONFIG = ModelConfig(
    architecture="GPT2LMHeadModel",
    n_layers=2,
    n_heads=4,
    d_model=32,
    d_head=8,
    d_mlp=48,  # not 4 * d_model: written as n_inner
    d_vocab=37,
    n_ctx=20,
    eps=1e-5,
    tie_word_embeddings=False,
)


def random_tree(config, seed=0, dtype=np.float32):
    """Unprocessed canonical tree with non-trivial LayerNorms and biases (b_U zero)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    tree = jax.tree_util.tree_map(
        lambda s: (0.3 * rng.standard_normal(s.shape)).astype(dtype), shapes
    )
    for ln in (tree["blocks"]["ln1"], tree["blocks"]["ln2"], tree["ln_final"]):
        ln["w"] = (1 + ln["w"]).astype(dtype)
    tree["unembed"]["b_U"] = np.zeros(config.d_vocab, dtype)
    if config.tie_word_embeddings:
        tree["unembed"]["W_U"] = np.ascontiguousarray(tree["embed"]["W_E"].T)
    return tree


def assert_trees_equal(a, b):
    fa, fb = flatten(a), flatten(b)
    assert set(fa) == set(fb)
    for key in fa:
        assert np.asarray(fb[key]).dtype == np.asarray(fa[key]).dtype, key
        np.testing.assert_array_equal(np.asarray(fb[key]), np.asarray(fa[key]), err_msg=key)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_round_trip_exact(tied, dtype):
    config = dataclasses.replace(CONFIG, tie_word_embeddings=tied)
    tree = random_tree(config, dtype=dtype)
    sd = gpt2_state_dict(tree, config)
    assert ("lm_head.weight" in sd) == (not tied)
    assert all(k.startswith("transformer.") or k == "lm_head.weight" for k in sd)
    assert all(v.flags.c_contiguous and v.dtype == dtype for v in sd.values())
    assert_trees_equal(tree, convert_gpt2_state_dict(sd, config))


def test_jax_leaves_and_bfloat16():
    tree = random_tree(CONFIG)
    as_jax = jax.tree_util.tree_map(jnp.asarray, tree)
    for key, value in gpt2_state_dict(as_jax, CONFIG).items():
        np.testing.assert_array_equal(value, gpt2_state_dict(tree, CONFIG)[key])
    bf16 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), tree)
    sd = gpt2_state_dict(bf16, CONFIG)
    assert all(v.dtype == np.float32 for v in sd.values())
    back = convert_gpt2_state_dict(sd, CONFIG, dtype=jnp.bfloat16)
    assert_trees_equal(bf16, back)


def test_layout_matches_hf_checkpoint(gpt2_checkpoint):
    """HF's own state dict -> our tree -> our export gives HF's tensors back, key by key."""
    config = config_from_hf(gpt2_checkpoint.path)
    hf = hf_numpy_state_dict(gpt2_checkpoint)
    ours = gpt2_state_dict(convert_gpt2_state_dict(hf, config), config)
    buffer = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)")  # causal masks
    hf = {k: v for k, v in hf.items() if not buffer.fullmatch(k)}
    if config.tie_word_embeddings:
        hf.pop("lm_head.weight", None)  # a tied checkpoint stores wte only
    assert set(ours) == set(hf)
    for key, value in ours.items():
        np.testing.assert_array_equal(value, hf[key], err_msg=key)


@pytest.mark.parametrize("tied", [False, True])
def test_save_pretrained_matches_hf_torch(tmp_path, tied):
    from transformers import AutoConfig, GPT2LMHeadModel

    config = dataclasses.replace(CONFIG, tie_word_embeddings=tied, act_fn="gelu_new")
    tree = random_tree(config, seed=1)
    save_pretrained(tree, config, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    hf_config = AutoConfig.from_pretrained(tmp_path)
    assert hf_config.architectures == ["GPT2LMHeadModel"]
    assert hf_config.n_inner == 48 and hf_config.tie_word_embeddings == tied
    assert hf_config.bos_token_id is None  # GPT-2's 50256 lies outside this vocabulary
    assert hf_config.resid_pdrop == hf_config.embd_pdrop == hf_config.attn_pdrop == 0.0
    assert config_from_hf(tmp_path) == config

    tokens = np.random.default_rng(0).integers(0, config.d_vocab, (3, config.n_ctx))
    model = GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = model(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(tree, tokens, config)), ref, atol=2e-5, rtol=0)

    raw = load_pretrained(
        tmp_path,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    assert_trees_equal(tree, jax.device_get(raw.params))


def test_save_pretrained_with_tokenizer(tmp_path, gpt2_checkpoint):
    from transformers import AutoTokenizer

    config = config_from_hf(gpt2_checkpoint.path)
    tree = convert_gpt2_state_dict(hf_numpy_state_dict(gpt2_checkpoint), config)
    tok = AutoTokenizer.from_pretrained(gpt2_checkpoint.path)
    save_pretrained(tree, config, tmp_path / "out", tokenizer=tok)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["bos_token_id"] == written["eos_token_id"] == tok.bos_token_id == 0
    model = load_pretrained(tmp_path / "out")
    assert model.to_str_tokens("w1 w2", prepend_bos=False) == ["w1", "w2"]
    np.testing.assert_allclose(
        np.asarray(model(np.arange(10))),
        np.asarray(load_pretrained(gpt2_checkpoint.path)(np.arange(10))),
        atol=1e-5,
    )


def test_errors():
    tree = random_tree(CONFIG)
    folded = process_params(tree)
    with pytest.raises(ValueError, match="folded LayerNorms"):
        gpt2_state_dict(folded, CONFIG)
    bias = jax.tree_util.tree_map(np.copy, tree)
    bias["unembed"]["b_U"][3] = 1.0
    with pytest.raises(ValueError, match="b_U is non-zero"):
        gpt2_state_dict(bias, CONFIG)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        gpt2_state_dict(tree, dataclasses.replace(CONFIG, tie_word_embeddings=True))
    with pytest.raises(
        ValueError, match=r"'blocks.attn.W_Q' has shape \(2, 4, 32, 8\), expected \(2, 4, 32, 4\)"
    ):
        gpt2_state_dict(tree, dataclasses.replace(CONFIG, d_head=4))
    with pytest.raises(ValueError, match="n_heads \\* d_head == d_model"):
        save_pretrained(
            random_tree(dataclasses.replace(CONFIG, d_head=4)),
            dataclasses.replace(CONFIG, d_head=4),
            "/nonexistent/never/written",
        )
    neo = dataclasses.replace(CONFIG, architecture="GPTNeoForCausalLM")
    with pytest.raises(ValueError, match="not GPT-2"):
        gpt2_state_dict(tree, neo)
    ints = jax.tree_util.tree_map(np.copy, tree)
    ints["embed"]["W_E"] = ints["embed"]["W_E"].astype(np.int32)
    with pytest.raises(TypeError, match="must be a float array"):
        gpt2_state_dict(ints, CONFIG)
