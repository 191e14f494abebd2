"""Forward pass: HF parity (GPT-2, GPT-Neo local windows), activations, jit/vmap, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import log_softmax
from conftest import build_gpt2, flatten, hf_logits, hf_numpy_state_dict

from lowrank.models import (
    config_from_hf,
    convert_state_dict,
    forward,
    init_params,
    process_params,
)
from lowrank.models.config import ACTIVATIONS
from lowrank.models.transformer import ACTIVATION_FNS

_forward = jax.jit(forward, static_argnames=("config", "return_activations"))


def test_logits_match_hf(checkpoint, converted, tokens):
    config, params = converted[checkpoint.family]
    ours = np.asarray(_forward(params, tokens, config=config))
    ref = hf_logits(checkpoint, tokens)
    assert ours.shape == ref.shape == (2, 17, 101)
    assert np.abs(ref).max() > 1.0  # non-trivial logits
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_processed_log_probs_match_hf(checkpoint, converted, tokens):
    config, params = converted[checkpoint.family]
    processed = process_params(params)  # fold LN, centre, fold value biases
    ours = np.asarray(_forward(processed, tokens, config=config))
    ref = hf_logits(checkpoint, tokens)
    np.testing.assert_allclose(log_softmax(ours), log_softmax(ref), rtol=0, atol=1e-4)
    np.testing.assert_allclose(ours, ref - ref.mean(-1, keepdims=True), rtol=0, atol=1e-4)


def test_activations_match_hf(checkpoint, converted, tokens):
    import torch

    config, params = converted[checkpoint.family]
    logits, acts = _forward(params, tokens, config=config, return_activations=True)
    with torch.no_grad():
        out = checkpoint.hf_model(
            torch.as_tensor(tokens, dtype=torch.long),
            output_hidden_states=True,
            output_attentions=True,
        )
    L = config.n_layers
    assert acts["resid_pre"].shape == (L, 2, 17, 32)
    assert acts["pattern"].shape == (L, 2, 4, 17, 17)
    for layer in range(L):
        np.testing.assert_allclose(
            acts["resid_pre"][layer], out.hidden_states[layer].numpy(), atol=1e-4
        )
        np.testing.assert_allclose(acts["pattern"][layer], out.attentions[layer].numpy(), atol=1e-5)
    np.testing.assert_allclose(acts["resid_post"][:-1], acts["resid_pre"][1:])
    np.testing.assert_allclose(logits, out.logits.numpy(), atol=1e-4)


def test_local_attention_window(converted, tokens):
    config, params = converted["gpt_neo"]
    _, acts = _forward(params, tokens, config=config, return_activations=True)
    pattern = np.asarray(acts["pattern"])
    q, k = np.indices((17, 17))
    causal = k <= q
    window = causal & (q - k < 5)
    for layer, kind in enumerate(config.attn_types):
        allowed = window if kind == "local" else causal
        assert not pattern[layer][..., ~allowed].any(), layer
        assert (pattern[layer][..., allowed] > 0).all(), layer
    np.testing.assert_allclose(pattern.sum(-1), 1.0, atol=1e-5)


def test_single_sequence(converted, tokens):
    config, params = converted["gpt_neo"]
    batch = np.asarray(_forward(params, tokens, config=config))
    single = np.asarray(_forward(params, tokens[1], config=config))
    np.testing.assert_allclose(single, batch[1], atol=1e-5)
    _, acts = _forward(params, tokens[1], config=config, return_activations=True)
    assert acts["resid_pre"].shape == (4, 17, 32) and acts["pattern"].shape == (4, 4, 17, 17)


def test_jit_and_vmap(converted, tokens):
    config, params = converted["gpt2"]
    eager = np.asarray(forward(params, tokens, config))
    jitted = np.asarray(_forward(params, tokens, config=config))
    np.testing.assert_allclose(jitted, eager, atol=1e-5)
    on_device = jax.tree_util.tree_map(jnp.asarray, params)
    per_seq = jax.vmap(lambda t: forward(on_device, t, config))(jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(per_seq), jitted, atol=1e-5)
    # vmap over parameters too: two copies of the model, one batch each.
    stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), on_device)
    both = jax.jit(jax.vmap(lambda p, t: forward(p, t, config)))(stacked, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(both), jitted, atol=1e-5)


def test_gradients_flow(converted, tokens):
    config, params = converted["gpt2"]

    def loss(p):
        logp = jax.nn.log_softmax(forward(p, tokens, config), axis=-1)
        return -jnp.take_along_axis(logp[:, :-1], jnp.asarray(tokens)[:, 1:, None], -1).mean()

    grads = flatten(jax.jit(jax.grad(loss))(jax.tree_util.tree_map(jnp.asarray, params)))
    assert all(bool(jnp.isfinite(g).all()) for g in grads.values())
    assert float(jnp.abs(grads["blocks.attn.W_Q"]).max()) > 0


@pytest.mark.parametrize(
    "overrides",
    [
        dict(scale_attn_by_inverse_layer_idx=True),
        dict(scale_attn_weights=False),
        dict(activation_function="gelu", n_inner=48),
    ],
    ids=["inverse-layer-scale", "no-scale", "gelu-n_inner"],
)
def test_gpt2_variants_match_hf(tmp_path, tokens, overrides):
    from conftest import Checkpoint

    model = build_gpt2(tmp_path, seed=3, n_layer=2, **overrides)
    ckpt = Checkpoint("gpt2", tmp_path, model)
    config = config_from_hf(tmp_path)
    params = convert_state_dict(hf_numpy_state_dict(ckpt), config)
    ours = np.asarray(forward(params, tokens, config))
    np.testing.assert_allclose(ours, hf_logits(ckpt, tokens), rtol=0, atol=1e-4)


def test_activation_functions_match_transformers():
    import torch
    from transformers.activations import ACT2FN

    assert set(ACTIVATION_FNS) == set(ACTIVATIONS)
    x = np.linspace(-6, 6, 101, dtype=np.float32)
    for name, fn in ACTIVATION_FNS.items():
        ref = ACT2FN[name](torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(np.asarray(fn(jnp.asarray(x))), ref, atol=1e-5, err_msg=name)


def test_init_params_and_bf16(converted, tokens):
    config, params = converted["gpt_neo"]
    rand = init_params(config, jax.random.key(0))
    assert {k: v.shape for k, v in flatten(rand).items()} == {
        k: v.shape for k, v in flatten(params).items()
    }
    assert _forward(rand, tokens, config=config).shape == (2, 17, 101)
    folded = jax.eval_shape(
        lambda k: init_params(config, k, ln_weights=False, dtype=jnp.bfloat16), jax.random.key(0)
    )
    assert "ln1" not in folded["blocks"] and "ln_final" not in folded
    assert folded["blocks"]["attn"]["W_Q"].dtype == jnp.bfloat16
    half = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    out = _forward(half, tokens, config=config)
    assert out.dtype == jnp.bfloat16
    full = np.asarray(_forward(params, tokens, config=config))
    assert np.abs(np.asarray(out, np.float32) - full).max() < 0.1 * np.abs(full).max()


def test_bad_tokens(converted, tokens):
    config, params = converted["gpt2"]
    with pytest.raises(TypeError, match="tokens must be an integer array"):
        forward(params, tokens.astype(np.float32), config)
    with pytest.raises(
        ValueError,
        match=r"tokens must have shape \[batch, seq\] or \[seq\], "
        r"got \(1, 2, 17\)",
    ):
        forward(params, tokens[None], config)
    long = np.zeros((1, 25), np.int32)
    with pytest.raises(ValueError, match=r"shape \(1, 25\).*n_ctx=24 positions"):
        forward(params, long, config)
    with pytest.raises(ValueError, match="empty sequence"):
        forward(params, np.zeros((2, 0), np.int32), config)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 101\).*from 0 to 101"):
        forward(params, np.array([0, 101]), config)
    with pytest.raises(ValueError, match=r"from -1 to"):
        forward(params, jnp.array([-1, 3]), config)
