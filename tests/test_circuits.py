"""Circuits against dense float64 NumPy and TransformerLens 3.9.0 on a small random GPT-2."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import assert_rel_close, to_numpy
from conftest import published_config

from lowrank import circuits
from lowrank.models import TransformerModel, config_from_hf, init_params, load_pretrained


@pytest.fixture(scope="module")
def model(gpt2_checkpoint):
    return load_pretrained(gpt2_checkpoint.path)


@pytest.fixture(scope="module")
def tl(gpt2_checkpoint, tl_model):
    return tl_model(gpt2_checkpoint)


def f64(x):
    return np.asarray(x, dtype=np.float64)


def copying_score(eig):
    return np.sum(eig, axis=-1).real / np.sum(np.abs(eig), axis=-1)


# ------------------------------------------------------------------ circuits
def test_ov_and_qk_circuits(model, tl):
    ov, qk = circuits.ov_circuit(model), circuits.qk_circuit(model)
    assert ov.shape == qk.shape == (3, 4, 32, 32) and ov.mdim == 8
    assert_rel_close(ov.AB, f64(model.W_V) @ f64(model.W_O))
    assert_rel_close(qk.AB, f64(model.W_Q) @ np.swapaxes(f64(model.W_K), -1, -2))
    assert_rel_close(ov.AB, to_numpy(tl.OV.AB), what="OV vs TL")
    assert_rel_close(qk.AB, to_numpy(tl.QK.AB), what="QK vs TL")


def test_full_circuits_match_dense_products(model, tl):
    W_E, W_U, W_pos = f64(model.W_E), f64(model.W_U), f64(model.W_pos)
    W_Q, W_K, W_V, W_O = (f64(w) for w in (model.W_Q, model.W_K, model.W_V, model.W_O))
    full_ov = circuits.full_ov_circuit(model)
    assert full_ov.shape == (3, 4, 101, 101) and full_ov.mdim == 8
    assert_rel_close(full_ov.AB, W_E @ W_V @ W_O @ W_U)
    assert_rel_close(full_ov.AB, to_numpy((tl.W_E @ tl.OV @ tl.W_U).AB), what="vs TL")
    KT = np.swapaxes(W_K, -1, -2)
    assert_rel_close(circuits.full_qk_circuit(model).AB, W_E @ W_Q @ KT @ W_E.T)
    assert_rel_close(circuits.positional_qk_circuit(model).AB, W_pos @ W_Q @ KT @ W_pos.T)


def test_copying_scores(model, tl):
    full_dense = f64(model.W_E) @ f64(model.W_V) @ f64(model.W_O) @ f64(model.W_U)
    expected_full = copying_score(np.linalg.eigvals(full_dense))
    assert_rel_close(circuits.copying_scores(model), expected_full, what="full vs numpy")
    tl_full = (tl.W_E @ tl.OV @ tl.W_U).eigenvalues
    assert_rel_close(circuits.copying_scores(model), copying_score(to_numpy(tl_full)), what="TL")
    ov_dense = f64(model.W_V) @ f64(model.W_O)
    expected_ov = copying_score(np.linalg.eigvals(ov_dense))
    assert_rel_close(circuits.copying_scores(model, full=False), expected_ov, what="OV")
    tl_ov = copying_score(to_numpy(tl.OV.eigenvalues))
    assert_rel_close(circuits.copying_scores(model, full=False), tl_ov, what="OV vs TL")


def _dense_composition(model, kind):
    OV = f64(model.W_V) @ f64(model.W_O)
    QK = f64(model.W_Q) @ np.swapaxes(f64(model.W_K), -1, -2)
    right = {"Q": QK, "K": np.swapaxes(QK, -1, -2), "V": OV}[kind]
    L, H = OV.shape[:2]
    out = np.zeros((L, H, L, H))
    for l1, h1, l2, h2 in np.ndindex(L, H, L, H):
        if l1 < l2:
            num = np.linalg.norm(OV[l1, h1] @ right[l2, h2])
            out[l1, h1, l2, h2] = num / np.linalg.norm(OV[l1, h1]) / np.linalg.norm(right[l2, h2])
    return out


@pytest.mark.parametrize("kind", ["Q", "K", "V"])
def test_composition_scores(model, tl, kind):
    scores = circuits.composition_scores(model, kind)
    assert scores.shape == (3, 4, 3, 4)
    assert_rel_close(scores, _dense_composition(model, kind), what="vs numpy")
    assert_rel_close(scores, to_numpy(tl.all_composition_scores(kind)), what="vs TL")
    assert np.all(np.asarray(scores)[1, :, :2] == 0)  # masked: right layer <= left layer


def test_composition_scores_of_rank_deficient_heads(model):
    W_V = model.W_V.at[0, 0, :, 1].set(model.W_V[0, 0, :, 0])  # head L0H0 loses a dimension
    params = jax.tree_util.tree_map(lambda x: x, model.params)
    params["blocks"]["attn"]["W_V"] = W_V
    deficient = TransformerModel(params, model.config)
    assert_rel_close(
        circuits.composition_scores(deficient, "V"), _dense_composition(deficient, "V")
    )


def test_composition_baseline_is_the_rms_score_of_random_rotations():
    d, r, n = 64, 8, 4000
    assert circuits.composition_baseline(d) == pytest.approx(0.125)
    rng = np.random.default_rng(0)
    left = rng.standard_normal((d, r)) @ rng.standard_normal((r, d))
    right = rng.standard_normal((d, r)) @ rng.standard_normal((r, d))
    q, _ = np.linalg.qr(rng.standard_normal((n, d, d)))
    rotated = q @ right @ np.swapaxes(q, -1, -2)
    scores = np.linalg.norm(left @ rotated, axis=(-2, -1)) / (
        np.linalg.norm(left) * np.linalg.norm(right)
    )
    assert np.sqrt(np.mean(scores**2)) == pytest.approx(circuits.composition_baseline(d), rel=0.03)


def test_bad_composition_kind(model):
    with pytest.raises(ValueError, match=r"kind must be 'Q', 'K' or 'V', got 'X'"):
        circuits.composition_scores(model, "X")


# ------------------------------------------------------------ jit and vmap
FUNCTIONS = {
    "ov_circuit": lambda m: circuits.ov_circuit(m).AB,
    "qk_circuit": lambda m: circuits.qk_circuit(m).AB,
    "full_ov_circuit": lambda m: circuits.full_ov_circuit(m).AB,
    "full_qk_circuit": lambda m: circuits.full_qk_circuit(m).AB,
    "positional_qk_circuit": lambda m: circuits.positional_qk_circuit(m).AB,
    "copying_scores": circuits.copying_scores,
    "copying_scores_ov": lambda m: circuits.copying_scores(m, full=False),
    "composition_scores": lambda m: circuits.composition_scores(m, "K"),
}


@pytest.mark.parametrize("name", FUNCTIONS)
def test_jit_and_vmap(model, name):
    fn = FUNCTIONS[name]
    eager = fn(model)
    assert_rel_close(jax.jit(fn)(model), eager, rtol=1e-5, what="jit")
    other = jax.tree_util.tree_map(lambda x: 0.5 * x, model)  # a second model to map over
    stacked = jax.tree_util.tree_map(lambda x, y: jnp.stack([x, y]), model, other)
    # Jitted, not eager: the same batching rules, one compiled program (and jax.jit(fn) on
    # `other` reuses the program compiled above).
    mapped = jax.jit(jax.vmap(fn))(stacked)
    assert_rel_close(mapped[0], eager, rtol=1e-5, what="vmap")
    assert_rel_close(mapped[1], jax.jit(fn)(other), rtol=1e-5, what="vmap")


# ------------------------------------------------------- nothing too large
def _largest_intermediate(fn, *args):
    """Element count of the largest array created while tracing ``fn`` (sub-jaxprs included)."""

    def walk(jaxpr):
        sizes = [0]
        for eqn in jaxpr.eqns:
            sizes += [int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape")]
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                sizes.append(walk(sub))
        return max(sizes)

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.fixture(scope="module")
def gpt2_xl():
    """A gpt2-xl-shaped model with abstract weights (nothing is allocated)."""
    config = config_from_hf(published_config("gpt2-xl"))
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return TransformerModel(params, config)


@pytest.mark.parametrize(
    "name", ["copying_scores", "copying_scores_ov", "composition_scores", "ov_circuit"]
)
def test_no_vocab_squared_or_per_head_dense_arrays(gpt2_xl, name):
    c = gpt2_xl.config
    per_head_dense = c.n_layers * c.n_heads * c.d_model**2
    largest = _largest_intermediate(FUNCTIONS[name] if name != "ov_circuit" else _ov, gpt2_xl)
    assert largest < min(per_head_dense, c.d_vocab**2) / 10, largest


def _ov(m):
    return circuits.ov_circuit(m).A


def test_full_ov_circuit_is_factored_for_gpt2_xl(gpt2_xl):
    c = gpt2_xl.config
    out = jax.eval_shape(circuits.full_ov_circuit, gpt2_xl)
    assert out.shape == (c.n_layers, c.n_heads, c.d_vocab, c.d_vocab) and out.mdim == c.d_head


@pytest.mark.parametrize("n_layers, multiple", [(2, 1), (12, 1), (12, 8), (48, 1), (48, 64)])
def test_composition_schedule_covers_every_pair(n_layers, multiple):
    left, right = circuits.composition_schedule(n_layers, 25, 64, multiple=multiple)
    assert left.shape == right.shape and left.shape[1] % multiple == 0
    n_pairs = n_layers * (n_layers - 1) // 2
    pairs = list(zip(left.reshape(-1)[:n_pairs], right.reshape(-1)[:n_pairs], strict=True))
    assert pairs == list(zip(*np.triu_indices(n_layers, k=1), strict=True))
    assert left.size - n_pairs < left.shape[0] * multiple  # little padding


def test_composition_scores_with_a_bad_schedule(model):
    bad = (np.zeros((1, 2), np.int32), np.zeros((1, 2), np.int32))
    with pytest.raises(ValueError, match="schedule must be two"):
        circuits.composition_scores(model, "K", schedule=bad)
