"""HF state dict -> canonical tree, for every family: layout, TransformerLens parity, keys, errors.

Each test runs once per family through the ``checkpoint`` fixture; what differs between the
families (written out by hand, independently of lowrank's tables) is in :data:`FAMILIES`.
Checks of one family's storage layout by hand are in ``test_gpt2.py`` and ``test_gpt_neo.py``.
"""

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    GPT2_FAMILY,
    GPT_NEO_FAMILY,
    canonical_shapes,
    flatten,
    hf_numpy_state_dict,
    published_config,
    tl_converted,
)

from lowrank.models import (
    CheckpointError,
    config_from_hf,
    convert_gpt2_state_dict,
    convert_gpt_neo_state_dict,
    init_params,
)


def abstract_hf_gpt2(L: int, d: int) -> dict[str, tuple[int, ...]]:
    """HF GPT-2 per-layer tensor shapes (Conv1D [in, out])."""
    shapes = {}
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
    return shapes


def abstract_hf_gpt_neo(L: int, d: int) -> dict[str, tuple[int, ...]]:
    """HF GPT-Neo per-layer tensor shapes (nn.Linear [out, in])."""
    shapes = {}
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
    return shapes


@dataclasses.dataclass(frozen=True)
class Family:
    """What one family's tests expect of its converter and of the conftest checkpoint."""

    convert: Callable[..., Any]
    name: str  # as messages name it
    other: str  # another family's model_type, for the wrong-family error
    n_layers: int  # of the conftest checkpoint
    unstored: tuple[str, ...]  # leaves the checkpoint does not hold: zeros in the tree
    buffers: dict[str, Any]  # mask buffers, keys without prefix, that are ignored
    missing: tuple[str, tuple[int, ...]]  # a required key (no prefix) and its shape
    unexpected: str  # a key the family does not store
    wrong_shape: tuple[str, tuple[int, ...], tuple[int, ...]]  # key, given, expected
    published: dict[str, dict[str, int]]  # published sizes, as conftest names them
    sizes: Callable[[dict[str, int]], tuple[int, int, int]]  # published -> (L, H, d)
    n_ctx: int  # of the published models
    abstract_layers: Callable[[int, int], dict[str, tuple[int, ...]]]


FAMILIES = {
    "gpt2": Family(
        convert=convert_gpt2_state_dict,
        name="GPT-2",
        other="gpt_neo",
        n_layers=3,
        unstored=("unembed.b_U",),
        buffers={
            "h.0.attn.bias": np.tril(np.ones((1, 1, 24, 24), np.float32)),
            "h.2.attn.masked_bias": np.array(-1e4, np.float32),
        },
        missing=("h.2.mlp.c_fc.bias", (128,)),
        unexpected="transformer.h.0.attn.rotary.weight",
        wrong_shape=("transformer.h.1.attn.c_attn.weight", (32, 48), (32, 96)),
        published=GPT2_FAMILY,
        sizes=lambda p: (p["n_layer"], p["n_head"], p["n_embd"]),
        n_ctx=1024,
        abstract_layers=abstract_hf_gpt2,
    ),
    "gpt_neo": Family(
        convert=convert_gpt_neo_state_dict,
        name="GPT-Neo",
        other="gpt2",
        n_layers=4,
        unstored=("blocks.attn.b_Q", "blocks.attn.b_K", "blocks.attn.b_V", "unembed.b_U"),
        buffers={
            "h.1.attn.attention.bias": np.ones((1, 1, 24, 24), bool),
            "h.1.attn.attention.masked_bias": np.array(-1e9, np.float32),
        },
        missing=("h.3.attn.attention.v_proj.weight", (32, 32)),
        unexpected="transformer.h.0.attn.attention.q_proj.bias",  # GPT-Neo has no q/k/v bias
        wrong_shape=("transformer.h.0.mlp.c_fc.weight", (32, 128), (128, 32)),
        published=GPT_NEO_FAMILY,
        sizes=lambda p: (p["num_layers"], p["num_heads"], p["hidden_size"]),
        n_ctx=2048,
        abstract_layers=abstract_hf_gpt_neo,
    ),
}


@pytest.fixture(scope="module")
def family(checkpoint):
    return FAMILIES[checkpoint.family]


@pytest.fixture(scope="module")
def config(checkpoint):
    return config_from_hf(checkpoint.path)


@pytest.fixture(scope="module")
def state_dict(checkpoint):
    return hf_numpy_state_dict(checkpoint)


def assert_trees_equal(a, b):
    a, b = flatten(a), flatten(b)
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_layout_and_zero_leaves(family, config, state_dict):
    tree = flatten(family.convert(state_dict, config))
    want = canonical_shapes(family.n_layers, 4, 32, 8, 128, 101, 24)
    assert {k: v.shape for k, v in tree.items()} == want
    for key in family.unstored:
        assert not tree[key].any(), key
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in tree.values())


def test_matches_transformer_lens_conversion(checkpoint, family, config, state_dict):
    tl = tl_converted(checkpoint)
    for key, ours in flatten(family.convert(state_dict, config)).items():
        if key not in tl and key in family.unstored:  # TL 3.9 fills GPT-2's b_U with zeros later
            np.testing.assert_array_equal(ours, np.zeros(ours.shape, np.float32), err_msg=key)
        else:
            np.testing.assert_array_equal(ours, tl[key], err_msg=key)


def test_keys_without_prefix_and_mask_buffers(family, config, state_dict):
    plain = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
    plain.update(family.buffers)
    assert_trees_equal(family.convert(state_dict, config), family.convert(plain, config))


def test_torch_tensors_as_values(checkpoint, family, config, state_dict):
    assert_trees_equal(
        family.convert(state_dict, config),
        family.convert(checkpoint.hf_model.state_dict(), config),
    )


def test_tied_and_untied_unembedding(family, config, state_dict):
    tied = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    tree = family.convert(tied, config)
    np.testing.assert_array_equal(tree["unembed"]["W_U"], tree["embed"]["W_E"].T)
    assert_trees_equal(tree, family.convert(state_dict, config))  # the checkpoint is tied
    untied = dict(tied, **{"lm_head.weight": np.full((101, 32), 2.0, np.float32)})
    tree = family.convert(untied, config)
    np.testing.assert_array_equal(tree["unembed"]["W_U"], np.full((32, 101), 2.0))
    assert not np.shares_memory(tree["unembed"]["W_U"], tree["embed"]["W_E"])


def test_dtype_cast(family, config, state_dict):
    tree = flatten(family.convert(state_dict, config, dtype=jnp.bfloat16))
    assert {v.dtype for v in tree.values()} == {np.dtype(jnp.bfloat16)}


def test_missing_key(family, config, state_dict):
    key, shape = family.missing
    sd = {k: v for k, v in state_dict.items() if k != "transformer." + key}
    message = f"{family.name} state dict: missing key '{key}' (expected shape {shape})"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        family.convert(sd, config)


def test_unexpected_key(family, config, state_dict):
    sd = dict(state_dict, **{family.unexpected: np.zeros(32)})
    with pytest.raises(CheckpointError, match=re.escape(f"unexpected key '{family.unexpected}'")):
        family.convert(sd, config)
    extra_layer = f"transformer.h.{family.n_layers}.ln_1.weight"
    sd = dict(state_dict, **{extra_layer: np.zeros(32)})
    with pytest.raises(CheckpointError, match=re.escape(f"unexpected key '{extra_layer}'")):
        family.convert(sd, config)


def test_wrong_shape(family, config, state_dict):
    key, given, expected = family.wrong_shape
    sd = dict(state_dict, **{key: np.zeros(given, np.float32)})
    message = f"'{key}' has shape {given}, expected {expected}"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        family.convert(sd, config)


def test_duplicate_key(family, config, state_dict):
    sd = dict(state_dict, **{"wte.weight": state_dict["transformer.wte.weight"]})
    with pytest.raises(CheckpointError, match="'wte.weight' appears twice"):
        family.convert(sd, config)


def test_wrong_family(family, state_dict):
    other = config_from_hf({"model_type": family.other})
    with pytest.raises(ValueError, match=f"not {family.name}"):
        family.convert(state_dict, other)


@pytest.mark.parametrize(
    "family_name, name", [(f, n) for f, family in FAMILIES.items() for n in family.published]
)
def test_published_sizes_abstract(family_name, name):
    """Real-size trees, never materialised: converter and linen init agree on every shape."""
    family = FAMILIES[family_name]
    L, H, d = family.sizes(family.published[name])
    V, n_ctx = 50257, family.n_ctx
    config = config_from_hf(published_config(name))
    want = canonical_shapes(L, H, d, d // H, 4 * d, V, n_ctx)
    shapes = {
        "transformer.wte.weight": (V, d),
        "transformer.wpe.weight": (n_ctx, d),
        **family.abstract_layers(L, d),
        "transformer.ln_f.weight": (d,),
        "transformer.ln_f.bias": (d,),
    }
    abstract = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
    converted = jax.eval_shape(lambda sd: family.convert(sd, config), abstract)
    assert {k: v.shape for k, v in flatten(converted).items()} == want
    initialised = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
    assert {k: v.shape for k, v in flatten(initialised).items()} == want
