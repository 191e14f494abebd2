"""TransformerModel: weights, OV/QK circuits vs TransformerLens, pytree behaviour, tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from lowrank import FactoredMatrix
from lowrank.models import TransformerModel, load_pretrained


@pytest.fixture(scope="module")
def models(gpt2_checkpoint, gpt_neo_checkpoint):
    return {c.family: load_pretrained(c.path) for c in (gpt2_checkpoint, gpt_neo_checkpoint)}


def test_weights_and_circuits(models):
    m = models["gpt2"]
    L, H, d, dh = 3, 4, 32, 8
    shapes = {
        "W_E": (101, d),
        "W_pos": (24, d),
        "W_U": (d, 101),
        "b_U": (101,),
        "W_Q": (L, H, d, dh),
        "W_K": (L, H, d, dh),
        "W_V": (L, H, d, dh),
        "W_O": (L, H, dh, d),
        "b_Q": (L, H, dh),
        "b_O": (L, d),
        "W_in": (L, d, 128),
        "b_in": (L, 128),
        "W_out": (L, 128, d),
        "b_out": (L, d),
    }
    for name, shape in shapes.items():
        assert getattr(m, name).shape == shape, name
        assert isinstance(getattr(m, name), jax.Array)
    assert isinstance(m.OV, FactoredMatrix) and m.OV.shape == (L, H, d, d)
    assert isinstance(m.QK, FactoredMatrix) and m.QK.shape == (L, H, d, d)
    np.testing.assert_allclose(m.OV.AB, np.asarray(m.W_V) @ np.asarray(m.W_O), atol=1e-5)
    assert m.ln_folded and m.cfg is m.config and m.dtype == jnp.float32
    assert "GPT2LMHeadModel" in repr(m) and "ln_folded=True" in repr(m)


def match_multisets(a, b):
    """Largest distance between two equal-size sets of complex numbers, best matched."""
    cost = np.abs(a[:, None] - b[None, :])
    rows, cols = linear_sum_assignment(cost)
    return cost[rows, cols].max()


def test_circuits_match_transformer_lens(checkpoint, models, tl_model):
    ours = models[checkpoint.family]
    tl = tl_model(checkpoint)  # TransformerLens's default processing, like ours
    np.testing.assert_allclose(np.asarray(ours.QK.AB), tl.QK.AB.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours.OV.AB), tl.OV.AB.detach().numpy(), atol=1e-5)
    eig = np.asarray(ours.OV.eigenvalues)
    ref = tl.OV.eigenvalues.detach().numpy()
    assert eig.shape == ref.shape == (ours.cfg.n_layers, 4, 8)
    assert np.iscomplexobj(eig)
    scale = np.abs(ref).max()
    for idx in np.ndindex(eig.shape[:2]):
        assert match_multisets(eig[idx], ref[idx]) < 1e-4 * scale, idx


def test_model_through_jit_and_tree_map(models, tokens):
    m = models["gpt_neo"]
    direct = np.asarray(m(tokens))
    via_jit = jax.jit(lambda model, t: model(t))(m, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(via_jit), direct, atol=1e-5)
    leaves, treedef = jax.tree_util.tree_flatten(m)
    assert len(leaves) == 16  # params only: 22 leaves less 6 folded LayerNorm ones
    twice = jax.tree_util.tree_map(lambda x: 2 * x, m)
    assert isinstance(twice, TransformerModel) and twice.config is m.config
    np.testing.assert_allclose(np.asarray(twice.W_E), 2 * np.asarray(m.W_E))
    copy_eigs = jax.jit(lambda model: model.OV.eigenvalues)(m)
    assert copy_eigs.shape == (4, 4, 8)
    logits, acts = m.forward(tokens[0], return_activations=True)
    assert logits.shape == (17, 101) and acts["pattern"].shape == (4, 4, 17, 17)


def test_tokenizer_helpers(models):
    m = models["gpt2"]
    assert m.tokenizer is not None
    toks = m.to_tokens("w1 w2 w3")
    assert toks.dtype == jnp.int32 and toks.tolist() == [[0, 3, 4, 5]]
    batch = m.to_tokens(["w1", "w4 w5"], prepend_bos=False)
    assert batch.tolist() == [[3, 0], [6, 7]]  # right-padded with the EOS id
    assert m.to_str_tokens("w1 w2") == ["<|endoftext|>", "w1", "w2"]
    assert m.to_str_tokens(toks) == ["<|endoftext|>", "w1", "w2", "w3"]
    assert m.to_string(toks[0, 1:]) == "w1 w2 w3"
    assert m(m.to_tokens("w7 w8")).shape == (1, 3, 101)


def test_without_tokenizer(models):
    m = models["gpt_neo"]
    assert m.tokenizer is None
    with pytest.raises(ValueError, match="to_tokens needs a tokenizer"):
        m.to_tokens("hello")
    with pytest.raises(ValueError, match="to_str_tokens needs a tokenizer"):
        m.to_str_tokens([1, 2])
