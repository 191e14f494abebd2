"""SVD interpreter, spectra and top entries against TransformerLens and dense NumPy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import align_signs, assert_rel_close, singular_vector_rtol, to_numpy

from lowrank import FactoredMatrix, circuits
from lowrank.interpret import (
    effective_rank,
    embedding_spectra,
    row_top_k,
    svd_directions,
    top_entries,
)
from lowrank.models import load_pretrained


@pytest.fixture(scope="module", params=[True, False], ids=["folded", "unfolded"])
def models(request, gpt2_checkpoint, tl_model):
    fold = request.param
    ours = load_pretrained(
        gpt2_checkpoint.path, fold_ln=fold, center_writing_weights=fold, center_unembed=fold
    )
    tl = tl_model(gpt2_checkpoint, fold_ln=fold, center_writing_weights=fold, center_unembed=fold)
    return ours, tl


def _dense(model, kind, layer, head):
    """The interpreted matrix in float64, built densely."""
    if kind == "OV":
        return np.asarray(model.W_V[layer, head], np.float64) @ np.asarray(model.W_O[layer, head])
    if kind == "w_in":
        matrix = np.asarray(model.W_in[layer], np.float64).T
        if not model.ln_folded:
            matrix = matrix * np.asarray(model.params["blocks"]["ln2"]["w"][layer])
        return matrix
    return np.asarray(model.W_out[layer], np.float64)


CASES = [("OV", 1, 2), ("OV", 2, 0), ("w_in", 0, None), ("w_out", 2, None)]


@pytest.mark.parametrize(("kind", "layer", "head"), CASES)
def test_svd_directions_match_transformer_lens(models, kind, layer, head):
    import torch
    from transformer_lens import SVDInterpreter

    ours, tl = models
    n = 5
    got = svd_directions(ours, kind, layer, head, num_vectors=n, top_k=7)
    with torch.no_grad():
        ref = SVDInterpreter(tl).get_singular_vectors(kind, layer, n, head)
    ref = to_numpy(ref)[:, 0, :].T  # [n, d_vocab]
    assert got.activations.shape == ref.shape == (n, 101)
    # each direction's sign is arbitrary; both sides are float32 SVDs, hence the factor 2
    rtol = 2 * singular_vector_rtol(np.linalg.svd(_dense(ours, kind, layer, head))[1], n)
    assert_rel_close(got.activations, align_signs(ref, np.asarray(got.activations), axis=-1), rtol)


@pytest.mark.parametrize(("kind", "layer", "head"), CASES)
def test_svd_directions_match_dense_numpy(models, kind, layer, head):
    ours, _ = models
    got = svd_directions(ours, kind, layer, head, num_vectors=4, top_k=6)
    _, S, Vh = np.linalg.svd(_dense(ours, kind, layer, head))
    assert_rel_close(got.singular_values, S[:4])
    acts = np.asarray(got.activations, np.float64)
    expected = align_signs(Vh[:4] @ np.asarray(ours.W_U, np.float64), acts, axis=-1)
    assert_rel_close(acts, expected, singular_vector_rtol(S, 4))
    order = np.argsort(-acts, axis=-1)[:, :6]
    np.testing.assert_array_equal(np.sort(got.top_tokens[:, 0], -1), np.sort(order, -1))
    neg_order = np.argsort(acts, axis=-1)[:, :6]
    np.testing.assert_array_equal(np.sort(got.top_tokens[:, 1], -1), np.sort(neg_order, -1))
    assert_rel_close(got.top_values[:, 1], -np.take_along_axis(acts, neg_order, -1))


def test_token_strings(gpt2_checkpoint):
    model = load_pretrained(gpt2_checkpoint.path)
    got = svd_directions(model, "OV", 0, 1, num_vectors=2, top_k=3)
    strings = got.token_strings(model.tokenizer)
    assert len(strings) == 2 and all(len(side) == 3 for row in strings for side in row)
    assert strings[0][0][0] == model.tokenizer.decode([int(got.top_tokens[0, 0, 0])])


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (("OV", 0, None), ValueError, "kind 'OV' needs a head index"),
        (("OV", 0, 4), ValueError, r"head must be in 0\.\.3, got 4"),
        (("OV", 3, 0), ValueError, r"layer must be in 0\.\.2, got 3"),
        (("w_in", 0, 1), ValueError, "is per layer; got head=1"),
        (("attn", 0, None), ValueError, "kind must be 'OV', 'w_in', 'w_gate' or 'w_out'"),
        (("w_gate", 0, None), ValueError, "kind 'w_gate' needs a gated MLP"),
        (("OV", 1.0, 0), TypeError, "layer must be an integer"),
    ],
)
def test_svd_directions_errors(gpt2_checkpoint, args, error, match):
    model = load_pretrained(gpt2_checkpoint.path)
    with pytest.raises(error, match=match):
        svd_directions(model, *args)


def test_svd_directions_count_errors(gpt2_checkpoint):
    model = load_pretrained(gpt2_checkpoint.path)
    with pytest.raises(ValueError, match=r"num_vectors must be in 1\.\.8"):
        svd_directions(model, "OV", 0, 0, num_vectors=9)
    with pytest.raises(ValueError, match=r"top_k must be in 1\.\.101"):
        svd_directions(model, "OV", 0, 0, top_k=0)
    assert svd_directions(model, "OV", 0, 0).activations.shape == (8, 101)  # default: all 8


def test_svd_directions_under_jit_and_vmap(gpt2_checkpoint):
    model = load_pretrained(gpt2_checkpoint.path)
    fn = functools.partial(svd_directions, kind="w_out", layer=1, num_vectors=3, top_k=4)
    eager = fn(model)
    jitted = jax.jit(fn)(model)
    assert_rel_close(jitted.activations, eager.activations, rtol=1e-5)
    stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), model)
    mapped = jax.jit(jax.vmap(fn))(stacked)  # jitted: vmap's batching rules, one compile
    assert_rel_close(mapped.singular_values[1], eager.singular_values, rtol=1e-5)


# ----------------------------------------------------------------- spectra
def test_effective_rank():
    S = jnp.asarray([[10.0, 5.0, 0.2, 0.05], [1.0, 0.5, 0.02, 0.0]])
    np.testing.assert_array_equal(effective_rank(S), [3, 3])
    np.testing.assert_array_equal(effective_rank(S, rel_threshold=0.1), [2, 2])
    np.testing.assert_array_equal(jax.jit(effective_rank)(S), [3, 3])
    np.testing.assert_array_equal(jax.vmap(effective_rank)(S), [3, 3])
    with pytest.raises(ValueError, match=r"rel_threshold must be in \(0, 1\), got 1.5"):
        effective_rank(S, 1.5)


def test_embedding_spectra(gpt2_checkpoint):
    model = load_pretrained(gpt2_checkpoint.path)
    tokens, positions = jnp.arange(5, 25), jnp.asarray([0, 3, 7])
    spectra = embedding_spectra(model, tokens, positions)
    for name, matrix in [("W_E", model.W_E), ("W_U", model.W_U), ("W_pos", model.W_pos)]:
        expected = np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)
        assert_rel_close(spectra[name], expected, what=name)
    grid = np.asarray(model.W_E)[5:25, None] + np.asarray(model.W_pos)[[0, 3, 7]][None]
    expected = np.linalg.svd(grid.reshape(60, -1).astype(np.float64), compute_uv=False)
    assert_rel_close(spectra["W_E + W_pos"], expected)
    jitted = jax.jit(embedding_spectra)(model, tokens, positions)
    assert_rel_close(jitted["W_E + W_pos"], expected)
    default = embedding_spectra(model)
    assert default["W_E + W_pos"].shape == (32,)


def test_embedding_spectra_of_a_rotary_model(rotary_checkpoint):
    """No W_pos: the spectra of W_E and W_U alone; asking for positions is an error."""
    model = load_pretrained(rotary_checkpoint("llama").path)
    spectra = jax.jit(embedding_spectra)(model)
    assert set(spectra) == {"W_E", "W_U"}
    for name, matrix in [("W_E", model.W_E), ("W_U", model.W_U)]:
        expected = np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)
        assert_rel_close(spectra[name], expected, what=name)
    with pytest.raises(ValueError, match="positions given, but the model's positions are rotary"):
        embedding_spectra(model, positions=jnp.arange(3))


# -------------------------------------------------------- token-by-token tops
@pytest.fixture(scope="module")
def full_ov(gpt2_checkpoint):
    return circuits.full_ov_circuit(load_pretrained(gpt2_checkpoint.path))[1, 2]


@pytest.mark.parametrize("chunk", [16, 101, 1024])
def test_row_top_k_and_top_entries(full_ov, chunk):
    dense = np.asarray(full_ov.AB, np.float64)
    values, cols = row_top_k(full_ov, 5, chunk=chunk)
    assert values.shape == cols.shape == (101, 5)
    np.testing.assert_array_equal(cols, np.argsort(-dense, axis=-1)[:, :5])
    assert_rel_close(values, -np.sort(-dense, axis=-1)[:, :5])
    top, rows, cols = top_entries(full_ov, 12, chunk=chunk)
    flat = np.argsort(-dense.reshape(-1))[:12]
    np.testing.assert_array_equal(rows, flat // 101)
    np.testing.assert_array_equal(cols, flat % 101)
    assert_rel_close(top, dense.reshape(-1)[flat])


def test_top_entries_under_jit_and_vmap(gpt2_checkpoint):
    M = circuits.full_ov_circuit(load_pretrained(gpt2_checkpoint.path))[0]  # [4, 101, 101]
    fn = functools.partial(top_entries, k=3, chunk=32)
    batched = jax.jit(jax.vmap(fn))(M)  # jitted: vmap's batching rules, one compile
    for head in range(4):
        for got, want in zip(batched, fn(M[head]), strict=True):
            np.testing.assert_allclose(got[head], want, rtol=1e-5)
    jitted = jax.jit(fn)(M[0])
    np.testing.assert_array_equal(jitted[1], fn(M[0])[1])


def test_top_entries_errors():
    M = FactoredMatrix(jnp.ones((2, 6, 2)), jnp.ones((2, 2, 5)))
    with pytest.raises(ValueError, match=r"single matrix \[l, r\].*\(2, 6, 5\)"):
        row_top_k(M, 2)
    with pytest.raises(ValueError, match=r"k must be in 1\.\.5, got 6"):
        row_top_k(M[0], 6)
    with pytest.raises(ValueError, match=r"k must be in 1\.\.30, got 31"):
        top_entries(M[0], 31)
    with pytest.raises(ValueError, match="chunk must be positive"):
        row_top_k(M[0], 2, chunk=0)


def test_unembed_directions(gpt2_checkpoint):
    from lowrank.interpret import unembed_directions

    model = load_pretrained(gpt2_checkpoint.path)
    got = unembed_directions(model, num_vectors=3, top_k=5)
    _, S, Vh = np.linalg.svd(np.asarray(model.W_U, np.float64), full_matrices=False)
    assert_rel_close(got.singular_values, S[:3])
    acts = np.asarray(got.activations, np.float64)
    assert_rel_close(acts, align_signs(Vh[:3], acts, axis=-1), singular_vector_rtol(S, 3))
    np.testing.assert_array_equal(
        np.sort(got.top_tokens[:, 0], -1), np.sort(np.argsort(-acts)[:, :5], -1)
    )
    jitted = jax.jit(functools.partial(unembed_directions, num_vectors=3, top_k=5))(model)
    assert_rel_close(jitted.singular_values, got.singular_values, rtol=1e-5)
    with pytest.raises(ValueError, match=r"num_vectors must be in 1\.\.32"):
        unembed_directions(model, num_vectors=33)


def test_directions_table(gpt2_checkpoint):
    model = load_pretrained(gpt2_checkpoint.path)
    got = svd_directions(model, "OV", 0, 1, num_vectors=2, top_k=3)
    lines = got.table(model.tokenizer).splitlines()
    assert len(lines) == 4 and lines[0].startswith("  0 + S=") and lines[1].startswith("  0 - S=")
    assert repr(model.tokenizer.decode([int(got.top_tokens[0, 0, 0])])) in lines[0]
    assert "#" in got.table().splitlines()[0]


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
def test_gated_mlp_names_up_gate_and_down_projections(rotary_checkpoint, fold):
    """Llama: ``w_in`` reads HF's ``up_proj``, ``w_gate`` its ``gate_proj`` (both scaled by the
    RMSNorm weight before them, folded or not), ``w_out`` its ``down_proj``; float64 SVDs.
    """
    ckpt = rotary_checkpoint("llama")
    model = load_pretrained(ckpt.path, fold_ln=fold, center_writing_weights=False)
    layer = ckpt.hf_model.model.layers[1]
    norm = layer.post_attention_layernorm.weight.detach().numpy().astype(np.float64)
    dense = {
        "w_in": layer.mlp.up_proj.weight.detach().numpy() * norm,
        "w_gate": layer.mlp.gate_proj.weight.detach().numpy() * norm,
        "w_out": layer.mlp.down_proj.weight.detach().numpy().T,
    }
    for kind, matrix in dense.items():
        got = svd_directions(model, kind, 1, num_vectors=3, top_k=5)
        assert_rel_close(got.singular_values, np.linalg.svd(matrix, compute_uv=False)[:3])
