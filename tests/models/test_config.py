"""ModelConfig from HF configs: objects, dicts, config.json paths, published models, errors."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest
from conftest import GPT2_FAMILY, GPT_NEO_FAMILY, published_config

from benchmarks.helpers import gpt2_config
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
            {"architectures": ["OPTForCausalLM"], "model_type": "opt"},
            "unsupported architecture 'OPTForCausalLM'.*GPT2LMHeadModel",
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
    base = gpt2_config(2, 2, 8, d_vocab=11, n_ctx=16)  # d_head 4, d_mlp 32
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(base, **kwargs)


GPT2_LIMITS = "(at most 10000)"


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"n_layer": "12"}, f"n_layer must be a positive integer {GPT2_LIMITS}, got '12' (str)"),
        ({"n_embd": 12.5}, "n_embd must be a positive integer (at most 1000000), got 12.5 (float)"),
        ({"n_head": True}, "n_head must be a positive integer (at most 100000), got True (bool)"),
        ({"n_layer": [12]}, f"n_layer must be a positive integer {GPT2_LIMITS}, got [12] (list)"),
        ({"n_inner": "x"}, "n_inner must be a positive integer (at most 10000000), got 'x' (str)"),
        (
            {"layer_norm_epsilon": "x"},
            "layer_norm_epsilon must be a number from 0 to 1, got 'x' (str)",
        ),
        (
            {"layer_norm_epsilon": float("nan")},
            "layer_norm_epsilon must be a number from 0 to 1, got nan (float)",
        ),
        ({"activation_function": 3}, "activation_function must be a string, got 3 (int)"),
        ({"scale_attn_weights": 1}, "scale_attn_weights must be true or false, got 1 (int)"),
        ({"model_type": ["gpt2"]}, "model_type must be a string, got ['gpt2'] (list)"),
        (
            {"n_layer": 100_000_000},
            f"n_layer must be a positive integer {GPT2_LIMITS}, got 100000000 (int)",
        ),
        (
            {"n_embd": 10**12, "n_head": 1},
            "n_embd must be a positive integer (at most 1000000), got 1000000000000 (int)",
        ),
        (
            {"vocab_size": 10**8},
            "vocab_size must be a positive integer (at most 10000000), got 100000000 (int)",
        ),
        (
            {"n_positions": 10**8},
            "n_positions must be a positive integer (at most 10000000), got 100000000 (int)",
        ),
    ],
)
def test_bad_config_values(cfg, message):
    """Each bad value is one ValueError line naming the key, what it got and what it wants."""
    with pytest.raises(ValueError) as info:
        config_from_hf({"model_type": "gpt2", **cfg})
    assert type(info.value) is ValueError
    assert str(info.value).startswith("config_from_hf: " + message)
    assert "\n" not in str(info.value)


def test_transformers_errors_become_one_value_error_line(monkeypatch):
    """Whatever transformers raises on keys lowrank does not read (its strict dataclass
    errors are neither ValueError nor one line) becomes one ValueError line.
    """
    from transformers import GPT2Config

    class StrictError(Exception):
        pass

    def from_dict(data):
        raise StrictError("Validation error for field 'bos_token_id':\n    TypeError: not int")

    monkeypatch.setattr(GPT2Config, "from_dict", from_dict)
    with pytest.raises(ValueError) as info:
        config_from_hf({"model_type": "gpt2", "bos_token_id": "x"})
    assert type(info.value) is ValueError
    assert str(info.value) == (
        "config_from_hf: transformers rejects the config (StrictError: Validation error for "
        "field 'bos_token_id': TypeError: not int)"
    )


ARCH_MESSAGE = "config_from_hf: architectures must be a list of strings such as ['GPT2LMHeadModel']"


@pytest.mark.parametrize(
    "architectures, got",
    [
        ("GPT2LMHeadModel", "'GPT2LMHeadModel' (str)"),
        ({"GPT2LMHeadModel": 1}, "{'GPT2LMHeadModel': 1} (dict)"),
        ([1], "[1] (list)"),
        ([["GPT2LMHeadModel"]], "[['GPT2LMHeadModel']] (list)"),
    ],
)
def test_architectures_must_be_a_list_of_strings(architectures, got):
    with pytest.raises(ValueError) as info:
        config_from_hf({"architectures": architectures, "model_type": "gpt2"})
    assert type(info.value) is ValueError
    assert str(info.value) == f"{ARCH_MESSAGE}, got {got}"


NEO_TYPES = (
    "config_from_hf: attention_types must be a list of [[kind, ...], repeat] pairs with kinds "
    "'global' or 'local', got "
)


@pytest.mark.parametrize(
    "cfg, message",
    [
        (
            {"num_layers": 100_000_000, "attention_types": [[["global"], 100_000_000]]},
            "config_from_hf: num_layers must be a positive integer (at most 10000), "
            "got 100000000 (int)",
        ),
        (
            {"attention_types": [[["global", "local"], 50_000_000]]},
            "config_from_hf: attention_types describes more than 10000 layers",
        ),
        (
            {"num_layers": 3, "attention_types": [[["global"], 2]]},
            "config_from_hf: attention_types describes 2 layers, but num_layers is 3",
        ),
        ({"attention_types": "global"}, NEO_TYPES + "'global' (str)"),
        ({"attention_types": [[["sliding"], 2]]}, NEO_TYPES + "[[['sliding'], 2]] (list)"),
        ({"attention_types": [[["global"], "2"]]}, NEO_TYPES + "[[['global'], '2']] (list)"),
    ],
)
def test_bad_gpt_neo_attention_types(cfg, message):
    with pytest.raises(ValueError) as info:
        config_from_hf({"model_type": "gpt_neo", **cfg})
    assert type(info.value) is ValueError
    assert str(info.value) == message


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "cfg",
    [
        {"model_type": "gpt2", "n_layer": 100_000_000},
        {"model_type": "gpt_neo", "num_layers": 10**8, "attention_types": [[["local"], 10**8]]},
    ],
)
def test_absurd_sizes_fail_fast(cfg):
    """No per-layer structure is built before the bound is checked."""
    import time

    start = time.perf_counter()
    with pytest.raises(ValueError, match="must be a positive integer"):
        config_from_hf(cfg)
    from transformers import GPT2Config

    with pytest.raises(ValueError, match=r"n_layer must be a positive integer \(at most 10000\)"):
        config_from_hf(GPT2Config(n_layer=100_000_000))  # a transformers object too
    with pytest.raises(ValueError, match=r"n_layers must be a positive integer \(at most 10000\)"):
        ModelConfig(
            architecture="GPT2LMHeadModel",
            **dict(n_layers=10**8, n_heads=1, d_model=8, d_head=8, d_mlp=8, d_vocab=8, n_ctx=8),
        )
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "text, message",
    [
        ("[" * 100_000 + "]" * 100_000, "is nested too deeply to be a config"),
        ('{"n_layer": ' + "9" * 5000 + "}", "is not valid JSON (Exceeds the limit"),
        ("[1, 2]", "must hold a JSON object, got a list"),
        ('"gpt2"', "must hold a JSON object, got a str"),
        ("null", "must hold a JSON object, got a NoneType"),
    ],
)
def test_bad_config_files(tmp_path, text, message):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError) as info:
        config_from_hf(tmp_path)
    assert type(info.value) is ValueError
    assert str(info.value).startswith(f"config_from_hf: '{tmp_path / 'config.json'}' {message}")
    assert "\n" not in str(info.value)
