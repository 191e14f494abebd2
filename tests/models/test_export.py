"""Canonical tree -> HF checkpoint (GPT-2 and the Llama layout): exact round trips, HF torch
logits, configs that read back, bf16, errors.
"""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import NO_PROCESSING, flatten, hf_logits, hf_numpy_state_dict
from safetensors import safe_open

from benchmarks.helpers import gpt2_config
from lowrank.models import (
    config_from_hf,
    convert_gpt2_state_dict,
    convert_state_dict,
    export,
    forward,
    gpt2_state_dict,
    init_params,
    load_pretrained,
    process_params,
    save_pretrained,
)
from lowrank.models.export import hf_config_dict, hf_state_dict, llama_config_dict
from lowrank.models.layout import transpose
from lowrank.models.loading import LAYOUTS

# d_mlp 48 is not 4 * d_model: it is written as n_inner.
CONFIG = gpt2_config(2, 4, 32, d_mlp=48, d_vocab=37, n_ctx=20, tie_word_embeddings=False)

#: Checkpoints saved back: the variant (``gpt_neo`` or one of ``rotary_checkpoint``'s), then
#: ``-bf16`` for bfloat16 storage or a name of :data:`OVERRIDES`.
CASES = "llama llama-bf16 llama-bias-tied mistral mistral-head_dim16 qwen2 gpt_neox gpt_neo"
#: transformers config overrides of the cases that have them.
OVERRIDES = {"bias-tied": dict(attention_bias=True, tie_word_embeddings=True)}
OVERRIDES["head_dim16"] = dict(head_dim=16)


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
    assert all(v.dtype == jnp.bfloat16 for v in sd.values())  # bf16 stays bf16
    assert_trees_equal(bf16, convert_gpt2_state_dict(sd, CONFIG))
    fp8 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float8_e4m3fn), tree)
    assert all(v.dtype == np.float32 for v in gpt2_state_dict(fp8, CONFIG).values())


@pytest.mark.parametrize("family", ["gpt2", "gpt_neo", "gpt_neox", "llama", "qwen2"])
def test_layout_matches_hf_checkpoint(request, rotary_checkpoint, family):
    """HF's own state dict -> our tree -> our export gives HF's tensors back, key by key.

    The same table-driven exporter serves every layout (GPT-Neo and GPT-NeoX included).
    """
    if family in ("gpt2", "gpt_neo"):
        ckpt = request.getfixturevalue(f"{family}_checkpoint")
    else:
        ckpt = rotary_checkpoint(family)
    config = config_from_hf(ckpt.path)
    hf = hf_numpy_state_dict(ckpt)
    ours = hf_state_dict(convert_state_dict(hf, config), config)
    layout = LAYOUTS[config.family]
    buffer = re.compile(f"({'|'.join(map(re.escape, layout.prefixes))})?({layout.ignored})")
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()  # stored once, as W_E
    assert set(ours) <= set(hf)
    assert all(buffer.fullmatch(k) or k in tied for k in set(hf) - set(ours))
    for key, value in ours.items():
        assert value.flags.c_contiguous
        np.testing.assert_array_equal(value, hf[key], err_msg=key)


@pytest.mark.parametrize("tied", [False, True])
def test_save_pretrained_matches_hf_torch(tmp_path, tied):
    import torch
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

    raw = load_pretrained(tmp_path, **NO_PROCESSING)
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


@pytest.fixture(scope="module")
def llama_case(rotary_checkpoint, gpt_neo_checkpoint):
    """Factory: a case name of :data:`CASES` -> its checkpoint."""

    def make(case):
        variant, _, option = case.partition("-")
        if variant == "gpt_neo":
            return gpt_neo_checkpoint
        storage = "bfloat16" if option == "bf16" else "float32"
        return rotary_checkpoint(variant, storage, **OVERRIDES.get(option, {}))

    return make


@pytest.mark.parametrize("case", CASES.split())
def test_save_pretrained_round_trip(llama_case, tokens, tmp_path, case):
    """A loaded, unprocessed Llama / Mistral / Qwen2 (GPT-Neo, GPT-NeoX) tree -> a checkpoint
    that transformers loads with the same logits and lowrank re-loads to the identical tree
    (dtype included).
    """
    import torch
    from transformers import AutoModelForCausalLM

    ckpt = llama_case(case)
    raw = load_pretrained(ckpt.path, dtype="auto", tokenizer=False, **NO_PROCESSING)
    save_pretrained(raw.params, raw.config, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert config_from_hf(tmp_path) == raw.config
    stored = "BF16" if "bf16" in case else "F32"
    with safe_open(tmp_path / "model.safetensors", "np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {stored}
        assert ("lm_head.weight" in f.keys()) == (not raw.config.tie_word_embeddings)

    hf = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ref, hf_logits(ckpt, tokens), rtol=0, atol=1e-6)

    again = load_pretrained(tmp_path, dtype="auto", tokenizer=False, **NO_PROCESSING)
    assert_trees_equal(jax.device_get(raw.params), jax.device_get(again.params))


def test_llama_layout_export_errors(llama_case, monkeypatch):
    llama = load_pretrained(llama_case("llama").path, tokenizer=False, **NO_PROCESSING)
    tree, config = jax.device_get(llama.params), llama.config
    with pytest.raises(ValueError, match="folded LayerNorms.*Llama checkpoints hold"):
        hf_state_dict(load_pretrained(llama_case("llama").path, tokenizer=False).params, config)
    for path in ("blocks.mlp.b_in", "blocks.attn.b_O", "blocks.attn.b_Q"):  # none stored
        bias = jax.tree_util.tree_map(np.copy, tree)
        flatten(bias)[path][..., 0] = 1.0
        with pytest.raises(ValueError, match=f"{path} is non-zero, but this Llama checkpoint"):
            hf_state_dict(bias, config)
    with pytest.raises(ValueError, match=r"have no place for \['pos_embed.W_pos'\]"):
        hf_state_dict({**tree, "pos_embed": {"W_pos": np.zeros((24, 32), np.float32)}}, config)
    gateless = {**tree, "blocks": {**tree["blocks"], "mlp": dict(tree["blocks"]["mlp"])}}
    del gateless["blocks"]["mlp"]["W_gate"]
    with pytest.raises(ValueError, match="params has no 'blocks.mlp.W_gate'"):
        hf_state_dict(gateless, config)
    tied = dataclasses.replace(config, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="tie_word_embeddings is True but unembed.W_U is not"):
        hf_state_dict(tree, tied)
    # a transform without an inverse is named
    layout = LAYOUTS["llama"]
    rows = [
        dataclasses.replace(t, transform=lambda x, _d: x.T) if t.transform is transpose else t
        for t in layout.tensors
    ]
    monkeypatch.setitem(LAYOUTS, "llama", dataclasses.replace(layout, tensors=tuple(rows)))
    with pytest.raises(NotImplementedError, match="no inverse of transform '<lambda>'"):
        hf_state_dict(tree, config)


def test_config_dicts_read_back_or_refuse(llama_case, monkeypatch):
    """Each written config.json reads back as the same ModelConfig, or the writer refuses."""
    for case in ("llama", "llama-bias-tied", "mistral", "mistral-head_dim16", "qwen2"):
        config = config_from_hf(llama_case(case).path)
        written = llama_config_dict(config)
        assert config_from_hf(written) == config
        assert written["architectures"] == [config.architecture]
        assert written["bos_token_id"] is None or written["bos_token_id"] < config.d_vocab
    qwen2 = config_from_hf(llama_case("qwen2").path)
    assert llama_config_dict(qwen2)["layer_types"][-1] == "sliding_attention"
    llama = config_from_hf(llama_case("llama").path)
    mistral = config_from_hf(llama_case("mistral").path)
    for config, change, field in [
        (llama, dict(attn_qkv_bias=True), "attn_out_bias=False would read back as True"),
        (llama, dict(rotary_dim=4), "rotary_dim=4 would read back as 8"),
        (mistral, dict(attn_types=("global", "local", "local")), r"attn_types=\('global'"),
    ]:
        arch = config.architecture
        with pytest.raises(ValueError, match=f"{arch} cannot express this config: {field}"):
            llama_config_dict(dataclasses.replace(config, **change))
    with pytest.raises(ValueError, match="not Llama"):
        llama_config_dict(CONFIG)
    neo = config_from_hf(llama_case("gpt_neo").path)
    with pytest.raises(ValueError, match="GPTNeoForCausalLM cannot express this config: d_head"):
        hf_config_dict(dataclasses.replace(neo, d_head=4))
    monkeypatch.delitem(export._HF_CONFIGS, "gpt_neo")
    with pytest.raises(ValueError, match="writing GPTNeoForCausalLM configs is not supported"):
        hf_config_dict(neo)
    with pytest.raises(ValueError, match="shards must be a positive integer, got 0"):
        save_pretrained(random_tree(CONFIG), CONFIG, "/nonexistent/never/written", shards=0)
    with pytest.raises(ValueError, match="shards=99 but the checkpoint has 29 tensors"):
        save_pretrained(random_tree(CONFIG), CONFIG, "/nonexistent/never/written", shards=99)
