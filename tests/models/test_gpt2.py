"""GPT-2 state dict -> canonical tree: layout, TransformerLens parity, key handling, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    GPT2_FAMILY,
    canonical_shapes,
    flatten,
    hf_numpy_state_dict,
    published_config,
    tl_config,
)

from lowrank.models import (
    CheckpointError,
    config_from_hf,
    convert_gpt2_state_dict,
    init_params,
)


@pytest.fixture(scope="module")
def config(gpt2_checkpoint):
    return config_from_hf(gpt2_checkpoint.path)


@pytest.fixture(scope="module")
def state_dict(gpt2_checkpoint):
    return hf_numpy_state_dict(gpt2_checkpoint)


def test_layout(config, state_dict):
    tree = flatten(convert_gpt2_state_dict(state_dict, config))
    want = canonical_shapes(3, 4, 32, 8, 128, 101, 24)
    assert {k: v.shape for k, v in tree.items()} == want
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in tree.values())


def test_matches_transformer_lens_conversion(gpt2_checkpoint, config, state_dict):
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    tl = convert_gpt2_weights(gpt2_checkpoint.hf_model, tl_config(gpt2_checkpoint))
    tree = flatten(convert_gpt2_state_dict(state_dict, config))
    for key, ours in tree.items():
        if key.startswith("blocks."):
            rest = key[len("blocks.") :]
            ref = np.stack([tl[f"blocks.{i}.{rest}"].detach().numpy() for i in range(3)])
        elif key == "unembed.b_U":  # TransformerLens fills the missing GPT-2 b_U with zeros
            ref = np.zeros(101, np.float32)
        else:
            ref = tl[key].detach().numpy()
        np.testing.assert_array_equal(ours, ref, err_msg=key)


def test_qkv_split_by_hand(config, state_dict):
    """Head 2's keys are columns d + 2*dh : d + 3*dh of the fused Conv1D c_attn."""
    tree = convert_gpt2_state_dict(state_dict, config)
    c_attn = state_dict["transformer.h.1.attn.c_attn.weight"]
    np.testing.assert_array_equal(tree["blocks"]["attn"]["W_K"][1, 2], c_attn[:, 32 + 16 : 32 + 24])
    c_proj = state_dict["transformer.h.1.attn.c_proj.weight"]
    np.testing.assert_array_equal(tree["blocks"]["attn"]["W_O"][1, 3], c_proj[24:32])


def test_prefix_buffers_and_torch_values(gpt2_checkpoint, config, state_dict):
    """Keys without 'transformer.', the old mask buffers, and torch tensors as values."""
    plain = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
    plain["h.0.attn.bias"] = np.tril(np.ones((1, 1, 24, 24), np.float32))
    plain["h.2.attn.masked_bias"] = np.array(-1e4, np.float32)
    a = flatten(convert_gpt2_state_dict(state_dict, config))
    b = flatten(convert_gpt2_state_dict(plain, config))
    c = flatten(convert_gpt2_state_dict(gpt2_checkpoint.hf_model.state_dict(), config))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_array_equal(a[key], c[key])


def test_tied_and_untied_unembedding(config, state_dict):
    tied = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    tree = convert_gpt2_state_dict(tied, config)
    np.testing.assert_array_equal(tree["unembed"]["W_U"], tree["embed"]["W_E"].T)
    untied = dict(state_dict, **{"lm_head.weight": np.ones((101, 32), np.float32)})
    tree = convert_gpt2_state_dict(untied, config)
    np.testing.assert_array_equal(tree["unembed"]["W_U"], np.ones((32, 101)))
    assert not np.shares_memory(tree["unembed"]["W_U"], tree["embed"]["W_E"])


def test_dtype_cast(config, state_dict):
    tree = flatten(convert_gpt2_state_dict(state_dict, config, dtype=jnp.bfloat16))
    assert {v.dtype for v in tree.values()} == {np.dtype(jnp.bfloat16)}


def test_missing_key(config, state_dict):
    sd = {k: v for k, v in state_dict.items() if k != "transformer.h.2.mlp.c_fc.bias"}
    with pytest.raises(
        CheckpointError,
        match=r"missing key 'h\.2\.mlp\.c_fc\.bias' "
        r"\(expected shape \(128,\)\)",
    ):
        convert_gpt2_state_dict(sd, config)


def test_unexpected_key(config, state_dict):
    sd = dict(state_dict, **{"transformer.h.0.attn.rotary.weight": np.zeros(3)})
    with pytest.raises(CheckpointError, match="unexpected key 'transformer.h.0.attn.rotary"):
        convert_gpt2_state_dict(sd, config)
    sd = dict(state_dict, **{"transformer.h.3.ln_1.weight": np.zeros(32)})  # a 4th layer
    with pytest.raises(CheckpointError, match=r"unexpected key 'transformer\.h\.3\.ln_1"):
        convert_gpt2_state_dict(sd, config)


def test_wrong_shape(config, state_dict):
    sd = dict(state_dict)
    sd["transformer.h.1.attn.c_attn.weight"] = np.zeros((32, 48), np.float32)
    with pytest.raises(
        CheckpointError,
        match=r"'transformer\.h\.1\.attn\.c_attn\.weight' has "
        r"shape \(32, 48\), expected \(32, 96\)",
    ):
        convert_gpt2_state_dict(sd, config)


def test_duplicate_key(config, state_dict):
    sd = dict(state_dict, **{"wte.weight": state_dict["transformer.wte.weight"]})
    with pytest.raises(CheckpointError, match="'wte.weight' appears twice"):
        convert_gpt2_state_dict(sd, config)


def test_wrong_family(gpt_neo_checkpoint, state_dict):
    with pytest.raises(ValueError, match="not GPT-2"):
        convert_gpt2_state_dict(state_dict, config_from_hf(gpt_neo_checkpoint.path))


def abstract_hf_gpt2(L: int, d: int, V: int, n_ctx: int) -> dict:
    """HF GPT-2 tensor shapes (Conv1D [in, out]), written out by hand."""
    shapes = {
        "transformer.wte.weight": (V, d),
        "transformer.wpe.weight": (n_ctx, d),
        "transformer.ln_f.weight": (d,),
        "transformer.ln_f.bias": (d,),
    }
    for i in range(L):
        p = f"transformer.h.{i}."
        shapes.update(
            {
                p + "ln_1.weight": (d,),
                p + "ln_1.bias": (d,),
                p + "attn.c_attn.weight": (d, 3 * d),
                p + "attn.c_attn.bias": (3 * d,),
                p + "attn.c_proj.weight": (d, d),
                p + "attn.c_proj.bias": (d,),
                p + "ln_2.weight": (d,),
                p + "ln_2.bias": (d,),
                p + "mlp.c_fc.weight": (d, 4 * d),
                p + "mlp.c_fc.bias": (4 * d,),
                p + "mlp.c_proj.weight": (4 * d, d),
                p + "mlp.c_proj.bias": (d,),
            }
        )
    return {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}


@pytest.mark.parametrize("name", list(GPT2_FAMILY))
def test_published_sizes_abstract(name):
    """Real-size trees, never materialised: converter and linen init agree on every shape."""
    p = GPT2_FAMILY[name]
    L, H, d = p["n_layer"], p["n_head"], p["n_embd"]
    config = config_from_hf(published_config(name))
    want = canonical_shapes(L, H, d, d // H, 4 * d, 50257, 1024)
    converted = jax.eval_shape(
        lambda sd: convert_gpt2_state_dict(sd, config), abstract_hf_gpt2(L, d, 50257, 1024)
    )
    assert {k: v.shape for k, v in flatten(converted).items()} == want
    initialised = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
    assert {k: v.shape for k, v in flatten(initialised).items()} == want
