"""Pod plans at real sizes: compile (never run) sharded analyses on a simulated CPU mesh.

For Llama-3.1-70B and -405B shapes, lower and compile lowrank's sharded analyses on a forced
``N``-device CPU mesh from abstract inputs (:func:`lowrank.sharding.abstract_model`: every leaf
a ``jax.ShapeDtypeStruct`` with its ``NamedSharding``; no weight is ever allocated), and read
per-device memory from ``compiled.memory_analysis()`` and FLOPs from
``compiled.cost_analysis()`` and from the program's jaxpr. Writes
``benchmarks/results/pod_plan.json`` and ``pod_plan.md`` (atomically) and prints the table.

Usage::

    python -m benchmarks.pod_plan                        # both models, 64 devices
    python -m benchmarks.pod_plan --devices 64,256 --tpu v5p
    python -m benchmarks.pod_plan --markdown-only benchmarks/results/pod_plan.json

The device count must be fixed before JAX starts its CPU backend, so each device count is
planned in a subprocess of its own (``--worker``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.helpers import LLAMA_3_1, cpu_model

SCHEMA = 1
RESULTS_DIR = Path(__file__).parent / "results"
GiB = 2**30

#: Published HF ``config.json`` dicts of the planned models, and a few-KiB Llama for tests.
MODELS: dict[str, dict[str, Any]] = {
    name: LLAMA_3_1[name] for name in ("Llama-3.1-70B", "Llama-3.1-405B")
} | {
    "tiny-llama": {
        **LLAMA_3_1["Llama-3.1-8B"],
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_attention_heads": 8,
        "num_hidden_layers": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
    }
}

ANALYSES = ("copying_scores", "ov_eigenvalues", "composition_K")
ANALYSIS_TITLES = {
    "copying_scores": "full-OV copying scores (W_E W_V W_O W_U eigenvalues)",
    "ov_eigenvalues": "OV eigenvalues (W_V W_O)",
    "composition_K": "K-composition, all head pairs",
}


@dataclass(frozen=True)
class Tpu:
    """A TPU generation's published per-chip peak and memory."""

    name: str
    bf16_flops: float  # peak FLOP/s per chip, bf16
    hbm_bytes: float
    source: str


TPUS = {
    "v5p": Tpu("TPU v5p", 459e12, 95e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v5e": Tpu("TPU v5e", 197e12, 16e9, "https://cloud.google.com/tpu/docs/v5e"),
}
#: float32 matmuls at ``Precision.HIGHEST`` run on TPU as 6 bf16 passes (bf16_6x).
FP32_FACTOR = 1 / 6
EFFICIENCY = 0.5  # fraction of that peak reached
#: FLOPs of the eigenvalues (no vectors) of one real nonsymmetric n x n matrix: Hessenberg
#: reduction (10/3 n^3) plus Francis QR iterations, ~10 n^3 in all (Golub & Van Loan, 4th ed.,
#: section 7.5.6).
EIGVALS_FLOPS_PER_N3 = 10.0
EIGVECS_FLOPS_PER_N3 = 25.0


# ------------------------------------------------------------------------ FLOPs of a jaxpr
def jaxpr_flops(closed: Any) -> dict[str, float]:
    """Matmul and eigenvalue FLOPs of a closed jaxpr, with loop trip counts.

    ``dot_general``: ``2 * |output| * |contraction|`` (x4 for complex operands); ``eig``:
    ``10 n^3`` per matrix (25 n^3 with eigenvectors). ``scan`` bodies count ``length`` times,
    ``cond`` its costliest branch, ``while`` bodies once (their trip count is data-dependent;
    counted in ``while_loops``). Shapes are the global ones: work is counted once, however
    it is split over devices (replicated work counts once too).

    Returns:
        ``{"matmul": ..., "eig": ..., "while_loops": ...}``.
    """
    totals = {"matmul": 0.0, "eig": 0.0, "while_loops": 0.0}
    _walk(closed.jaxpr, 1.0, totals)
    return totals


def _walk(jaxpr: Any, times: float, totals: dict[str, float]) -> None:
    import jax.extend.core as jex

    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            totals["matmul"] += times * _dot_flops(eqn)
        elif name == "eig":
            totals["eig"] += times * _eig_flops(eqn)
        elif name == "cond":
            branches = []
            for branch in eqn.params["branches"]:
                counts = {k: 0.0 for k in totals}
                _walk(branch.jaxpr, times, counts)
                branches.append(counts)
            worst = max(branches, key=lambda b: b["matmul"] + b["eig"])
            for k in totals:
                totals[k] += worst[k]
        else:
            factor = float(eqn.params["length"]) if name == "scan" else 1.0
            if name == "while":
                totals["while_loops"] += 1
            for sub in jex.jaxprs_in_params(eqn.params):
                _walk(sub, times * factor, totals)


def _dot_flops(eqn: Any) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval
    contraction = math.prod(lhs.shape[d] for d in lhs_contract)
    out = eqn.outvars[0].aval
    complex_factor = 4.0 if "complex" in str(out.dtype) else 1.0
    return complex_factor * 2.0 * math.prod(out.shape) * contraction


def _eig_flops(eqn: Any) -> float:
    shape = eqn.invars[0].aval.shape
    n, batch = shape[-1], math.prod(shape[:-2])
    vectors = eqn.params.get("compute_right_eigenvectors") or eqn.params.get(
        "compute_left_eigenvectors"
    )
    per_n3 = EIGVECS_FLOPS_PER_N3 if vectors else EIGVALS_FLOPS_PER_N3
    return batch * per_n3 * float(n) ** 3


# ----------------------------------------------------------------------- one compiled plan
def _program(analysis: str, mesh: Any) -> Any:
    """The jitted sharded program of ``analysis``: lowrank's own sharded entry points."""
    import jax

    from lowrank import circuits, sharding

    if analysis == "copying_scores":
        return sharding.sharded(circuits.copying_scores, mesh, sharding.PER_HEAD)
    if analysis == "ov_eigenvalues":
        fn = lambda m: circuits.ov_eigenvalues(m, full=False)  # noqa: E731
        return sharding.sharded(fn, mesh, sharding.PER_HEAD)
    if analysis == "composition_K":
        return jax.jit(lambda m: sharding.composition_scores(m, "K", mesh))
    raise ValueError(f"pod_plan: analysis must be one of {ANALYSES}, got {analysis!r}")


#: The parameters each analysis is given; the rest of the model is left out of its program.
#: (The OV analyses read only the shapes of W_Q, W_K: XLA drops them on TPU, but the CPU
#: mesh's ``custom_jvp`` wrapper keeps them as arguments.)
_ATTENTION = tuple(f"blocks.attn.W_{n}" for n in "QKVO")
READS = {
    "copying_scores": ("embed.W_E", "unembed.W_U", *_ATTENTION),
    "ov_eigenvalues": _ATTENTION,
    "composition_K": _ATTENTION,
}


def reads_only(model: Any, read: Sequence[str]) -> Any:
    """``model`` with only the parameters in ``read`` (dotted paths; an analysis' arguments).

    On a multi-device CPU mesh :func:`lowrank.sharding.sharded` wraps its function in a
    ``custom_jvp`` (one LAPACK call per matrix), which keeps every parameter as a program
    argument; on TPU XLA drops the ones not read. Passing only these makes both programs'
    arguments what the analysis reads.
    """
    from lowrank.models import TransformerModel

    params = model.params
    kept: dict[str, Any] = {}
    for path in read:
        group, *rest, leaf = path.split(".")
        src, dst = params[group], kept.setdefault(group, {})
        for key in rest:
            src, dst = src[key], dst.setdefault(key, {})
        dst[leaf] = src[leaf]
    return TransformerModel(kept, model.config, model.tokenizer)


def shard_bytes(tree: Any) -> int:
    """Bytes per device of a tree of sharded ``ShapeDtypeStruct`` (the largest shard's)."""
    import jax

    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        total += math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
    return total


def _leaves_abstract(tree: Any) -> bool:
    import jax

    return all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(tree))


def plan(model: str, analysis: str, n_devices: int, dtype: str = "float32") -> dict[str, Any]:
    """Compile ``analysis`` of ``model`` over the first ``n_devices`` devices; its numbers.

    Returns:
        A record: mesh shape, per-device bytes (argument, output, temp, generated code, and
        their total), XLA's FLOPs per device, the jaxpr's FLOPs in all, lower and compile
        seconds.

    Raises:
        ValueError: fewer devices than ``n_devices``, or an unknown model or analysis.
    """
    import jax
    import jax.numpy as jnp

    from lowrank import sharding
    from lowrank.models import config_from_hf

    if model not in MODELS:
        raise ValueError(f"pod_plan: model must be one of {sorted(MODELS)}, got {model!r}")
    if analysis not in READS:
        raise ValueError(f"pod_plan: analysis must be one of {ANALYSES}, got {analysis!r}")
    if jax.device_count() < n_devices:
        raise ValueError(f"pod_plan: needs {n_devices} devices, JAX has {jax.device_count()}")
    config = config_from_hf(MODELS[model])
    mesh = sharding.make_mesh(config.n_layers, config.n_heads, jax.devices()[:n_devices])
    abstract = sharding.abstract_model(config, mesh, jnp.dtype(dtype))
    assert _leaves_abstract(abstract), "a weight was materialised"
    inputs = reads_only(abstract, READS[analysis])
    fn = _program(analysis, mesh)
    start = time.perf_counter()
    if analysis == "composition_K":  # compiled as sharding.composition_scores compiles it
        compiled = sharding.compile_composition_scores(inputs, "K", mesh)
    else:
        compiled = fn.lower(inputs).compile()
    compiled_at = time.perf_counter()
    flops = jaxpr_flops(jax.make_jaxpr(fn)(inputs))
    return {
        "model": model,
        "analysis": analysis,
        "devices": n_devices,
        "mesh": dict(mesh.shape),
        "dtype": dtype,
        "memory_per_device": memory_per_device(compiled),
        "model_bytes_per_device": shard_bytes(abstract),
        "read_bytes_per_device": shard_bytes(inputs),
        "xla_flops_per_device": _xla_flops(compiled),
        "jaxpr_flops": flops,
        "compile_s": round(compiled_at - start, 3),  # lowering included
    }


def memory_per_device(compiled: Any) -> dict[str, int]:
    """Bytes per device from ``compiled.memory_analysis()``, and their sum (``total``)."""
    stats = compiled.memory_analysis()
    parts = ("argument", "output", "temp", "generated_code", "alias")
    out = {p: int(getattr(stats, f"{p}_size_in_bytes", 0) or 0) for p in parts}
    out["total"] = out["argument"] + out["output"] + out["temp"] + out["generated_code"]
    out["total"] -= out["alias"]  # aliased outputs reuse argument buffers
    return out


def _xla_flops(compiled: Any) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax: one dict per program
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


# ---------------------------------------------------------------------- worker processes
def _force_devices(n_devices: int) -> None:
    """Make JAX's CPU backend start with ``n_devices`` devices (before it starts)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={n_devices}")
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_num_cpu_devices", n_devices)


def _worker(args: argparse.Namespace) -> int:
    """Plan every (model, analysis) at one device count; one JSON record a line on stdout."""
    _force_devices(args.worker)
    for model in args.models:
        for analysis in args.analyses:
            record = plan(model, analysis, args.worker, args.dtype)
            print(json.dumps(record), flush=True)
    return 0


def run_devices(
    n_devices: int, models: Sequence[str], analyses: Sequence[str], dtype: str, timeout: float
) -> list[dict[str, Any]]:
    """Plan at ``n_devices`` in a subprocess; records, or one ``skipped`` record per plan."""
    command = [sys.executable, "-m", "benchmarks.pod_plan", "--worker", str(n_devices)]
    command += ["--models", ",".join(models), "--analyses", ",".join(analyses)]
    command += ["--dtype", dtype]
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    try:
        done = subprocess.run(
            command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout
        )
        lines, reason = (
            done.stdout.splitlines(),
            (None if done.returncode == 0 else f"exit {done.returncode}: {done.stderr[-2000:]}"),
        )
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        lines, reason = out.splitlines(), f"not compiled within {timeout:.0f} s"
    records = [json.loads(line) for line in lines if line.startswith("{")]
    planned = {(r["model"], r["analysis"]) for r in records}
    for model in models:
        for analysis in analyses:
            if (model, analysis) not in planned:
                records.append(
                    {"model": model, "analysis": analysis, "devices": n_devices, "skipped": reason}
                )
    return records


# --------------------------------------------------------------------------- the report
def machine_info() -> dict[str, Any]:
    """The machine the plans were compiled on and the library versions."""
    import jax
    import jaxlib

    return {
        "name": f"cpu-{os.cpu_count()}core",
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
    }


def report(records: list[dict[str, Any]], tpu: str) -> dict[str, Any]:
    """The JSON report: machine, assumptions, and every record with its projections."""
    chip = TPUS[tpu]
    return {
        "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "assumptions": {
            "tpu": chip.name,
            "tpu_bf16_flops_per_chip": chip.bf16_flops,
            "tpu_hbm_bytes_per_chip": chip.hbm_bytes,
            "tpu_source": chip.source,
            "fp32_factor": FP32_FACTOR,
            "efficiency": EFFICIENCY,
            "eigvals_flops_per_n3": EIGVALS_FLOPS_PER_N3,
        },
        "records": [{**r, **projection(r, chip)} for r in records],
    }


def analytic_flops(record: dict[str, Any]) -> float | None:
    """Total FLOPs of a record: the jaxpr's matmuls plus its eigenvalue estimate."""
    f = record.get("jaxpr_flops")
    return None if f is None else f["matmul"] + f["eig"]


def device_flops(record: dict[str, Any]) -> float | None:
    """FLOPs of the busiest device: ``max(XLA's per device, jaxpr matmuls / devices)`` + eig.

    XLA's per-device count includes work every device repeats (replicated operands) but counts
    a loop body once and no custom call (LAPACK); the jaxpr's counts loops in full but
    replicated work once. The larger is a lower bound on a device's matmul work; eigenvalues
    (``10 n^3`` each) split evenly over the devices.
    """
    f = record.get("jaxpr_flops")
    if f is None:
        return None
    n = record["devices"]
    return max(record.get("xla_flops_per_device") or 0.0, f["matmul"] / n) + f["eig"] / n


def projection(record: dict[str, Any], chip: Tpu) -> dict[str, Any]:
    """Projected seconds on ``record["devices"]`` chips of ``chip`` and whether it fits."""
    flops = device_flops(record)
    if flops is None:
        return {}
    per_device = record["memory_per_device"]["total"]
    return {
        "device_flops": flops,
        "projected_s": flops / (chip.bf16_flops * FP32_FACTOR * EFFICIENCY),
        "fits_hbm": per_device <= chip.hbm_bytes,
    }


def _si(x: float | None) -> str:
    if x is None:
        return "-"
    for scale, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g}"


def _seconds(s: float) -> str:
    return f"{s:.3g} s" if s < 120 else f"{s / 60:.3g} min"


def markdown(rep: dict[str, Any]) -> str:
    """The Markdown table of a report (one row per plan) and its assumptions."""
    a = rep["assumptions"]
    tpu = a["tpu"]
    head = (
        "| model | analysis | devices (mesh) | per-device GiB (arg / out / temp / total) "
        "| whole model GiB / device | XLA FLOPs / device | jaxpr FLOPs (matmul + eig) "
        f"| {tpu} time | fits {tpu} HBM | compile s |"
    )
    rows = [head, "|" + "---|" * 10]
    for r in rep["records"]:
        if "skipped" in r:
            rows.append(
                f"| {r['model']} | {r['analysis']} | {r['devices']} | skipped: "
                f"{str(r['skipped'])[:80]} | | | | | | |"
            )
            continue
        m = {k: v / GiB for k, v in r["memory_per_device"].items()}
        mesh = "x".join(str(v) for v in r["mesh"].values())
        f = r["jaxpr_flops"]
        eig = f" + {_si(f['eig'])}" if f["eig"] else ""
        at_least = "≥ " if f["eig"] else ""  # the eigensolver runs far below peak
        rows.append(
            f"| {r['model']} | {r['analysis']} | {r['devices']} ({mesh}) "
            f"| {m['argument']:.2f} / {m['output']:.3f} / {m['temp']:.2f} / **{m['total']:.2f}** "
            f"| {r['model_bytes_per_device'] / GiB:.1f} "
            f"| {_si(r['xla_flops_per_device'])} | {_si(f['matmul'])}{eig} "
            f"| {at_least}{_seconds(r['projected_s'])} | {'yes' if r['fits_hbm'] else 'no'} "
            f"| {r['compile_s']:.1f} |"
        )
    machine = rep["machine"]
    notes = [
        f"Compiled (never run) on {machine['name']} ({machine['cpu']}), jax {machine['jax']}, "
        f"{rep['records'][0].get('dtype', 'float32') if rep['records'] else 'float32'} weights.",
        f"{tpu}: {a['tpu_bf16_flops_per_chip'] / 1e12:.0f} TFLOP/s bf16 and "
        f"{a['tpu_hbm_bytes_per_chip'] / 1e9:.0f} GB HBM per chip ({a['tpu_source']}); time = "
        "the busiest device's FLOPs (max(XLA's per device, jaxpr matmuls / devices) + eig / "
        f"devices) / (peak x {a['fp32_factor']:.3g} (float32 at HIGHEST precision = 6 bf16 "
        f"passes) x {a['efficiency']:.0%} efficiency); ≥: eigenvalues, far below peak on TPU.",
        "XLA FLOPs count a loop body once and no custom call (LAPACK eig); jaxpr FLOPs count "
        "scans in full and eig as 10 n^3 per matrix.",
    ]
    return "\n".join(rows) + "\n\n" + "\n".join(f"* {n}" for n in notes) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 is not what a results file should have
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(rep: dict[str, Any], out_dir: Path, stem: str = "pod_plan") -> str:
    """Write ``<stem>.json`` and ``<stem>.md`` in ``out_dir``; return the Markdown."""
    table = markdown(rep)
    write_atomic(out_dir / f"{stem}.json", json.dumps(rep, indent=1) + "\n")
    write_atomic(out_dir / f"{stem}.md", table)
    return table


# ------------------------------------------------------------------------------ the CLI
def _names(text: str, allowed: Iterable[str], what: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise SystemExit(f"pod_plan: unknown {what} {unknown}; known: {sorted(allowed)}")
    return names


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pod_plan", description=__doc__)
    p.add_argument("--models", default="Llama-3.1-70B,Llama-3.1-405B")
    p.add_argument("--analyses", default=",".join(ANALYSES))
    p.add_argument("--devices", default="64", help="comma-separated CPU device counts")
    p.add_argument("--dtype", default="float32", help="weight dtype (lowrank loads float32)")
    p.add_argument("--tpu", default="v5p", choices=sorted(TPUS))
    p.add_argument("--timeout", type=float, default=600, help="seconds per device count")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--stem", default="pod_plan", help="results file names")
    p.add_argument("--markdown-only", type=Path, help="print the table of a results JSON")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Plan every (model, analysis, device count); write and print the report."""
    args = _parser().parse_args(argv)
    args.models = _names(args.models, MODELS, "models")
    args.analyses = _names(args.analyses, ANALYSES, "analyses")
    if args.worker:
        return _worker(args)
    if args.markdown_only:
        print(markdown(json.loads(args.markdown_only.read_text())))
        return 0
    records: list[dict[str, Any]] = []
    for n in (int(d) for d in args.devices.split(",")):
        records += run_devices(n, args.models, args.analyses, args.dtype, args.timeout)
    print(write_report(report(records, args.tpu), args.out_dir, args.stem))
    return 0


if __name__ == "__main__":
    sys.exit(main())
