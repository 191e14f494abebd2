"""Grouped-query attention in the analyses: TransformerLens parity and no repeated K/V.

The parity model is ``conftest.build_llama``'s random Llama (3 layers, 4 query heads sharing
2 key/value heads, d_model 32, d_head 8), processed as TransformerLens 3.9 processes it.
The structural checks trace the analyses of a Llama-3.1-8B-shaped abstract model (32 layers,
32 query heads, 8 key/value heads, d_model 4096, d_head 128) and walk the jaxprs.
"""

import types

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import assert_rel_close, match_multiset, to_numpy
from conftest import published_config, tl_rotary_model
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lowrank
from lowrank import circuits, interpret, sharding
from lowrank.factored import FactoredMatrix
from lowrank.models import TransformerModel, config_from_hf, init_params, load_pretrained

L, H, KV, D, DH = 3, 4, 2, 32, 8
KINDS = ("Q", "K", "V")
# Default processing of an RMSNorm model (TransformerLens does not centre its writing weights).
FLAGS = dict(
    fold_ln=True, center_writing_weights=False, center_unembed=True, fold_value_biases=True
)


@pytest.fixture(scope="module")
def ckpt(rotary_checkpoint):
    return rotary_checkpoint("llama")


@pytest.fixture(scope="module")
def model(ckpt):
    m = load_pretrained(ckpt.path, **FLAGS)
    assert (m.config.n_heads, m.config.n_kv_heads) == (H, KV)
    return m


@pytest.fixture(scope="module")
def tl(ckpt):
    return tl_rotary_model(ckpt, **FLAGS)


def f64(x):
    return np.asarray(x, dtype=np.float64)


def dense_circuits(model):
    """Per-query-head float64 OV and QK ``[L, H, d, d]`` from the repeated weights."""
    W_Q, W_K, W_V, W_O = (f64(w) for w in (model.W_Q, model.W_K, model.W_V, model.W_O))
    return W_V @ W_O, W_Q @ np.swapaxes(W_K, -1, -2)


def dense_composition(left, right):
    """``||L_i R_j||_F / (||L_i||_F ||R_j||_F)`` for all head pairs, masked, float64."""
    n_layers, n_heads = left.shape[:2]
    prod = np.einsum("lhab,mgbc->lhmgac", left, right)
    norm = np.sqrt(np.sum(prod**2, axis=(-2, -1)))
    left_norm = np.linalg.norm(left, axis=(-2, -1))
    right_norm = np.linalg.norm(right, axis=(-2, -1))
    scores = norm / (left_norm[:, :, None, None] * right_norm[None, None])
    mask = np.arange(n_layers)[:, None, None, None] < np.arange(n_layers)[None, None, :, None]
    return np.where(mask, scores, 0.0)


def copying_score(eig):
    return np.sum(eig, axis=-1).real / np.sum(np.abs(eig), axis=-1)


# ------------------------------------------------------------ TransformerLens parity
@pytest.mark.parametrize("kind", KINDS)
def test_composition_scores_match_transformer_lens(model, tl, kind):
    """Equal to TL's ``all_composition_scores`` (which repeats K/V) to 1e-5, and to float64."""
    ours = np.asarray(jax.jit(circuits.composition_scores, static_argnums=1)(model, kind))
    ref = to_numpy(tl.all_composition_scores(kind))
    assert ours.shape == ref.shape == (L, H, L, H)
    assert ref.max() > 0.1  # not trivially zero
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
    ov, qk = dense_circuits(model)
    right = {"Q": qk, "K": np.swapaxes(qk, -1, -2), "V": ov}[kind]
    assert_rel_close(ours, dense_composition(ov, right), rtol=1e-5, what=kind)
    # query heads that share a key/value head still score differently (nothing is averaged)
    assert np.abs(ours[0, :, 1:, 0] - ours[0, :, 1:, 1]).max() > 1e-3


def test_spectra_and_copying_scores_match_transformer_lens(model, tl):
    """OV eigenvalues, full and OV-only copying scores and QK singular values, per query head.

    Eigenvalues are compared as multisets (float32 solvers order them differently), relative
    to the largest; the factor 1e-5 is float32 rounding of the ``d_head x d_head`` cores.
    """
    tl_ov_eig = to_numpy(tl.OV.eigenvalues)
    for eig in (circuits.ov_eigenvalues(model, full=False), lowrank.eigvals(model.OV)):
        eig = np.asarray(eig).reshape(L, H, DH)
        assert_rel_close(match_multiset(eig, tl_ov_eig), tl_ov_eig, rtol=1e-5, what="OV eig")
    tl_full = to_numpy((tl.W_E @ tl.OV @ tl.W_U).eigenvalues)
    full = np.asarray(circuits.ov_eigenvalues(model))
    assert_rel_close(match_multiset(full, tl_full), tl_full, rtol=1e-5, what="full OV eig")
    assert_rel_close(circuits.copying_scores(model), copying_score(tl_full), rtol=1e-5)
    copy_ov = circuits.copying_scores(model, full=False)
    assert_rel_close(copy_ov, copying_score(tl_ov_eig), rtol=1e-5)
    _, S, _ = lowrank.svd(model.QK)
    _, S_tl, _ = tl.QK.svd()
    assert_rel_close(np.asarray(S).reshape(L, H, DH), to_numpy(S_tl), rtol=1e-5, what="QK S")


def test_circuits_are_grouped_products(model):
    """The returned circuits split the head axis and equal the dense per-query-head products."""
    ov, qk = dense_circuits(model)
    W_K, W_V = circuits.kv_weights(model)
    assert W_K.shape == W_V.shape == (L, KV, D, DH)
    np.testing.assert_array_equal(W_V, model.params["blocks"]["attn"]["W_V"])
    for M, dense in ((circuits.ov_circuit(model), ov), (circuits.qk_circuit(model), qk)):
        assert M.shape == (L, KV, 2, D, D)
        assert_rel_close(np.asarray(M.AB).reshape(L, H, D, D), dense, what="circuit")
    W_E = f64(model.W_E)
    full_ov, full_qk = circuits.full_ov_circuit(model), circuits.full_qk_circuit(model)
    assert full_ov.A.shape == (L, KV, 1, 101, DH) and full_ov.B.shape == (L, KV, 2, DH, 101)
    assert_rel_close(np.asarray(full_ov.AB).reshape(L, H, 101, 101), W_E @ ov @ f64(model.W_U))
    assert_rel_close(np.asarray(full_qk.AB).reshape(L, H, 101, 101), W_E @ qk @ W_E.T)


def test_svd_directions_of_a_grouped_head(model):
    """``svd_directions`` reads query head 3's value weights from key/value head 1."""
    ov, _ = dense_circuits(model)
    got = interpret.svd_directions(model, "OV", 2, 3, num_vectors=4, top_k=3)
    S = np.linalg.svd(ov[2, 3], compute_uv=False)[:4]
    assert_rel_close(got.singular_values, S, rtol=1e-5)
    other = interpret.svd_directions(model, "OV", 2, 2, num_vectors=4, top_k=3)
    assert np.abs(np.asarray(other.singular_values) - S).max() > 1e-3  # a different head


# ------------------------------------------------------------------ jit, vmap, errors
def _twin(model):
    """A second model of the same shapes (scaled, rotated weights) and the two stacked."""
    other = jax.tree_util.tree_map(lambda x: x * 0.5 + jnp.roll(x, 1, axis=-1) * 0.25, model)
    return other, jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), model, other)


GQA_FUNCTIONS = {
    "kv_weights": lambda m: circuits.kv_weights(m)[0],
    "composition_K": lambda m: circuits.composition_scores(m, "K"),
    "composition_Q": lambda m: circuits.composition_scores(m, "Q"),
    "copying_scores": lambda m: circuits.copying_scores(m, full=False),
    "full_qk": lambda m: circuits.full_qk_circuit(m).B,
}


@pytest.mark.parametrize("name", GQA_FUNCTIONS)
def test_jit_and_vmap(model, name):
    fn = GQA_FUNCTIONS[name]
    eager = fn(model)
    assert_rel_close(jax.jit(fn)(model), eager, rtol=1e-5, what="jit")
    other, stacked = _twin(model)
    mapped = jax.vmap(fn)(stacked)
    assert_rel_close(mapped[0], eager, rtol=1e-5, what="vmap")
    assert_rel_close(mapped[1], fn(other), rtol=1e-5, what="vmap")


def test_mismatched_key_value_heads_raise(model):
    weights = dict(W_Q=model.W_Q, W_O=model.W_O)
    three_kv = jnp.zeros((L, 3, D, DH))
    bad = types.SimpleNamespace(**weights, W_K=three_kv, W_V=three_kv)
    with pytest.raises(ValueError, match=r"n_kv_heads dividing the 4 query heads.*\(3, 3, 32, 8\)"):
        circuits.composition_scores(bad, "Q")
    uneven = types.SimpleNamespace(**weights, W_K=model.W_K_grouped, W_V=model.W_V)
    with pytest.raises(ValueError, match=r"got \(3, 2, 32, 8\) and \(3, 4, 32, 8\)"):
        circuits.kv_weights(uneven)
    plain = types.SimpleNamespace(**weights, W_K=model.W_K, W_V=model.W_V)  # TL's repeated view
    assert_rel_close(
        circuits.copying_scores(plain, full=False), circuits.copying_scores(model, full=False)
    )


# ------------------------------------------------------------------------- sharded
@pytest.mark.parametrize("heads", [2, 4])
def test_sharded_paths(model, heads):
    """Head meshes that split the key/value heads (2) or not (4: K/V split over layers only)."""
    mesh = sharding.make_mesh(L, H, devices=jax.devices()[:heads], shape=(1, heads))
    sharded_model = sharding.shard_model(model, mesh)
    kv_spec = sharded_model.W_K_grouped.sharding.spec
    assert kv_spec == (P("layers", "heads") if heads == 2 else P("layers"))
    for kind in KINDS:
        got = sharding.composition_scores(sharded_model, kind, mesh)
        assert got.sharding.is_equivalent_to(NamedSharding(mesh, sharding.PER_HEAD), 4)
        assert_rel_close(got, circuits.composition_scores(model, kind), rtol=1e-5, what=kind)
    fn = sharding.sharded(lambda m: circuits.copying_scores(m, full=False), mesh, sharding.PER_HEAD)
    assert_rel_close(fn(sharded_model), circuits.copying_scores(model, full=False), rtol=1e-5)


# ------------------------------------------------------------- no repeated K/V (jaxpr)
_COPIES = {"broadcast_in_dim", "gather", "concatenate", "pad", "dynamic_update_slice", "scatter"}


def _size(aval):
    return int(np.prod(aval.shape, dtype=np.int64))


def _is_var(v):
    return isinstance(v, jex.Var) and not isinstance(v, jex.Literal)


def repeated_kv(closed, sources, d_model, d_head, head_shapes):
    """Where a jaxpr copies key/value data into a per-query-head ``d_model x d_head`` block.

    Taints every variable computed from ``sources`` (the K/V inputs' indices), sub-jaxprs
    (jit, scan, while, cond, custom rules, shard_map) included, loops to a fixed point.
    Reports tainted variables of a shape in ``head_shapes`` and every broadcast / gather /
    concatenation / pad / update that makes a tainted array holding a ``d_model x d_head``
    block larger (a repeat).
    """
    found = []

    def block(aval):
        return d_model in aval.shape and d_head in aval.shape

    def check(eqn, ins):
        name = eqn.primitive.name
        for out in eqn.outvars:
            if tuple(out.aval.shape) in head_shapes:
                found.append(f"{name} -> {out.aval.shape}")
            for v in ins if name in _COPIES and block(out.aval) else ():
                if block(v.aval) and _size(out.aval) > _size(v.aval):
                    found.append(f"{name} {v.aval.shape} -> {out.aval.shape}")

    def walk(jaxpr, tainted):
        for eqn in jaxpr.eqns:
            ins = [v for v in eqn.invars if _is_var(v) and v in tainted]
            if ins:
                for sub in jex.jaxprs_in_params(eqn.params):
                    walk_loop(sub, _sub_inputs(eqn, sub, tainted), _carry_positions(eqn, sub))
                tainted.update(eqn.outvars)
                check(eqn, ins)

    def walk_loop(sub, tainted, carries):
        while True:  # feed tainted loop carries back until nothing new is tainted
            before = len(tainted)
            walk(sub, tainted)
            tainted.update(sub.invars[i] for o, i in carries if sub.outvars[o] in tainted)
            if len(tainted) == before:
                return

    walk(closed.jaxpr, {closed.jaxpr.invars[i] for i in sources})
    return sorted(set(found))


def _sub_inputs(eqn, sub, tainted):
    """The tainted inputs of a sub-jaxpr: the last ``len(sub.invars)`` of the equation's.

    That is the layout of jit, scan, cond branches and while bodies; anything else is
    tainted whole.
    """
    offset = len(eqn.invars) - len(sub.invars)
    if offset < 0:
        return set(sub.invars)
    outer = eqn.invars[offset:]
    return {s for s, v in zip(sub.invars, outer, strict=True) if _is_var(v) and v in tainted}


def _scan_counts(eqn):
    """A scan's numbers of constants and carries (jax >= 0.12 packs its operands in ``ft_in``)."""
    if "num_consts" in eqn.params:
        return eqn.params["num_consts"], eqn.params["num_carry"]
    consts, carry, _ = eqn.params["ft_in"].update(list(eqn.invars)).unpack()
    return len(consts), len(carry)


def _carry_positions(eqn, sub):
    """(output index, input index) pairs of a loop body's carries."""
    name = eqn.primitive.name
    if name == "scan":
        n_consts, n_carry = _scan_counts(eqn)
        return [(i, n_consts + i) for i in range(n_carry)]
    if name == "while" and sub is eqn.params["body_jaxpr"].jaxpr:
        n_consts = eqn.params["body_nconsts"]
        return [(i, n_consts + i) for i in range(len(sub.outvars))]
    return []


@pytest.fixture(scope="module")
def llama_8b():
    """Llama-3.1-8B-shaped model of abstract leaves, and the indices of its K/V leaves."""
    config = config_from_hf(published_config("Llama-3.1-8B"))
    assert (config.n_layers, config.n_heads, config.n_kv_heads) == (32, 32, 8)
    assert (config.d_model, config.d_head) == (4096, 128)
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    model = TransformerModel(abstract, config)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(model)]
    sources = [i for i, p in enumerate(paths) if p.endswith(("['W_K']", "['W_V']"))]
    assert len(sources) == 2
    return model, sources


def _check(fn, llama_8b):
    model, sources = llama_8b
    closed = jax.make_jaxpr(fn)(model)
    # [L, H, d_model, d_head] computed from K/V (split [L, n_kv, group, ...] arrays may be
    # products of per-query-head and K/V factors, such as the singular vectors of QK, which
    # are per query head by nature; copies are caught by repeated_kv's second rule).
    per_query_head = {(32, 32, 4096, 128), (32, 32, 128, 4096)}
    return repeated_kv(closed, sources, 4096, 128, per_query_head)


MESH_SHAPE = (4, 2)  # 8 CPU devices: layers 4 ways, heads (and the 8 K/V heads) 2 ways

ANALYSES = {
    "copying_scores": circuits.copying_scores,
    "copying_scores_ov": lambda m: circuits.copying_scores(m, full=False),
    "OV_eigvals": lambda m: lowrank.eigvals(m.OV),
    "QK_svd": lambda m: lowrank.svd(m.QK),
    "svd_directions": lambda m: interpret.svd_directions(m, "OV", 5, 7).activations,
    **{f"composition_{k}": (lambda m, k=k: circuits.composition_scores(m, k)) for k in KINDS},
}


def _sharded(name):
    mesh = sharding.make_mesh(32, 32, shape=MESH_SHAPE)
    if name.startswith("composition_"):
        return lambda m: sharding.composition_scores(m, name[-1], mesh)
    return sharding.sharded(ANALYSES[name], mesh, sharding.PER_HEAD)


@pytest.mark.parametrize("name", ANALYSES)
def test_no_repeated_kv_in_jaxpr(llama_8b, name):
    assert _check(ANALYSES[name], llama_8b) == []


@pytest.mark.parametrize(
    "name",
    ["copying_scores", "OV_eigvals", "QK_svd", "composition_Q", "composition_K", "composition_V"],
)
def test_no_repeated_kv_in_sharded_jaxpr(llama_8b, name):
    assert _check(_sharded(name), llama_8b) == []


def test_the_jaxpr_check_sees_a_repeat(llama_8b):
    """The check flags TransformerLens's repeated view and an analysis built on it."""
    assert _check(lambda m: m.W_K, llama_8b)
    assert _check(lambda m: lowrank.eigvals(FactoredMatrix(m.W_V, m.W_O)), llama_8b)
    broadcast = lambda m: jnp.broadcast_to(m.W_K_grouped[:, :, None], (32, 8, 4, 4096, 128))  # noqa: E731
    assert _check(broadcast, llama_8b)
    # inside jit (a sharded analysis) and inside a scan body
    mesh = sharding.make_mesh(32, 32, shape=MESH_SHAPE)
    naive = sharding.sharded(lambda m: lowrank.eigvals(FactoredMatrix(m.W_V, m.W_O)), mesh, P())
    assert _check(naive, llama_8b)

    def per_layer(m):
        return jax.lax.scan(lambda c, w: (c, jnp.repeat(w, 4, axis=0)), None, m.W_V_grouped)[1]

    assert _check(per_layer, llama_8b) == [
        "broadcast_in_dim (8, 4096, 128) -> (8, 4, 4096, 128)",  # in the body
        "scan -> (32, 32, 4096, 128)",  # its stacked output
    ]
