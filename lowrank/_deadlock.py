"""Keeping jaxlib's CPU LAPACK kernels from deadlocking (README.md, Development).

jaxlib's CPU LAPACK kernels (qr, svd, eig, eigh, cholesky, triangular solves) split a batch over
XLA's intra-op thread pool and block on it. Two such calls running at once on a 2-core machine,
or one on each device of a multi-device CPU mesh, can hold every pool thread: a deadlock. Two
remedies, both switched by :data:`DEADLOCK_PRONE` (true for the jaxlib versions that have the
fault, :func:`deadlock_prone`):

* :class:`Serial` chains the decompositions of one program through data dependencies, so that
  XLA cannot run two of them at once;
* :func:`one_matrix_per_call` rewrites a function so that each decomposition loops over its
  batch; a kernel given a single matrix runs inline (``lowrank.sharding.sharded`` applies it
  on multi-device CPU meshes).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import jaxlib

Array = jax.Array
R = TypeVar("R")

#: The first jaxlib release without the fault: 0.12.0.1's CPU LAPACK kernels no longer split a
#: batch over the intra-op pool (the repro in shared/repro finishes), 0.10.2's hang. 0.11 was
#: not checked, so it counts as prone.
FIXED_IN = (0, 12)


def deadlock_prone(jaxlib_version: str) -> bool:
    """Whether a jaxlib of this version has the CPU LAPACK deadlock.

    Every release before :data:`FIXED_IN` has it; versions read as ``"0.10.2"``, ``"0.12.0.1"``
    or ``"0.12.1.dev20261101"``.

    Raises:
        ValueError: the version does not start with two numbers.
    """
    match = re.match(r"(\d+)\.(\d+)", jaxlib_version)
    if match is None:
        raise ValueError(f"deadlock_prone: cannot read a jaxlib version from {jaxlib_version!r}")
    return (int(match[1]), int(match[2])) < FIXED_IN


DEADLOCK_PRONE = deadlock_prone(jaxlib.__version__)
"""Whether this jaxlib's CPU LAPACK kernels can deadlock (the one switch of this module)."""

# Primitives that lower to LAPACK (or cuSOLVER) kernels; every operand has the same batch axes.
_DECOMPOSITIONS = frozenset(
    {
        "cholesky",
        "eig",
        "eigh",
        "geqp3",
        "geqrf",
        "hessenberg",
        "householder_product",
        "lu",
        "qr",
        "schur",
        "svd",
        "triangular_solve",
        "tridiagonal",
        "tridiagonal_solve",
    }
)


def after(x: Array, *deps: Any) -> Array:
    """``x`` unchanged in value, but computed only once the arrays in ``deps`` exist.

    Adds ``0 * isnan(d[0])`` for one entry of every non-empty leaf ``d``: an exact zero (a NaN in
    ``deps`` does not reach ``x``) that XLA cannot fold away. ``optimization_barrier`` does not do
    this: it aliases buffers and adds no dependency.
    """
    leaves = [d for d in jax.tree_util.tree_leaves(deps) if d.size]
    if not DEADLOCK_PRONE or not leaves:
        return x
    tie = sum(jnp.isnan(jnp.reshape(d, (-1,))[0]).astype(x.dtype) for d in leaves)
    return x + 0 * tie


class Serial:
    """Runs decompositions one after another: each call's input waits for the previous outputs.

    ``run = Serial()``, then ``run(fn, x, *args)`` is ``fn(x, *args)`` with ``x`` tied
    (:func:`after`) to the outputs of the previous call made through ``run``.
    """

    def __init__(self) -> None:
        self._last: Any = ()

    def __call__(self, fn: Callable[..., Any], x: Array, *args: Any, **kwargs: Any) -> Any:
        out = fn(after(x, self._last), *args, **kwargs)
        self._last = out
        return out


def one_matrix_per_call(fn: Callable[..., R]) -> Callable[..., R]:
    """Wrap ``fn`` so that its decompositions run one matrix at a time.

    Every decomposition in ``fn`` (nested jits, conds and loops included) is applied in a
    ``lax.map`` over its batch axes. Same results, derivatives too.

    The rewrite acts on the traced program of ``fn``, so no trace of ``fn`` made elsewhere (and
    cached by jax) is affected.
    """

    @jax.custom_jvp
    def looped(*args: Any) -> Any:
        closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
        out = _eval(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves(args))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), out)

    @looped.defjvp
    def _(primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> Any:
        # Rules of custom_jvp functions inside fn (which decompose too) come in through jax.jvp.
        # The primal output comes from its own call: reverse mode (jax >= 0.12) needs it known
        # apart from the tangents.
        tangents_out = one_matrix_per_call(lambda p, t: jax.jvp(fn, p, t)[1])(primals, tangents)
        return looped(*primals), tangents_out

    return functools.wraps(fn)(looped)


def _eval(jaxpr: jex.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """Evaluate ``jaxpr`` (as ``jax.core.eval_jaxpr``), looping over batched decompositions."""
    env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jex.Literal) else env[v]

    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        params = eqn.primitive.get_bind_params({k: _rewrite(v) for k, v in eqn.params.items()})
        batch = _batch_shape(eqn)
        if batch:
            outs = _map_over_batch(eqn.primitive, params, invals, batch)
        else:
            outs = eqn.primitive.bind(*invals, **params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in jaxpr.outvars]


def _batch_shape(eqn: jex.JaxprEqn) -> tuple[int, ...]:
    """The batch axes of a decomposition (those before its widest operand's matrix axes)."""
    if eqn.primitive.name not in _DECOMPOSITIONS:
        return ()
    shapes = [getattr(v.aval, "shape", ()) for v in eqn.invars]
    return tuple(max(shapes, key=len)[:-2])


def _map_over_batch(
    primitive: jex.Primitive, params: dict[str, Any], args: list[Array], batch: tuple[int, ...]
) -> list[Array]:
    def one(xs: Sequence[Array]) -> list[Array]:
        out = primitive.bind(*xs, **params)
        return out if primitive.multiple_results else [out]

    size = math.prod(batch)
    if size == 0:
        return one(args)
    flat = [x.reshape(size, *x.shape[len(batch) :]) for x in args]
    if size == 1:
        outs = [y[None] for y in one([x[0] for x in flat])]
    else:
        outs = jax.lax.map(one, flat)
    return [y.reshape(batch + y.shape[1:]) for y in outs]


def _rewrite(param: Any) -> Any:
    """A parameter with every sub-program holding a batched decomposition rewritten."""
    if type(param) is tuple:  # not NamedTuples (e.g. gather's dimension numbers)
        return tuple(_rewrite(p) for p in param)
    if isinstance(param, jex.ClosedJaxpr) and _has_batched_decomposition(param.jaxpr):
        avals = [
            jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type) for a in param.in_avals
        ]
        return jax.make_jaxpr(lambda *a: _eval(param.jaxpr, param.consts, a))(*avals)
    if isinstance(param, jex.Jaxpr) and _has_batched_decomposition(param):
        closed = _rewrite(jex.ClosedJaxpr(param, ()))
        assert not closed.consts, "a rewritten open jaxpr captured constants"
        return closed.jaxpr
    return param


def _has_batched_decomposition(jaxpr: jex.Jaxpr) -> bool:
    return any(
        _batch_shape(eqn) or any(map(_has_batched_decomposition, jex.jaxprs_in_params(eqn.params)))
        for eqn in jaxpr.eqns
    )
