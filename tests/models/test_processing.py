"""Weight processing: parity with TransformerLens 3.9.0 for all flag combinations, invariance."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import flatten, tl_stacked

from lowrank.models import (
    center_unembed,
    center_writing_weights,
    fold_layer_norm,
    fold_value_biases,
    forward,
    is_layer_norm_folded,
    process_params,
    refactor_factored_attn_matrices,
)

FLAGS = list(itertools.product([False, True], repeat=4))


def flag_id(flags):
    names = ("fold_ln", "center_writing", "center_unembed", "fold_value_biases")
    return "-".join(n for n, on in zip(names, flags, strict=True) if on) or "none"


_forward = jax.jit(forward, static_argnames="config")


def log_probs(params, tokens, config):
    return np.asarray(jax.nn.log_softmax(_forward(params, tokens, config=config), axis=-1))


@pytest.mark.parametrize("flags", FLAGS, ids=[flag_id(f) for f in FLAGS])
def test_matches_transformer_lens(checkpoint, converted, tl_model, flags):
    fold_ln, center_writing, center_u, fold_vb = flags
    _, params = converted[checkpoint.family]
    ours = flatten(
        process_params(
            params,
            fold_ln=fold_ln,
            center_writing_weights=center_writing,
            center_unembed=center_u,
            fold_value_biases=fold_vb,
        )
    )
    ref = tl_stacked(tl_model(checkpoint, *flags))
    assert set(ours) == set(ref)
    for key in ref:
        assert ours[key].shape == ref[key].shape, key
        np.testing.assert_allclose(ours[key], ref[key], rtol=0, atol=1e-5, err_msg=key)


STEPS = [
    fold_layer_norm,
    center_writing_weights,
    center_unembed,
    fold_value_biases,
    refactor_factored_attn_matrices,
]


def test_each_step_keeps_log_probs(checkpoint, converted, tokens):
    """Every step alone, and all in sequence, leave the log-probabilities unchanged."""
    config, params = converted[checkpoint.family]
    ref = log_probs(params, tokens, config)
    chained = params
    for step in STEPS:
        np.testing.assert_allclose(
            log_probs(step(params), tokens, config), ref, atol=1e-4, err_msg=step.__name__
        )
        chained = step(chained)
    np.testing.assert_allclose(log_probs(chained, tokens, config), ref, atol=1e-4)


def test_center_unembed_shifts_logits(converted, tokens):
    config, params = converted["gpt2"]
    centred = center_unembed(params)
    assert np.abs(centred["unembed"]["W_U"].mean(-1)).max() < 1e-6
    a = np.asarray(_forward(params, tokens, config=config))
    b = np.asarray(_forward(centred, tokens, config=config))
    np.testing.assert_allclose(b, a - a.mean(-1, keepdims=True), atol=1e-4)


def test_fold_marks_tree_and_refuses_twice(converted):
    _, params = converted["gpt2"]
    assert not is_layer_norm_folded(params)
    folded = fold_layer_norm(params)
    assert is_layer_norm_folded(folded)
    assert "ln_final" not in folded and "ln1" not in folded["blocks"]
    assert "ln2" not in folded["blocks"]
    with pytest.raises(ValueError, match="already folded"):
        fold_layer_norm(folded)
    with pytest.raises(ValueError, match="already folded"):
        process_params(folded)
    mixed = dict(folded, ln_final=params["ln_final"])
    with pytest.raises(ValueError, match="LayerNorm entries.*but not"):
        is_layer_norm_folded(mixed)
    # The idempotent steps may run again.
    once = flatten(process_params(params))
    twice = flatten(process_params(process_params(params), fold_ln=False))
    for key in once:
        np.testing.assert_allclose(twice[key], once[key], atol=1e-6, err_msg=key)


def test_inputs_not_modified(converted):
    _, params = converted["gpt_neo"]
    before = {k: v.copy() for k, v in flatten(params).items()}
    process_params(params, refactor_factored_attn_matrices=True)
    for step in STEPS:
        step(params)
    for key, value in flatten(params).items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)


def test_jax_arrays_under_jit(converted):
    """Processing also runs on device arrays, jitted, with the same results."""
    _, params = converted["gpt2"]
    on_device = jax.tree_util.tree_map(jnp.asarray, params)
    jitted = flatten(jax.jit(process_params)(on_device))
    host = flatten(process_params(params))
    assert all(isinstance(v, jax.Array) for v in jitted.values())
    for key in host:
        np.testing.assert_allclose(np.asarray(jitted[key]), host[key], atol=1e-6, err_msg=key)


def test_vmap_over_models(converted):
    """Two models stacked on a new leading axis are processed independently."""
    _, params = converted["gpt_neo"]
    other = jax.tree_util.tree_map(lambda x: x * 1.5, params)
    pair = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), params, other)
    out = flatten(jax.vmap(process_params)(pair))
    for i, single in enumerate((params, other)):
        ref = flatten(process_params(single))
        for key in ref:
            np.testing.assert_allclose(np.asarray(out[key][i]), ref[key], atol=1e-5, err_msg=key)


def test_low_precision_processed_in_float32(converted):
    _, params = converted["gpt2"]
    half = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    out = flatten(process_params(half))
    assert {v.dtype for v in out.values()} == {np.dtype(jnp.bfloat16)}
    ref = flatten(process_params(jax.tree_util.tree_map(lambda x: x.astype(np.float32), half)))
    for key in ref:
        np.testing.assert_array_equal(out[key], ref[key].astype(jnp.bfloat16), err_msg=key)


def _qk_ov(flat):
    """Bias-extended QK, OV products and b_O: what refactoring must preserve."""
    q = np.concatenate([flat["blocks.attn.W_Q"], flat["blocks.attn.b_Q"][..., None, :]], -2)
    k = np.concatenate([flat["blocks.attn.W_K"], flat["blocks.attn.b_K"][..., None, :]], -2)
    ov = np.asarray(flat["blocks.attn.W_V"], np.float64) @ flat["blocks.attn.W_O"]
    return q.astype(np.float64) @ np.swapaxes(k, -1, -2), ov, flat["blocks.attn.b_O"]


def test_refactor_matches_transformer_lens(checkpoint, converted, tl_model):
    """Singular-vector signs are arbitrary, so compare the products and the structure."""
    _, params = converted[checkpoint.family]
    ours = flatten(process_params(params, refactor_factored_attn_matrices=True))
    ref = tl_stacked(tl_model(checkpoint, True, True, True, True, refactor=True))
    for a, b in zip(_qk_ov(ours), _qk_ov(ref), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    W_O = ours["blocks.attn.W_O"]
    np.testing.assert_allclose(
        W_O @ np.swapaxes(W_O, -1, -2),
        np.broadcast_to(np.eye(8), (W_O.shape[0], 4, 8, 8)),
        atol=1e-5,
    )
    assert not ours["blocks.attn.b_V"].any()
    # Query and key factors carry equal halves of the singular values.
    q_norms = np.linalg.norm(
        np.concatenate([ours["blocks.attn.W_Q"], ours["blocks.attn.b_Q"][..., None, :]], -2),
        axis=-2,
    )
    k_norms = np.linalg.norm(
        np.concatenate([ours["blocks.attn.W_K"], ours["blocks.attn.b_K"][..., None, :]], -2),
        axis=-2,
    )
    np.testing.assert_allclose(q_norms, k_norms, rtol=1e-4)
    # The jax path (lowrank.svd) gives the same products.
    on_device = jax.tree_util.tree_map(jnp.asarray, params)
    refactor = jax.jit(functools.partial(process_params, refactor_factored_attn_matrices=True))
    dev = flatten(jax.tree_util.tree_map(np.asarray, refactor(on_device)))
    for a, b in zip(_qk_ov(dev), _qk_ov(ours), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_not_a_tree():
    with pytest.raises(ValueError, match="center_unembed: params has no entry 'unembed.W_U'"):
        center_unembed({"embed": {}})
