"""GPT-Neo state dict -> canonical tree: layout, TransformerLens parity, key handling, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    GPT_NEO_FAMILY,
    canonical_shapes,
    flatten,
    hf_numpy_state_dict,
    published_config,
    tl_config,
)

from lowrank.models import (
    CheckpointError,
    config_from_hf,
    convert_gpt_neo_state_dict,
    init_params,
)


@pytest.fixture(scope="module")
def config(gpt_neo_checkpoint):
    return config_from_hf(gpt_neo_checkpoint.path)


@pytest.fixture(scope="module")
def state_dict(gpt_neo_checkpoint):
    return hf_numpy_state_dict(gpt_neo_checkpoint)


def test_layout_and_zero_biases(config, state_dict):
    tree = flatten(convert_gpt_neo_state_dict(state_dict, config))
    assert {k: v.shape for k, v in tree.items()} == canonical_shapes(4, 4, 32, 8, 128, 101, 24)
    for key in ("blocks.attn.b_Q", "blocks.attn.b_K", "blocks.attn.b_V", "unembed.b_U"):
        assert not tree[key].any(), key
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in tree.values())


def test_matches_transformer_lens_conversion(gpt_neo_checkpoint, config, state_dict):
    from transformer_lens.pretrained.weight_conversions.neo import convert_neo_weights

    tl = convert_neo_weights(gpt_neo_checkpoint.hf_model, tl_config(gpt_neo_checkpoint))
    for key, ours in flatten(convert_gpt_neo_state_dict(state_dict, config)).items():
        if key.startswith("blocks."):
            rest = key[len("blocks.") :]
            ref = np.stack([tl[f"blocks.{i}.{rest}"].detach().numpy() for i in range(4)])
        else:
            ref = tl[key].detach().numpy()
        np.testing.assert_array_equal(ours, ref, err_msg=key)


def test_linear_layout_by_hand(config, state_dict):
    """nn.Linear stores [out, in]: head 1's queries are rows dh : 2*dh of q_proj."""
    tree = convert_gpt_neo_state_dict(state_dict, config)
    q_proj = state_dict["transformer.h.2.attn.attention.q_proj.weight"]
    np.testing.assert_array_equal(tree["blocks"]["attn"]["W_Q"][2, 1], q_proj[8:16].T)
    c_fc = state_dict["transformer.h.3.mlp.c_fc.weight"]
    np.testing.assert_array_equal(tree["blocks"]["mlp"]["W_in"][3], c_fc.T)


def test_prefix_buffers_and_lm_head(config, state_dict):
    plain = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
    plain["h.1.attn.attention.bias"] = np.ones((1, 1, 24, 24), bool)
    plain["h.1.attn.attention.masked_bias"] = np.array(-1e9, np.float32)
    plain.pop("lm_head.weight", None)
    a = flatten(convert_gpt_neo_state_dict(state_dict, config))
    b = flatten(convert_gpt_neo_state_dict(plain, config))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    untied = dict(plain, **{"lm_head.weight": np.full((101, 32), 2.0, np.float32)})
    W_U = convert_gpt_neo_state_dict(untied, config)["unembed"]["W_U"]
    np.testing.assert_array_equal(W_U, np.full((32, 101), 2.0))


def test_errors(config, state_dict):
    sd = {k: v for k, v in state_dict.items() if "h.3.attn.attention.v_proj" not in k}
    with pytest.raises(
        CheckpointError,
        match=r"missing key 'h\.3\.attn\.attention\.v_proj"
        r"\.weight' \(expected shape \(32, 32\)\)",
    ):
        convert_gpt_neo_state_dict(sd, config)
    sd = dict(state_dict, **{"transformer.h.0.attn.attention.q_proj.bias": np.zeros(32)})
    with pytest.raises(
        CheckpointError, match="unexpected key 'transformer.h.0.attn.attention.q_proj.bias'"
    ):
        convert_gpt_neo_state_dict(sd, config)
    sd = dict(state_dict, **{"transformer.h.0.mlp.c_fc.weight": np.zeros((32, 128))})
    with pytest.raises(
        CheckpointError,
        match=r"'transformer\.h\.0\.mlp\.c_fc\.weight' has "
        r"shape \(32, 128\), expected \(128, 32\)",
    ):
        convert_gpt_neo_state_dict(sd, config)
    gpt2 = config_from_hf({"model_type": "gpt2", "n_layer": 1})
    with pytest.raises(ValueError, match="not GPT-Neo"):
        convert_gpt_neo_state_dict(state_dict, gpt2)


def abstract_hf_gpt_neo(L: int, d: int, V: int, n_ctx: int) -> dict:
    """HF GPT-Neo tensor shapes (nn.Linear [out, in]), written out by hand."""
    shapes = {
        "transformer.wte.weight": (V, d),
        "transformer.wpe.weight": (n_ctx, d),
        "transformer.ln_f.weight": (d,),
        "transformer.ln_f.bias": (d,),
    }
    for i in range(L):
        p = f"transformer.h.{i}."
        a = p + "attn.attention."
        shapes.update(
            {
                p + "ln_1.weight": (d,),
                p + "ln_1.bias": (d,),
                a + "q_proj.weight": (d, d),
                a + "k_proj.weight": (d, d),
                a + "v_proj.weight": (d, d),
                a + "out_proj.weight": (d, d),
                a + "out_proj.bias": (d,),
                p + "ln_2.weight": (d,),
                p + "ln_2.bias": (d,),
                p + "mlp.c_fc.weight": (4 * d, d),
                p + "mlp.c_fc.bias": (4 * d,),
                p + "mlp.c_proj.weight": (d, 4 * d),
                p + "mlp.c_proj.bias": (d,),
            }
        )
    return {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}


@pytest.mark.parametrize("name", list(GPT_NEO_FAMILY))
def test_published_sizes_abstract(name):
    p = GPT_NEO_FAMILY[name]
    L, H, d = p["num_layers"], p["num_heads"], p["hidden_size"]
    config = config_from_hf(published_config(name))
    want = canonical_shapes(L, H, d, d // H, 4 * d, 50257, 2048)
    converted = jax.eval_shape(
        lambda sd: convert_gpt_neo_state_dict(sd, config), abstract_hf_gpt_neo(L, d, 50257, 2048)
    )
    assert {k: v.shape for k, v in flatten(converted).items()} == want
    initialised = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
    assert {k: v.shape for k, v in flatten(initialised).items()} == want
