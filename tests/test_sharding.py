"""Analyses on a (layers, heads) mesh of 8 CPU devices equal the single-device results."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import assert_rel_close, decomposition_operand_shapes
from conftest import published_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lowrank
from lowrank import circuits, interpret, sharding
from lowrank.models import (
    ModelConfig,
    TransformerModel,
    config_from_hf,
    init_params,
    load_pretrained,
)


def gpt2_small(d_vocab=1024):
    """gpt2-small shapes (12 x 12 heads, d_model 768) with a smaller vocabulary (CPU memory)."""
    config = config_from_hf({**published_config("gpt2"), "vocab_size": d_vocab})
    return TransformerModel(init_params(config, jax.random.key(0)), config)


@pytest.fixture(scope="module")
def model():
    return gpt2_small()


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(12, 12)


@pytest.fixture(scope="module")
def sharded_model(model, mesh):
    return sharding.shard_model(model, mesh)


def test_make_mesh(mesh):
    assert jax.device_count() == 8
    assert mesh.axis_names == ("layers", "heads") and mesh.devices.shape == (4, 2)
    assert sharding.make_mesh(48, 25, shape=(8, 1)).devices.shape == (8, 1)
    with pytest.raises(ValueError, match=r"8 devices cannot be split.*n_layers=3.*n_heads=5"):
        sharding.make_mesh(3, 5)
    with pytest.raises(ValueError, match=r"shape \(2, 2\) needs 4 devices \(got 8\)"):
        sharding.make_mesh(12, 12, shape=(2, 2))


def test_shard_model_places_every_leaf(sharded_model, mesh):
    spec = {path: leaf.sharding.spec for path, leaf in _flat(sharded_model.params).items()}
    assert spec["blocks.attn.W_Q"] == P("layers", "heads")
    assert spec["blocks.attn.b_O"] == P("layers")
    assert spec["blocks.mlp.W_in"] == P("layers")
    assert spec["embed.W_E"] == P()
    W_V = sharded_model.W_V
    assert len(W_V.addressable_shards) == 8 and W_V.addressable_shards[0].data.shape[:2] == (3, 6)


def _dotted(path):
    return ".".join(str(k.key) for k in path)


def _flat(tree):
    return {_dotted(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


# Each analysis compiles twice (single device, sharded). Not repeated here: ov_eigenvalues
# (the full-circuit eigenvalues that copying_scores sums) and copying_scores(full=False) (the
# W_O W_V eigenvalues of OV_eigvals, run sharded by test_output_specs_are_explicit).
HEAD_ANALYSES = {
    "copying_scores": circuits.copying_scores,
    "OV_eigvals": lambda m: lowrank.eigvals(m.OV),
    "QK_eigvals": lambda m: lowrank.eigvals(m.QK),
    "OV_svdvals": lambda m: lowrank.svdvals(m.OV),
    "OV_norm": lambda m: lowrank.norm(m.OV),
    "OV_svd": lambda m: lowrank.svd(m.OV)[1],
    "full_ov_factor": lambda m: circuits.full_ov_circuit(m).B,
    "full_qk_factor": lambda m: circuits.full_qk_circuit(m).A,
}


@pytest.mark.parametrize("name", HEAD_ANALYSES)
def test_per_head_analyses(model, sharded_model, mesh, name):
    fn = HEAD_ANALYSES[name]
    expected = jax.jit(fn)(model)
    got = sharding.sharded(fn, mesh, sharding.PER_HEAD)(sharded_model)
    assert got.sharding.is_equivalent_to(NamedSharding(mesh, P("layers", "heads")), got.ndim)
    if jnp.iscomplexobj(got):  # eigenvalues of one head can come out in another order
        got, expected = jnp.sort_complex(got), jnp.sort_complex(expected)
    assert_rel_close(got, expected, rtol=1e-5, what=name)


@pytest.mark.parametrize("prone", [True, False], ids=["jaxlib<0.12", "jaxlib>=0.12"])
def test_sharded_decompositions_take_one_matrix_per_lapack_call(model, mesh, monkeypatch, prone):
    """Sharded programs decompose one matrix per call where jaxlib can deadlock, whatever fn
    traced before, and keep their batched calls where it cannot.

    On a multi-device CPU mesh (8 devices here) concurrent batched LAPACK calls can deadlock
    jaxlib 0.10.
    """
    monkeypatch.setattr(lowrank._deadlock, "DEADLOCK_PRONE", prone)
    fn = HEAD_ANALYSES["OV_svd"]
    assert any(len(s) > 2 for s in decomposition_operand_shapes(jax.make_jaxpr(fn)(model).jaxpr))
    traced = jax.make_jaxpr(sharding.sharded(fn, mesh, sharding.PER_HEAD))(model)
    shapes = decomposition_operand_shapes(traced.jaxpr)
    assert shapes and all(len(shape) == 2 for shape in shapes) is prone, shapes


@pytest.mark.parametrize("kind", ["Q", "K", "V"])
def test_composition_scores(model, sharded_model, mesh, kind):
    expected = jax.jit(circuits.composition_scores, static_argnums=1)(model, kind)
    got = sharding.composition_scores(sharded_model, kind, mesh)
    assert got.sharding.is_equivalent_to(NamedSharding(mesh, P("layers", "heads")), 4)
    assert_rel_close(got, expected, rtol=1e-5)


def test_replicated_analyses(model, sharded_model, mesh):
    for fn in (
        lambda m: interpret.svd_directions(m, "OV", 3, 5, num_vectors=4, top_k=5).activations,
        # a 16 x 768 grid: every one of the 8 devices decomposes the whole (replicated) grid
        lambda m: interpret.embedding_spectra(m, jnp.arange(4), jnp.arange(4))["W_E + W_pos"],
    ):
        expected = jax.jit(fn)(model)
        got = sharding.sharded(fn, mesh, sharding.REPLICATED)(sharded_model)
        assert got.sharding.is_fully_replicated
        assert_rel_close(jnp.abs(got), jnp.abs(expected), rtol=1e-5)


# ------------------------------------------------------------------- HLO checks
def _gathered_shapes(hlo: str) -> list[tuple[int, ...]]:
    """Result shapes of every all-gather / all-to-all / collective-permute / all-reduce."""
    shapes = []
    for line in hlo.splitlines():
        if not re.search(
            r"\b(all-gather|all-to-all|collective-permute|all-reduce)(-start)?\(", line
        ):
            continue
        lhs = line.split("=", 1)[1].split("(")[0] if "=" in line else line
        for dims in re.findall(r"[a-z0-9]+\[([0-9,]*)\]", lhs):
            shapes.append(tuple(int(d) for d in dims.split(",") if d))
    return shapes


def _sharded_hlo(model, mesh):
    """Compiled HLO of sharded composition scores and copying scores."""
    composition = jax.jit(lambda m: sharding.composition_scores(m, "K", mesh))
    copying = jax.jit(
        circuits.copying_scores, out_shardings=NamedSharding(mesh, P("layers", "heads"))
    )
    return [fn.lower(model).compile().as_text() for fn in (composition, copying)]


def _has_dense_matrix(shape, d_model):
    return sum(n >= d_model for n in shape) >= 2


def test_no_per_head_dense_array_is_gathered(mesh):
    # n_heads * d_head != d_model, so a [..., d, d] collective can only be a product of
    # factors (a per-head d x d or V x V matrix), never a reshaped weight.
    config = ModelConfig("GPT2LMHeadModel", 4, 4, 96, 16, 128, 300, 32)
    model = sharding.shard_model(
        TransformerModel(init_params(config, jax.random.key(1)), config), mesh
    )
    composition, copying = _sharded_hlo(model, mesh)
    # composition needs other devices' right-layer weights; copying needs nothing from them.
    assert _gathered_shapes(composition), "expected collectives in sharded composition scores"
    for hlo in (composition, copying):
        dense = [s for s in _gathered_shapes(hlo) if _has_dense_matrix(s, config.d_model)]
        assert not dense, dense
    # ...and the check does see one when it is there
    gathered = jax.jit(lambda m: m.OV.AB, out_shardings=NamedSharding(mesh, P()))
    shapes = _gathered_shapes(gathered.lower(model).compile().as_text())
    assert any(_has_dense_matrix(s, config.d_model) for s in shapes)


def test_gpt2_small_moves_less_than_a_device_share_of_ov(sharded_model, mesh):
    """At gpt2-small shapes layer-stacked weights are [768, 768] too: bound the sizes instead."""
    c = sharded_model.config
    device_share = c.n_layers * c.n_heads * c.d_model**2 // len(mesh.devices.flat)
    for hlo in _sharded_hlo(sharded_model, mesh):
        sizes = [int(np.prod(s)) for s in _gathered_shapes(hlo)] or [0]
        assert max(sizes) < device_share, (max(sizes), device_share)


def test_gpt2_xl_composition_memory_per_device():
    config = config_from_hf(published_config("gpt2-xl"))
    mesh = sharding.make_mesh(config.n_layers, config.n_heads, shape=(8, 1))
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    specs = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=sharding.param_sharding(_dotted(path), mesh)
        ),
        abstract,
    )
    model = TransformerModel(specs, config)
    compiled = jax.jit(lambda m: sharding.composition_scores(m, "K", mesh)).lower(model)
    memory = compiled.compile().memory_analysis()
    per_device = sum(
        getattr(memory, f"{part}_size_in_bytes") for part in ("temp", "argument", "output")
    )
    print(f"gpt2-xl K-composition over 8 devices: {per_device / 2**30:.2f} GiB per device")
    assert per_device < 4 * 2**30, per_device / 2**30


# --------------------------------------------------------------- sharded loading
def test_sharded_place_loads_each_slice(gpt2_checkpoint):
    mesh = sharding.make_mesh(3, 4, devices=jax.devices()[:4], shape=(1, 4))
    model = load_pretrained(gpt2_checkpoint.path, place=sharding.sharded_place(mesh))
    reference = load_pretrained(gpt2_checkpoint.path)
    assert model.W_Q.sharding.spec == P("layers", "heads")
    assert model.W_Q.addressable_shards[0].data.shape == (3, 1, 32, 8)
    for path, leaf in _flat(model.params).items():
        np.testing.assert_array_equal(leaf, _flat(reference.params)[path], err_msg=path)


def test_shard_factored(model, mesh):
    OV = sharding.shard_factored(model.OV, mesh)
    assert OV.A.sharding.spec == P("layers", "heads") and OV.B.sharding.spec == P("layers", "heads")
    np.testing.assert_array_equal(OV.A, model.OV.A)
    np.testing.assert_array_equal(OV.B, model.OV.B)
    got = sharding.sharded(lowrank.norm, mesh, sharding.PER_HEAD)(OV)
    assert got.sharding.is_equivalent_to(NamedSharding(mesh, P("layers", "heads")), 2)
    assert_rel_close(got, jax.jit(lowrank.norm)(model.OV), rtol=1e-5)
    with pytest.raises(ValueError, match=r"needs factors \[L, H, \.\.\.\].*\(768, 64\)"):
        sharding.shard_factored(model.OV[0, 0], mesh)


def test_output_specs_are_explicit(model, sharded_model, mesh):
    # L == H == 12: an [L, L] result must not be taken for per-head [L, H] output.
    def layer_by_layer_and_heads(m):
        return jnp.ones((12, 12)) * m.W_E[0, 0], circuits.copying_scores(m, full=False)

    square, per_head = sharding.sharded(
        layer_by_layer_and_heads, mesh, (sharding.REPLICATED, sharding.PER_HEAD)
    )(sharded_model)
    assert square.sharding.is_fully_replicated
    assert per_head.sharding.is_equivalent_to(NamedSharding(mesh, P("layers", "heads")), 2)
    assert_rel_close(per_head, jax.jit(lambda m: circuits.copying_scores(m, full=False))(model))
