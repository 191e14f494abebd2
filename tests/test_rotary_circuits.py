"""Rotary QK circuits by relative offset against float64 NumPy, HF's rotary embedding and the
forward pass.

Models: ``conftest``'s random Llama (4 query heads sharing 2 key/value heads, d_head 8, llama3
scaling), Mistral with linear scaling (grouped), GPT-NeoX (partial rotary, a quarter of d_head
16, no scaling), and small random models for partial rotary with scaling.
"""

import importlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _reference import assert_rel_close
from conftest import NO_PROCESSING

from lowrank import circuits
from lowrank.models import ModelConfig, RopeScaling, TransformerModel, init_params, load_pretrained
from lowrank.models.transformer import Attention, _rotary_tables

OFFSETS = np.array([0, 1, 2, 5, -1, -3, 17, 40])
CHECKPOINTS = {
    "llama": ("llama", {}),  # full rotary, llama3 scaling, grouped
    "mistral_linear": ("mistral", dict(rope_scaling=dict(rope_type="linear", factor=2.0))),
    "gpt_neox": ("gpt_neox", {}),  # partial rotary (4 of 16), no scaling
}


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def ckpt(request, rotary_checkpoint):
    variant, overrides = CHECKPOINTS[request.param]
    return rotary_checkpoint(variant, **overrides)


@pytest.fixture(scope="module")
def model(ckpt):
    return load_pretrained(ckpt.path)


@pytest.fixture(scope="module")
def llama(rotary_checkpoint):
    return load_pretrained(rotary_checkpoint("llama").path)


def f64(x):
    return np.asarray(x, dtype=np.float64)


# ------------------------------------------------------------------ float64 references
def hf_rope(hf_config):
    """``(base, rotary_dim, scaling dict or None)`` read from a transformers config."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    d_head = getattr(hf_config, "head_dim", None) or (
        hf_config.hidden_size // hf_config.num_attention_heads
    )
    fraction = params.get("partial_rotary_factor", getattr(hf_config, "rotary_pct", 1.0))
    kind = params.get("rope_type", "default")
    return (
        float(params["rope_theta"]),
        int(d_head * fraction),
        None if kind == "default" else params,
    )


def numpy_inv_freq(base, rotary_dim, scaling=None):
    """RoPE inverse frequencies, with HF's ``linear`` and ``llama3`` scaling, in float64."""
    inv = base ** (-np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    if scaling is None:
        return inv
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv / factor
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelength = 2 * np.pi / inv
    out = inv.copy()
    for n, w in enumerate(wavelength):
        if w > context / low:  # low frequencies: divided by the factor
            out[n] = inv[n] / factor
        elif w >= context / high:  # medium: interpolated
            smooth = (context / w - low) / (high - low)
            out[n] = (1 - smooth) * inv[n] / factor + smooth * inv[n]
    return out


def rotation(position, d_head, inv):
    """``R [d_head, d_head]``: ``R @ q`` is ``q`` rotated at ``position`` (pairs ``n, n + r/2``)."""
    R = np.eye(d_head)
    half = len(inv)
    for n, theta in enumerate(inv):
        c, s = np.cos(position * theta), np.sin(position * theta)
        R[n, n], R[n, n + half], R[n + half, n], R[n + half, n + half] = c, -s, s, c
    return R


def per_query_head_weights(model):
    """Float64 ``W_Q``, ``W_K [L, H, d_model, d_head]`` (``W_K`` repeated over each group)."""
    return f64(model.W_Q), f64(model.W_K)


def dense_rotary_qk(model, offsets, inv, start=50):
    """``(W_Q rotated at start + delta) @ (W_K rotated at start)^T``: ``[L, H, n, d, d]``."""
    W_Q, W_K = per_query_head_weights(model)
    d_head = W_Q.shape[-1]
    K = W_K @ rotation(start, d_head, inv).T
    Q = np.stack([W_Q @ rotation(start + d, d_head, inv).T for d in offsets], axis=2)
    return Q @ np.swapaxes(K, -1, -2)[:, :, None]


def numpy_residual(model, eps):
    """The documented default ``x [L, d_model]``: mean normalised embedding (then ``ln1``)."""
    E = f64(model.W_E)
    if model.config.normalization == "LN":
        E = E - E.mean(axis=-1, keepdims=True)
    x = (E / np.sqrt((E * E).mean(axis=-1, keepdims=True) + eps)).mean(axis=0)
    x = np.broadcast_to(x, (model.config.n_layers, x.shape[0]))
    if not model.ln_folded:
        ln1 = model.params["blocks"]["ln1"]
        x = x * f64(ln1["w"]) + (f64(ln1["b"]) if "b" in ln1 else 0.0)
    return x


def numpy_profile(model, offsets, inv, x):
    dense = dense_rotary_qk(model, offsets, inv)
    return np.einsum("ld,lhnde,le->lhn", x, dense, x)


def random_model(config, seed=0):
    """A model of random normal weights (norm weights around 1), without compiling an init."""
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    leaves, tree = jax.tree_util.tree_flatten_with_path(abstract)
    rng = np.random.default_rng(seed)
    arrays = []
    for path, leaf in leaves:
        noise = rng.standard_normal(leaf.shape)
        is_norm_weight = "w" == getattr(path[-1], "key", None)
        arrays.append(jnp.asarray(1 + 0.3 * noise if is_norm_weight else noise, leaf.dtype))
    return TransformerModel(jax.tree_util.tree_unflatten(tree, arrays), config)


def synthetic(rotary_dim, scaling, n_kv_heads=1, seed=0):
    """A random Llama-style model (norm weights present, so the default residual uses them)."""
    config = ModelConfig(
        architecture="LlamaForCausalLM",
        n_layers=2,
        n_heads=4,
        d_model=24,
        d_head=12,
        d_mlp=32,
        d_vocab=37,
        n_ctx=64,
        act_fn="silu",
        normalization="RMS",
        positional="rotary",
        rotary_dim=rotary_dim,
        rotary_base=500.0,
        rope_scaling=scaling,
        n_kv_heads=n_kv_heads,
        gated_mlp=True,
    )
    return random_model(config, seed)


def synthetic_inv(model):
    c = model.config
    s = c.rope_scaling
    scaling = None if s is None else dict(vars(s))
    return numpy_inv_freq(c.rotary_base, c.rotary_dim, scaling)


SYNTHETIC = {
    "partial_llama3": (6, RopeScaling("llama3", 4.0, 1.0, 4.0, 32)),
    "partial_linear": (4, RopeScaling("linear", 3.0)),
    "full_none": (12, None),
}


# ------------------------------------------------------------------ the circuit
def test_circuit_equals_dense_float64(model, ckpt):
    """``W_Q R W_K^T`` per offset against a rotation written here from the HF config."""
    inv = numpy_inv_freq(*hf_rope(ckpt.hf_model.config))
    qk = circuits.rotary_qk_circuit(model, OFFSETS)
    c = model.config
    L, H, KV, D, DH = c.n_layers, c.n_heads, c.n_kv_heads, c.d_model, c.d_head
    lead = (L, H) if KV == H else (L, KV, H // KV)
    assert qk.shape == (*lead, len(OFFSETS), D, D) and qk.mdim == DH
    if KV < H:  # the key factor stays grouped: one per key/value head, broadcast
        assert qk.B.shape == (L, KV, 1, 1, DH, D)
    else:
        assert qk.B.shape == (L, H, 1, DH, D)
    AB = np.asarray(qk.AB).reshape(L, H, len(OFFSETS), D, D)
    assert_rel_close(AB, dense_rotary_qk(model, OFFSETS, inv), rtol=1e-5, what="vs float64")
    # offset 0 is the rotation-free QK circuit
    assert_rel_close(AB[:, :, 0], np.asarray(circuits.qk_circuit(model).AB).reshape(L, H, D, D))
    assert np.abs(AB[:, :, 1] - AB[:, :, 0]).max() > 1e-2 * np.abs(AB[:, :, 0]).max()


def test_circuit_matches_hf_rotary_embedding(model, ckpt):
    """HF's own rotary module and ``apply_rotary_pos_emb`` applied to the factors agree."""
    hf = ckpt.hf_model
    rotary = hf.base_model.rotary_emb
    apply_rope = importlib.import_module(type(hf).__module__).apply_rotary_pos_emb
    W_Q, W_K = (torch.tensor(w) for w in per_query_head_weights(model))  # [L, H, d, dh]
    start = 50
    for layer in range(model.config.n_layers):
        q, k = W_Q[layer][None], W_K[layer][None]  # heads on axis 1, d_model as "sequence"

        def rope_at(position, q=q, k=k):
            pos = torch.tensor([[position]])
            cos, sin = rotary(q, pos)
            return apply_rope(q, k, cos, sin, unsqueeze_dim=1)

        k_rot = rope_at(start)[1][0]
        dense = np.stack(
            [(rope_at(start + d)[0][0] @ k_rot.transpose(-1, -2)).numpy() for d in OFFSETS],
            axis=1,
        )
        ours = circuits.rotary_qk_circuit(model, OFFSETS).AB
        ours = np.asarray(ours).reshape(
            model.config.n_layers, model.config.n_heads, *dense.shape[1:]
        )
        assert_rel_close(ours[layer], dense, rtol=1e-5, what=f"vs HF, layer {layer}")


@pytest.mark.parametrize("name", SYNTHETIC)
def test_circuit_partial_rotary_with_scaling(name):
    """Partial rotary with llama3 / linear scaling (and full without) against float64."""
    model = synthetic(*SYNTHETIC[name], n_kv_heads=2)
    ours = np.asarray(circuits.rotary_qk_circuit(model, OFFSETS).AB).reshape(2, 4, -1, 24, 24)
    dense = dense_rotary_qk(model, OFFSETS, synthetic_inv(model))
    assert_rel_close(ours, dense, rtol=1e-5, what=name)


def test_sign_convention_matches_the_forward_pass(llama):
    """The forward pass's attention pattern of random input equals the one from the circuit."""
    c = llama.config
    seq, layer = 12, 1
    attn = jax.tree_util.tree_map(lambda a: a[layer], llama.params["blocks"]["attn"])
    attn = {**attn, "b_Q": jnp.zeros_like(attn["b_Q"]), "b_K": jnp.zeros_like(attn["b_K"])}
    x = jax.random.normal(jax.random.key(0), (1, seq, c.d_model))
    module = Attention(c.n_heads, c.d_head, n_kv_heads=c.n_kv_heads)
    scale = jnp.float32(c.attn_scales[layer])
    window = jnp.int32(c.attn_windows[layer])
    _, pattern = module.apply({"params": attn}, x, window, scale, _rotary_tables(c, seq))
    offsets = np.arange(-seq + 1, seq)
    M = np.asarray(circuits.rotary_qk_circuit(llama, offsets).AB[layer])
    M = M.reshape(c.n_heads, len(offsets), c.d_model, c.d_model)
    delta = np.arange(seq)[:, None] - np.arange(seq)[None, :]
    xs = f64(x[0])
    scores = np.einsum("qd,hqsde,se->hqs", xs, M[:, delta + seq - 1], xs) / float(scale)
    scores = np.where(delta >= 0, scores, -np.inf)
    expected = np.exp(scores - scores.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(pattern[0]), expected, rtol=0, atol=2e-5)
    # the opposite sign convention would not match
    flipped = np.einsum("qd,hqsde,se->hqs", xs, M[:, seq - 1 - delta], xs) / float(scale)
    assert np.abs(np.where(delta > 0, flipped - scores, 0)).max() > 1e-2


def test_rotary_tables_give_the_same_rotation(llama):
    """Rotating ``W_Q`` and ``W_K`` rows with the forward pass's own tables at ``i`` and ``j``."""
    from lowrank.models.transformer import _rotate

    c, n = llama.config, 20
    cos, sin = _rotary_tables(c, n)
    W_Q, W_K = llama.W_Q[0], llama.W_K_grouped[0]  # [H, d, dh], [KV, d, dh]
    # [batch=d_model, seq, heads, d_head]: every position holds the rows of W_Q / W_K
    Q = _rotate(
        jnp.broadcast_to(jnp.swapaxes(W_Q, 0, 1)[:, None], (c.d_model, n, *W_Q.shape[::2])),
        cos,
        sin,
    )
    K = _rotate(
        jnp.broadcast_to(jnp.swapaxes(W_K, 0, 1)[:, None], (c.d_model, n, *W_K.shape[::2])),
        cos,
        sin,
    )
    i, j = 13, 4
    group = c.n_heads // c.n_kv_heads
    ref = np.einsum("ahe,bhe->hab", f64(Q[:, i]), np.repeat(f64(K[:, j]), group, axis=1))
    ours = np.asarray(circuits.rotary_qk_circuit(llama, i - j).AB[0]).reshape(
        c.n_heads, c.d_model, -1
    )
    assert_rel_close(ours, ref, rtol=1e-5)


# ------------------------------------------------------------------ profile and pattern
def test_profile_and_pattern_match_float64(model, ckpt):
    """Default residual, profile ``x W_Q R(delta) W_K^T x``, Toeplitz pattern, causal mask."""
    inv = numpy_inv_freq(*hf_rope(ckpt.hf_model.config))
    x = numpy_residual(model, model.config.eps)
    profile = circuits.relative_position_profile(model, OFFSETS)
    c = model.config
    assert profile.shape == (c.n_layers, c.n_heads, len(OFFSETS))
    assert_rel_close(profile, numpy_profile(model, OFFSETS, inv, x), rtol=1e-5, what="profile")
    n = 12
    pattern = np.asarray(circuits.rotary_positional_pattern(model, n))
    assert pattern.shape == (c.n_layers, c.n_heads, n, n)
    prof_n = numpy_profile(model, np.arange(n), inv, x)
    delta = np.arange(n)[:, None] - np.arange(n)[None, :]
    windows = np.asarray(c.attn_windows)[:, None, None, None]
    allowed = (delta >= 0) & (delta < windows)
    assert np.all(np.isneginf(pattern[~np.broadcast_to(allowed, pattern.shape)]))
    assert np.all(np.isneginf(pattern[..., delta < 0]))  # causal
    expected = np.where(allowed, prof_n[..., np.clip(delta, 0, None)], -np.inf)
    assert_rel_close(np.where(allowed, pattern, 0), np.where(allowed, expected, 0), rtol=1e-5)
    # Toeplitz: constant along diagonals
    np.testing.assert_array_equal(pattern[..., 1:, 1:], pattern[..., :-1, :-1])
    assert np.all(np.isfinite(jax.nn.softmax(pattern, axis=-1)))


def test_sliding_window_is_masked(rotary_checkpoint):
    """Mistral's layers slide with window 5: keys 5 or more back are masked too."""
    model = load_pretrained(rotary_checkpoint("mistral").path)
    pattern = np.asarray(circuits.rotary_positional_pattern(model, 9))
    delta = np.arange(9)[:, None] - np.arange(9)[None, :]
    assert np.all(np.isneginf(pattern[..., delta >= 5]))
    assert np.all(np.isfinite(pattern[..., (delta >= 0) & (delta < 5)]))


def test_profile_with_unfolded_norms(rotary_checkpoint):
    """LayerNorm weight and bias of ``ln1`` enter the default residual when not folded."""
    ckpt = rotary_checkpoint("gpt_neox")
    model = load_pretrained(ckpt.path, **NO_PROCESSING)
    assert not model.ln_folded
    inv = numpy_inv_freq(*hf_rope(ckpt.hf_model.config))
    expected = numpy_profile(model, OFFSETS, inv, numpy_residual(model, model.config.eps))
    assert_rel_close(circuits.relative_position_profile(model, OFFSETS), expected, rtol=1e-5)


@pytest.mark.parametrize("name", SYNTHETIC)
def test_profile_of_synthetic_models(name):
    model = synthetic(*SYNTHETIC[name])
    inv = synthetic_inv(model)
    x = numpy_residual(model, model.config.eps)
    expected = numpy_profile(model, OFFSETS, inv, x)
    assert_rel_close(circuits.relative_position_profile(model, OFFSETS), expected, rtol=1e-5)
    x_given = np.random.default_rng(1).standard_normal(24).astype(np.float32)
    ours = circuits.relative_position_profile(model, OFFSETS, x_given)
    x64 = np.broadcast_to(f64(x_given), (2, 24))
    assert_rel_close(ours, numpy_profile(model, OFFSETS, inv, x64), rtol=1e-5, what="given x")


def test_previous_token_head_peaks_at_offset_one(llama):
    """``W_K = W_Q R(1)^T`` makes ``x W_Q R(d) W_K^T x = q . R(1 - d) q``: maximal at ``d = 1``."""
    c = llama.config
    R1 = rotation(1, c.d_head, numpy_inv_freq(*rope_of(c)))
    params = jax.tree_util.tree_map(lambda a: a, llama.params)
    W_K = f64(params["blocks"]["attn"]["W_K"])
    W_K[0, 1] = f64(llama.W_Q[0, 2]) @ R1.T  # query head 2 reads key/value head 1
    params["blocks"]["attn"]["W_K"] = jnp.asarray(W_K, jnp.float32)
    model = TransformerModel(params, c)
    offsets = np.arange(-10, 11)
    profile = np.asarray(circuits.relative_position_profile(model, offsets))
    assert offsets[np.argmax(profile[0, 2])] == 1
    assert profile[0, 2, 11] > 0  # offset 1
    pattern = np.asarray(circuits.rotary_positional_pattern(model, 10))
    # every query attends most to the key just before it
    np.testing.assert_array_equal(np.argmax(pattern[0, 2, 1:], axis=-1), np.arange(9))


def rope_of(config):
    """``(base, rotary_dim, scaling dict)`` of a lowrank ModelConfig."""
    s = config.rope_scaling
    return config.rotary_base, config.rotary_dim, None if s is None else dict(vars(s))


# ------------------------------------------------------------------ jit and vmap
def test_jit_and_vmap(llama):
    offsets = jnp.asarray(OFFSETS, dtype=jnp.int32)
    eager = circuits.rotary_qk_circuit(llama, offsets).AB
    jitted = jax.jit(lambda m, o: circuits.rotary_qk_circuit(m, o).AB)(llama, offsets)
    assert_rel_close(jitted, eager, rtol=1e-6, what="jit")
    per_offset = jax.vmap(lambda o: circuits.rotary_qk_circuit(llama, o).AB)(offsets)
    assert_rel_close(jnp.moveaxis(per_offset, 0, 3), eager, rtol=1e-5, what="vmap offsets")
    other = jax.tree_util.tree_map(lambda a: 0.5 * a, llama)
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), llama, other)
    for fn in (
        lambda m: circuits.relative_position_profile(m, offsets),
        lambda m: circuits.rotary_positional_pattern(m, 7),
        lambda m: circuits.rotary_qk_circuit(m, offsets).AB,
    ):
        expected = [fn(llama), fn(other)]
        assert_close_where_finite(jax.jit(fn)(llama), expected[0], "jit")
        batched = jax.jit(jax.vmap(fn))(stacked)
        for i in range(2):
            assert_close_where_finite(batched[i], expected[i], "vmap over models")


def assert_close_where_finite(actual, expected, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(actual), finite)
    assert_rel_close(np.where(finite, actual, 0), np.where(finite, expected, 0), 1e-5, what)


def test_scalar_and_nd_offsets(llama):
    full = circuits.rotary_qk_circuit(llama, OFFSETS)
    one = circuits.rotary_qk_circuit(llama, 5)
    assert one.shape == full.shape[:3] + full.shape[4:]
    assert_rel_close(one.AB, full.AB[:, :, :, 3], rtol=1e-6)
    grid = circuits.relative_position_profile(llama, OFFSETS.reshape(2, 4))
    flat = circuits.relative_position_profile(llama, OFFSETS)
    assert_rel_close(np.asarray(grid).reshape(flat.shape), flat, rtol=1e-6)


# ------------------------------------------------------------------ bad input
def test_bad_input(llama):
    learned = ModelConfig("GPT2LMHeadModel", 1, 2, 8, 4, 16, 11, 8)
    gpt2 = random_model(learned)
    for fn in (
        circuits.rotary_qk_circuit,
        circuits.relative_position_profile,
        lambda m, _: circuits.rotary_positional_pattern(m, 4),
    ):
        with pytest.raises(ValueError, match=r"learned position embeddings.*positional_qk_circuit"):
            fn(gpt2, OFFSETS)
        with pytest.raises(ValueError, match=r"no config with positional='rotary'"):
            fn(types.SimpleNamespace(W_Q=llama.W_Q, W_K=llama.W_K), OFFSETS)
    for bad in (np.array([0.0, 1.0]), jnp.ones(3), [1.5], np.array([True])):
        with pytest.raises(ValueError, match=r"offsets must be integers.*got dtype"):
            circuits.rotary_qk_circuit(llama, bad)
        with pytest.raises(ValueError, match=r"offsets must be integers"):
            circuits.relative_position_profile(llama, bad)
    for n in (0, -2):
        with pytest.raises(ValueError, match=r"n_positions must be positive"):
            circuits.rotary_positional_pattern(llama, n)
    with pytest.raises(ValueError, match=r"n_positions must be a Python int"):
        circuits.rotary_positional_pattern(llama, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"x must be \[d_model\] or \[L, d_model\] = \[3, 32\]"):
        circuits.relative_position_profile(llama, OFFSETS, np.ones(31, np.float32))
