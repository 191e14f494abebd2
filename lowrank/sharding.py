"""Running the analyses over a device mesh with named ``layers`` and ``heads`` axes.

Weights with ``[L, H, ...]`` axes are split over both mesh axes, ``[L, ...]`` weights over
``layers``, everything else (embeddings, unembedding) is replicated. Per-head analyses then
run where their heads live; :func:`composition_scores` splits the (left layer, right layer)
pairs over every device instead. Nothing ``[L, H, d_model, d_model]`` or ``d_vocab x
d_vocab`` is gathered anywhere. Grouped-query models keep their key/value weights grouped
(``[L, n_kv_heads, ...]``, split over ``heads`` when it divides ``n_kv_heads``, else over
``layers`` only) and the analyses read them grouped, as unsharded. On several hosts, call
:func:`jax.distributed.initialize` first; :func:`sharded_place` then lets each host read only
its part of a checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import config as _jax_config  # no public context manager for the partitioner
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lowrank import _deadlock, circuits
from lowrank.factored import FactoredMatrix
from lowrank.models import ModelConfig, TransformerModel, init_params, place_params
from lowrank.models._common import dotted_path

LAYERS, HEADS = "layers", "heads"
PER_HEAD = P(LAYERS, HEADS)  # [L, H, ...] split over the (layers, heads) mesh
REPLICATED = P()

__all__ = [
    "HEADS",
    "LAYERS",
    "PER_HEAD",
    "REPLICATED",
    "abstract_model",
    "compile_composition_scores",
    "composition_scores",
    "make_mesh",
    "param_sharding",
    "shard_factored",
    "shard_model",
    "sharded",
    "sharded_place",
    "to_host",
]


def make_mesh(
    n_layers: int,
    n_heads: int,
    devices: Sequence[Any] | None = None,
    shape: tuple[int, int] | None = None,
) -> Mesh:
    """A ``(layers, heads)`` mesh over ``devices`` (default: all) that divides ``L`` and ``H``.

    Args:
        shape: ``(layer_devices, head_devices)``; by default the factorisation of the device
            count with the most devices on ``layers`` that divides both ``L`` and ``H``.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if shape is None:
        options = [(a, n // a) for a in range(n, 0, -1) if n % a == 0]
        fitting = [(a, b) for a, b in options if n_layers % a == 0 and n_heads % b == 0]
        if not fitting:
            raise ValueError(
                f"make_mesh: {n} devices cannot be split as (layers x heads) with layers "
                f"dividing n_layers={n_layers} and heads dividing n_heads={n_heads}; pass "
                "fewer devices or an explicit shape"
            )
        shape = fitting[0]
    a, b = shape
    if a * b != n or n_layers % a or n_heads % b:
        raise ValueError(
            f"make_mesh: shape {shape} needs {a * b} devices (got {n}) and must divide "
            f"(n_layers, n_heads) = ({n_layers}, {n_heads})"
        )
    return Mesh(np.asarray(devices, dtype=object).reshape(a, b), (LAYERS, HEADS))


def param_sharding(path: str, mesh: Mesh, shape: Sequence[int] | None = None) -> NamedSharding:
    """The sharding of one canonical parameter (``path`` like ``"blocks.attn.W_Q"``).

    Args:
        path: the parameter's dotted path in the tree.
        mesh: a ``(layers, heads)`` mesh.
        shape: the parameter's shape, if known. Grouped key/value weights ``[L, n_kv_heads,
            ...]`` whose ``n_kv_heads`` the ``heads`` mesh axis does not divide are split over
            ``layers`` only (each head device keeps every key/value head of its layers).
    """
    if not path.startswith("blocks."):
        return NamedSharding(mesh, P())
    per_head = path.split(".")[-1] in {"W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"}
    if per_head and shape is not None and shape[1] % mesh.shape[HEADS]:
        per_head = False
    return NamedSharding(mesh, P(LAYERS, HEADS) if per_head else P(LAYERS))


def shard_model(model: TransformerModel, mesh: Mesh) -> TransformerModel:
    """``model`` with every parameter placed by :func:`param_sharding`."""
    params = place_params(
        model.params, place=lambda path, x: jax.device_put(x, param_sharding(path, mesh, x.shape))
    )
    return TransformerModel(params, model.config, model.tokenizer)


def abstract_model(config: ModelConfig, mesh: Mesh, dtype: Any = jnp.float32) -> TransformerModel:
    """A model of ``config`` with ``jax.ShapeDtypeStruct`` leaves sharded as :func:`shard_model`.

    Nothing is allocated: lower a sharded analysis with it (``jax.jit(fn).lower(model)``) to
    read a pod's per-device memory and FLOPs from the compiled program before loading weights.
    """
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0), dtype=dtype))

    def spec(path: Any, x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        placed = param_sharding(dotted_path(path), mesh, x.shape)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placed)

    return TransformerModel(jax.tree_util.tree_map_with_path(spec, shapes), config)


def shard_factored(M: FactoredMatrix, mesh: Mesh) -> FactoredMatrix:
    """A ``FactoredMatrix [L, H, l, r]`` with its leading axes split over ``(layers, heads)``."""
    if M.A.ndim < 4 or M.B.ndim < 4:
        raise ValueError(f"shard_factored: needs factors [L, H, ...], got {M.A.shape}, {M.B.shape}")
    spec = NamedSharding(mesh, P(LAYERS, HEADS))
    return FactoredMatrix(jax.device_put(M.A, spec), jax.device_put(M.B, spec))


def sharded_place(mesh: Mesh) -> Callable[[str, np.ndarray], jax.Array]:
    """Make a ``place`` hook for :func:`lowrank.models.load_pretrained` that shards over ``mesh``.

    Each process copies only the slices its own devices hold (from the host array, e.g.
    memory-mapped).
    """

    def place(path: str, host: np.ndarray) -> jax.Array:
        sharding = param_sharding(path, mesh, host.shape)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return place


def sharded(fn: Callable[..., Any], mesh: Mesh, out_specs: Any) -> Callable[..., Any]:
    """``jax.jit(fn)`` with its outputs placed by ``out_specs`` on ``mesh``.

    Args:
        out_specs: a ``PartitionSpec`` for every output, or a pytree of them matching (a
            prefix of) ``fn``'s outputs: :data:`PER_HEAD` keeps ``[L, H, ...]`` results split
            where their heads live, :data:`REPLICATED` copies a result to every device. Inputs
            keep the shardings they have (see :func:`shard_model`).

    On a multi-device CPU mesh every decomposition in ``fn`` runs one matrix per LAPACK call
    (``lax.map`` over its batch), so that concurrent devices cannot deadlock jaxlib's kernels.
    """
    on_cpu = mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"
    if on_cpu and _deadlock.DEADLOCK_PRONE:
        fn = _deadlock.one_matrix_per_call(fn)
    out = jax.tree_util.tree_map(
        lambda spec: NamedSharding(mesh, spec), out_specs, is_leaf=lambda x: isinstance(x, P)
    )
    return jax.jit(fn, out_shardings=out)


def composition_scores(model: TransformerModel, kind: circuits.CompositionKind, mesh: Mesh) -> Any:
    """:func:`lowrank.circuits.composition_scores` with the layer pairs split over all devices.

    Each scan step's (left layer, right layer) pairs are split evenly over every device of the
    mesh; the ``[L, H, L, H]`` result is split over ``(layers, heads)`` on its left-head axes.
    """
    with _partitioner_for(model.config, mesh):
        return _composition_program(model.config, kind, mesh)(model)


def compile_composition_scores(
    model: TransformerModel, kind: circuits.CompositionKind, mesh: Mesh
) -> jax.stages.Compiled:
    """The compiled program of :func:`composition_scores`, e.g. for an :func:`abstract_model`.

    Read a pod's per-device memory (``.memory_analysis()``) and FLOPs (``.cost_analysis()``)
    from it without loading weights or running it.
    """
    with _partitioner_for(model.config, mesh):
        return _composition_program(model.config, kind, mesh).lower(model).compile()


def _composition_program(
    config: ModelConfig, kind: circuits.CompositionKind, mesh: Mesh
) -> jax.stages.Wrapped:
    pairs = NamedSharding(mesh, P(None, (LAYERS, HEADS)))
    schedule = circuits.composition_schedule(
        config.n_layers, config.n_heads, config.d_head, multiple=mesh.devices.size
    )

    def split_pairs(model: TransformerModel) -> Any:
        steps = jax.lax.with_sharding_constraint(tuple(map(jnp.asarray, schedule)), pairs)
        return circuits.composition_scores(model, kind, schedule=steps)

    return jax.jit(split_pairs, out_shardings=NamedSharding(mesh, PER_HEAD))


def _partitioner_for(config: ModelConfig, mesh: Mesh) -> Any:
    """The SPMD partitioner to compile :func:`composition_scores` with on ``mesh``.

    Shardy (jax >= 0.12's default) aborts the process (a failed check in XLA's dot
    partitioner, "ReplicateOnLastTileDim should not be called for HloShardingV3") when the
    layer pairs are split over ``heads`` devices that hold whole key/value heads (grouped-query
    models whose ``n_kv_heads`` the ``heads`` axis does not divide, e.g. Llama-3.1-405B on a
    2 x 32 mesh). GSPMD partitions the same program correctly, so it compiles that case. The
    flag is part of jit's cache key: other programs are unaffected.
    """
    heads = mesh.shape[HEADS]
    kv_whole = config.n_kv_heads % heads != 0
    use_shardy = getattr(_jax_config, "use_shardy_partitioner", None)
    if not (kv_whole and use_shardy is not None and use_shardy.value):
        return contextlib.nullcontext()
    return use_shardy(False)


def to_host(x: Any) -> np.ndarray:
    """``x`` as a NumPy array on this process, gathered from the other processes if needed."""
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)
