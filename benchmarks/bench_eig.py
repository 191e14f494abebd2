"""Time the pure-JAX eigensolver (``lowrank.eigensolver``) against ``jnp.linalg.eigvals``/``eig``.

Usage::

    python benchmarks/bench_eig.py --batch 144 --n 64 [--dtype float32] [--repeats 5]
        [--out benchmarks/results/eig_<backend>_<batch>x<n>.json]

Reports compile time, the median of ``--repeats`` runs after a warm-up, the sequential work of
the solver (Hessenberg steps and QR sweeps: the batch moves in lock step, so its slowest matrix
sets the number of sweeps), the convergence rate and the largest eigenvalue error (greedy
matching, over the spectral norm) against the LAPACK-backed reference (where the backend has
one).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank.eigensolver import EigResult, default_bulges, solve


def _time(fn: Callable[..., Any], x: jax.Array, repeats: int) -> dict[str, float]:
    jitted = jax.jit(fn)
    t0 = time.perf_counter()
    compiled = jitted.lower(x).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(x))
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(x))
        runs.append(time.perf_counter() - t0)
    return {"compile_s": compile_s, "median_s": statistics.median(runs), "min_s": min(runs)}


def _match_error(w: np.ndarray, ref: np.ndarray) -> float:
    """Largest distance under a greedy nearest matching of two multisets of eigenvalues."""
    cost = np.abs(w[:, None] - ref[None, :])
    worst = 0.0
    for _ in range(len(w)):
        i, j = np.unravel_index(np.argmin(cost), cost.shape)
        worst = max(worst, float(cost[i, j]))
        cost[i, :] = np.inf
        cost[:, j] = np.inf
    return worst


def _sequential_work(result: EigResult, n: int) -> dict[str, Any]:
    iterations = np.asarray(result.iterations)
    return {
        "hessenberg_steps": max(n - 2, 0),
        "qr_sweeps": int(iterations.max()),
        "qr_sweeps_mean": float(iterations.mean()),
    }


def main() -> None:
    """Run the benchmark from the command line and print (or write) the results as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=144)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--bulges",
        type=int,
        default=None,
        help="bulges per QR sweep (default: the platform's choice, 1 on CPU, "
        f"{default_bulges('gpu')} on GPU/TPU)",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip jnp.linalg timings")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.batch, args.n, args.n)), args.dtype)
    backend = jax.default_backend()
    bulges = args.bulges or default_bulges(backend)
    solved = jax.jit(lambda a: solve(a, bulges=bulges))(x)
    result: dict[str, Any] = {
        "backend": backend,
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "batch": args.batch,
        "n": args.n,
        "dtype": args.dtype,
        "bulges_per_sweep": bulges,
        "steps": _sequential_work(solved, args.n),
        "lowrank.eigvals": _time(lambda a: solve(a, bulges=bulges).values, x, args.repeats),
        "lowrank.eigensolver": _time(
            lambda a: solve(a, vectors=True, bulges=bulges), x, args.repeats
        ),
        "converged_fraction": float(jnp.mean(solved.converged)),
    }
    if not args.no_reference and backend in ("cpu", "gpu", "cuda"):
        result["jnp.linalg.eigvals"] = _time(jnp.linalg.eigvals, x, args.repeats)
        result["jnp.linalg.eig"] = _time(jnp.linalg.eig, x, args.repeats)
        ref = np.linalg.eigvals(np.asarray(x, np.float64))
        got = np.asarray(solved.values).astype(np.complex128)
        norms = np.linalg.norm(np.asarray(x, np.float64), 2, axis=(-2, -1))
        errors = [_match_error(g, r) for g, r in zip(got, ref, strict=True)]
        result["max_matched_error_over_norm"] = float(np.max(np.asarray(errors) / norms))
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
