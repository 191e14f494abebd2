"""Layout tables and the shared conversion path: the parts no family table uses yet."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import flatten, hf_numpy_state_dict

from lowrank.models import config_from_hf, convert_gpt2_state_dict
from lowrank.models._common import dotted_path, lookup, updated
from lowrank.models.conversion import convert
from lowrank.models.gpt2 import GPT2_LAYOUT
from lowrank.models.layout import ZEROS, Split, Tensor, state_dict_shapes


def test_split_contiguous_blocks():
    x = np.arange(2 * 12).reshape(2, 12)  # columns [a a a a | b b b b | c c c c]
    np.testing.assert_array_equal(Split(axis=1).part(x, 1, 3, d_head=2), x[:, 4:8])
    np.testing.assert_array_equal(Split(axis=-1).part(x, 2, 3, d_head=2), x[:, 8:12])


def test_split_per_head_interleaved():
    """GPT-NeoX's rows (head, part, d_head): part 1 of head h is rows 6h + 2 : 6h + 4."""
    x = np.arange(12 * 5).reshape(12, 5)  # 2 heads x 3 parts x d_head 2, then d_model 5
    want = np.concatenate([x[2:4], x[8:10]])
    split = Split(axis=0, per_head=True)
    np.testing.assert_array_equal(split.part(x, 1, 3, d_head=2), want)
    jitted = jax.jit(lambda y: split.part(y, 1, 3, d_head=2))
    np.testing.assert_array_equal(jitted(jnp.asarray(x)), want)
    np.testing.assert_array_equal(Split(axis=1, per_head=True).part(x.T, 1, 3, d_head=2), want.T)


@pytest.fixture(scope="module")
def gpt2(gpt2_checkpoint):
    return config_from_hf(gpt2_checkpoint.path), hf_numpy_state_dict(gpt2_checkpoint)


def test_optional_key_reads_as_zeros(gpt2):
    """A row with ``if_missing=ZEROS`` (Llama's optional biases): zeros when absent."""
    config, state_dict = gpt2
    tensors = tuple(
        dataclasses.replace(t, if_missing=ZEROS) if t.key == "h.{i}.attn.c_attn.bias" else t
        for t in GPT2_LAYOUT.tensors
    )
    layout = dataclasses.replace(GPT2_LAYOUT, tensors=tensors)
    assert "h.0.attn.c_attn.bias" in state_dict_shapes(layout, config, optional=True)
    full = convert_gpt2_state_dict(state_dict, config)
    flat = flatten(full)
    assert flatten(convert(layout, state_dict, config)).keys() == flat.keys()
    no_bias = {k: v for k, v in state_dict.items() if not k.endswith("c_attn.bias")}
    tree = flatten(convert(layout, no_bias, config))
    for key, value in tree.items():
        if key in ("blocks.attn.b_Q", "blocks.attn.b_K", "blocks.attn.b_V"):
            assert value.shape == flat[key].shape and value.dtype == np.float32
            assert not value.any()
        else:
            np.testing.assert_array_equal(value, flat[key], err_msg=key)


def test_tensor_rows_are_checked():
    with pytest.raises(ValueError, match="unknown size names"):
        Tensor("wte.weight", ("vocab", "d_model"), "embed.W_E")
    with pytest.raises(ValueError, match="a split goes with several leaves"):
        Tensor("h.{i}.attn.c_attn.bias", ("3*n_heads*d_head",), ("blocks.attn.b_Q", "b_K"))
    with pytest.raises(ValueError, match="a split goes with several leaves"):
        Tensor("h.{i}.ln_1.bias", ("d_model",), "blocks.ln1.b", split=Split(axis=0))


def test_tree_paths():
    tree = {"blocks": {"attn": {"W_Q": 1, "b_Q": 2}}, "embed": {"W_E": 3}}
    assert lookup(tree, "blocks.attn.W_Q") == 1 and lookup(tree, "blocks.attn.W_X") is None
    assert lookup(tree, "embed.W_E.x") is None
    new = updated(tree, {"blocks.attn.W_Q": 5, "unembed.W_U": 6}, remove=("embed.W_E",))
    assert new == {"blocks": {"attn": {"W_Q": 5, "b_Q": 2}}, "embed": {}, "unembed": {"W_U": 6}}
    assert tree == {"blocks": {"attn": {"W_Q": 1, "b_Q": 2}}, "embed": {"W_E": 3}}
    assert updated(tree, {"embed.W_E": 4})["blocks"] is tree["blocks"]  # untouched: shared
    paths = [dotted_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert paths == ["blocks.attn.W_Q", "blocks.attn.b_Q", "embed.W_E"]
