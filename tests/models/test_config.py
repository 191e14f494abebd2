"""ModelConfig from HF configs: objects, dicts, config.json paths, published models, errors."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest
from conftest import GPT2_FAMILY, GPT_NEO_FAMILY, published_config

from lowrank.models import ModelConfig, config_from_hf


@pytest.mark.parametrize("name", list(GPT2_FAMILY))
def test_published_gpt2_configs(name):
    p = GPT2_FAMILY[name]
    c = config_from_hf(published_config(name))
    assert (c.n_layers, c.n_heads, c.d_model) == (p["n_layer"], p["n_head"], p["n_embd"])
    assert c.d_head == p["n_embd"] // p["n_head"] == 64
    assert (c.d_mlp, c.d_vocab, c.n_ctx) == (4 * p["n_embd"], 50257, 1024)
    assert c.family == "gpt2" and c.architecture == "GPT2LMHeadModel"
    assert c.act_fn == "gelu_new" and c.eps == 1e-5 and c.use_attn_scale
    assert c.attn_types == ("global",) * c.n_layers
    assert c.attn_scales == (8.0,) * c.n_layers


@pytest.mark.parametrize("name", list(GPT_NEO_FAMILY))
def test_published_gpt_neo_configs(name):
    p = GPT_NEO_FAMILY[name]
    c = config_from_hf(published_config(name))
    assert (c.n_layers, c.n_heads, c.d_model) == (p["num_layers"], p["num_heads"], p["hidden_size"])
    assert c.d_head == 128 if name != "gpt-neo-125M" else c.d_head == 64
    assert (c.d_mlp, c.n_ctx, c.window_size) == (4 * p["hidden_size"], 2048, 256)
    assert c.family == "gpt_neo" and not c.use_attn_scale
    assert c.attn_types == ("global", "local") * (c.n_layers // 2)
    assert c.attn_windows == (2048, 256) * (c.n_layers // 2)
    assert c.attn_scales == (1.0,) * c.n_layers


def test_sources_agree(gpt2_checkpoint):
    """A transformers object, a dict, a config.json path and its directory give one config."""
    from_obj = config_from_hf(gpt2_checkpoint.hf_model.config)
    path = gpt2_checkpoint.path
    as_dict = json.loads((path / "config.json").read_text())
    assert from_obj == config_from_hf(as_dict) == config_from_hf(path)
    assert from_obj == config_from_hf(path / "config.json") == config_from_hf(str(path))
    assert from_obj == ModelConfig.from_hf(path)
    assert from_obj.n_layers == 3 and from_obj.d_head == 8 and from_obj.n_ctx == 24


def test_gpt_neo_checkpoint_config(gpt_neo_checkpoint):
    c = config_from_hf(gpt_neo_checkpoint.path)
    assert c.attn_types == ("global", "local", "global", "local")
    assert c.window_size == 5 and c.attn_windows == (24, 5, 24, 5)
    assert c == config_from_hf(gpt_neo_checkpoint.hf_model.config)


def test_hf_defaults_fill_missing_keys():
    """config.json files omit keys that equal HF's defaults."""
    c = config_from_hf({"model_type": "gpt2"})
    assert (c.n_layers, c.d_model, c.n_ctx, c.d_vocab, c.eps) == (12, 768, 1024, 50257, 1e-5)
    neo = config_from_hf(
        {"model_type": "gpt_neo", "num_layers": 2, "attention_types": [[["global", "local"], 1]]}
    )
    assert neo.architecture == "GPTNeoForCausalLM" and neo.window_size == 256


def test_inner_sizes_and_scaling_flags():
    c = config_from_hf(
        {
            "model_type": "gpt2",
            "n_layer": 3,
            "n_inner": 100,
            "scale_attn_by_inverse_layer_idx": True,
            "tie_word_embeddings": False,
        }
    )
    assert c.d_mlp == 100 and not c.tie_word_embeddings
    assert c.attn_scales == (8.0, 16.0, 24.0)
    assert config_from_hf({"model_type": "gpt2", "scale_attn_weights": False}).attn_scales[0] == 1
    neo = config_from_hf(
        {
            "model_type": "gpt_neo",
            "intermediate_size": 77,
            "num_layers": 2,
            "attention_types": [[["local"], 2]],
        }
    )
    assert neo.d_mlp == 77


def test_hashable_and_static_under_jit():
    c = config_from_hf(published_config("gpt2"))
    assert hash(c) == hash(config_from_hf(published_config("gpt2")))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.n_layers = 3  # type: ignore[misc]
    f = jax.jit(lambda x, config: x * config.n_layers, static_argnames="config")
    assert float(f(jnp.float32(2), config=c)) == 24.0


@pytest.mark.parametrize(
    "cfg, match",
    [
        (
            {"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
            "unsupported architecture 'LlamaForCausalLM'.*GPT2LMHeadModel",
        ),
        ({"model_type": "bert"}, "unsupported model type 'bert'"),
        ({"model_type": "gpt2", "n_embd": 30, "n_head": 4}, "not divisible"),
        ({"model_type": "gpt2", "activation_function": "tanhshrink"}, "act_fn 'tanhshrink'"),
        ({"model_type": "gpt2", "add_cross_attention": True}, "cross-attention"),
    ],
)
def test_bad_configs(cfg, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf(cfg)


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config file at"):
        config_from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        config_from_hf(tmp_path)
    with pytest.raises(TypeError, match="expected a transformers config"):
        config_from_hf(42)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(architecture="OPTForCausalLM"), "unsupported architecture"),
        (dict(n_layers=0), "n_layers must be a positive integer"),
        (dict(attn_types=("global",)), "attn_types must give"),
        (dict(attn_types=("global", "sliding")), "attn_types must give"),
        (dict(attn_types=("global", "local")), "window_size must be a positive integer"),
        (dict(eps=-1.0), "eps must be"),
    ],
)
def test_model_config_validation(kwargs, match):
    base = dict(
        architecture="GPT2LMHeadModel",
        n_layers=2,
        n_heads=2,
        d_model=8,
        d_head=4,
        d_mlp=32,
        d_vocab=11,
        n_ctx=16,
    )
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**base, **kwargs})
