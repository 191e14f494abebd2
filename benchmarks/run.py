"""Time lowrank against TransformerLens on the same weights; write results/<machine>.json/.md.

Usage::

    python -m benchmarks.run                                   # gpt2-small, every op
    python -m benchmarks.run --shapes gpt2-small,gpt2-medium --ops ov_eigenvalues,forward
    python -m benchmarks.run --checkpoint ~/models/Llama-3.2-1B          # a local HF checkpoint
    python -m benchmarks.run --markdown-only benchmarks/results/cpu-2core.json
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import numpy as np

from benchmarks import measure
from benchmarks.helpers import cpu_model
from benchmarks.mirror import Unmirrorable
from benchmarks.ops import OPS, OPS_BY_NAME, Op, TorchSide, compare
from benchmarks.shapes import (
    SHAPE_NAMES,
    Unavailable,
    Weights,
    build_weights,
    check_checkpoint,
    checkpoint_weights,
)
from benchmarks.tl_reference import reference_kind
from lowrank.models import CheckpointError

SCHEMA = 1
RESULTS_DIR = Path(__file__).parent / "results"
TOLERANCE = 1e-3  # max relative error at which lowrank and TL "agree" (see README)
MEMORY_FRACTION = 0.8  # skip TL when its estimated memory exceeds this share of what is free


# ------------------------------------------------------------------------------ machine
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def default_machine_name() -> str:
    """``cpu-2core``, ``gpu-H100``, ``tpu-v5-lite``: platform + device kind (+ core count)."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return f"cpu-{os.cpu_count()}core"
    kind = re.sub(r"^NVIDIA\s+", "", device.device_kind).split()[0] if device.device_kind else ""
    if device.platform == "tpu":
        kind = device.device_kind.lower().replace("tpu", "").strip()
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{device.platform}-{kind}").strip("-")


def machine_info(name: str, torch_device: str) -> dict[str, Any]:
    """Describe the machine and library versions for the report's ``machine`` entry."""
    import torch

    import lowrank

    device = jax.devices()[0]
    return {
        "name": name,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "torch": torch.__version__,
        "transformer_lens": _version("transformer-lens"),
        "transformer_lens_forward": reference_kind(),
        "lowrank": lowrank.__version__,
        "torch_device": torch_device,
        "torch_threads": torch.get_num_threads(),
        "torch_cuda_device": torch.cuda.get_device_name() if torch_device == "cuda" else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------------- runs
def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]


def _is_oom(err: BaseException) -> bool:
    import torch

    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(err, RuntimeError) and (
        "out of memory" in str(err).lower() or "can't allocate memory" in str(err).lower()
    )


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


class Runner:
    """Runs ops on one machine; holds the settings and the measured torch throughput."""

    def __init__(
        self, repeats: int, reference_timeout: float, torch_device: str, reference: bool = True
    ) -> None:
        self.repeats = repeats
        self.reference = reference
        self.reference_timeout = reference_timeout
        self.device = torch_device
        self.flops = measure.torch_matmul_flops(torch_device)
        self.bandwidth = measure.torch_fill_bandwidth(torch_device)

    def reference_skip(self, op: Op, config: Any, tokens_shape: tuple[int, int]) -> str | None:
        """Why TL should not be run for this op (size rule), or ``None``."""
        if not self.reference:
            return "not run (--no-reference)"
        nbytes, flops = op.cost(config, tokens_shape)
        free = measure.available_memory(self.device)
        if nbytes > MEMORY_FRACTION * free:
            return f"needs ~{_gib(nbytes)}, {_gib(free)} free on {self.device}"
        seconds = flops / self.flops + nbytes / self.bandwidth
        if seconds > self.reference_timeout:
            return (
                f"estimated ~{seconds:.0f} s per call > reference timeout "
                f"{self.reference_timeout:.0f} s"
            )
        return None

    def run_op(self, op: Op, shape: str, model: Any, tokens: Any, torch_side: TorchSide) -> dict:
        """Time ``op`` on both libraries and compare the results; errors become the record's."""
        record: dict[str, Any] = {"shape": shape, "op": op.name, "notes": []}
        ours = theirs = None
        try:
            timed = measure.time_jax(op.lowrank, (model, tokens), self.repeats)
            record["lowrank"], ours = timed["result"], timed["output"]
        except Exception as err:  # recorded, and the other ops still run
            record["lowrank"] = {"error": _error(err)}
        skip = self.reference_skip(op, model.config, tuple(tokens.shape))
        if skip:
            record["reference"] = {"skipped": skip}
        else:
            try:
                if op.setup is not None:
                    op.setup(torch_side)
                timed = measure.time_torch(
                    lambda: op.reference(torch_side), self.repeats, self.device,
                    self.reference_timeout,
                )  # fmt: skip
                record["reference"], theirs = timed["result"], timed["output"]
                if timed["note"]:
                    record["notes"].append(timed["note"])
            except Unmirrorable as err:  # an op TL cannot run for this model: say so
                record["reference"] = {"skipped": "TransformerLens cannot mirror the model"}
                record["notes"].append(str(err))
            except Exception as err:
                if _is_oom(err):
                    record["reference"] = {"skipped": f"out of memory ({_error(err)})"}
                else:
                    record["reference"] = {"error": _error(err)}
        if ours is not None and theirs is not None:
            record["speedup"] = record["reference"]["median_s"] / record["lowrank"]["median_s"]
            try:
                max_error = compare(op, ours, theirs)
                record["max_rel_error"] = max_error
                record["agree"] = bool(max_error <= TOLERANCE)
            except Exception as exc:
                record["notes"].append(f"comparison failed: {_error(exc)}")
        return record


def _tokens(config: Any, batch: int, seq: int, seed: int) -> np.ndarray:
    seq = min(seq, config.n_ctx)
    return np.random.default_rng(seed).integers(0, config.d_vocab, (batch, seq), dtype=np.int32)


def _shape_info(weights: Weights) -> dict[str, Any]:
    """The report's ``shapes`` entry of one set of weights."""
    c = weights.config
    return {
        "n_layers": c.n_layers,
        "n_heads": c.n_heads,
        "n_kv_heads": c.n_kv_heads,
        "d_model": c.d_model,
        "d_head": c.d_head,
        "d_mlp": c.d_mlp,
        "d_vocab": c.d_vocab,
        "n_ctx": c.n_ctx,
        "architecture": c.architecture,
        "weights": weights.source,
    }


def _sources(args: argparse.Namespace) -> list[tuple[str, Callable[[], Weights]]]:
    """``(label, build)`` of every shape and checkpoint to run, in order."""
    shapes = [(shape, functools.partial(build_weights, shape, args.seed)) for shape in args.shapes]
    paths = [(str(path), functools.partial(checkpoint_weights, path)) for path in args.checkpoint]
    return [*shapes, *paths]


def _report_header(args: argparse.Namespace, runner: Runner, name: str) -> dict[str, Any]:
    """The report without results: machine, settings."""
    return {
        "schema": SCHEMA,
        "machine": {
            **machine_info(name, runner.device),
            "torch_matmul_flops": runner.flops,
            "torch_fill_bytes_per_s": runner.bandwidth,
        },
        "settings": {
            "repeats": args.repeats,
            "reference_timeout_s": args.reference_timeout,
            "tolerance": TOLERANCE,
            "tokens": [args.batch, args.seq],
            "seed": args.seed,
        },
        "shapes": {},
        "results": [],
    }


def _run_weights(
    weights: Weights, ops: list[Op], runner: Runner, args: argparse.Namespace
) -> list[dict]:
    """Run ``ops`` on one set of weights; one record per op."""
    import torch

    model = weights.lowrank_model()
    tokens = _tokens(weights.config, args.batch, args.seq, args.seed)
    torch_side = TorchSide(weights, runner.device, torch.from_numpy(tokens).long())
    jax_tokens = jax.device_put(tokens)
    records = []
    for op in ops:
        start = time.perf_counter()
        record = runner.run_op(op, weights.name, model, jax_tokens, torch_side)
        records.append(record)
        elapsed = time.perf_counter() - start
        print(f"[{weights.name}] {summary_line(record)}  ({elapsed:.0f} s)")
    return records


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected ops on the selected shapes and checkpoints and return the report."""
    import torch

    torch.set_num_threads(args.torch_threads)
    torch_device = args.torch_device
    if torch_device == "auto":
        torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    name = args.machine or default_machine_name()
    runner = Runner(args.repeats, args.reference_timeout, torch_device, not args.no_reference)
    report = _report_header(args, runner, name)
    ops = [OPS_BY_NAME[o] for o in args.ops]
    for label, build in _sources(args):
        try:
            weights = build()
        except Unavailable as err:
            print(f"[{label}] unavailable: {err}", file=sys.stderr)
            report["shapes"][label] = {"unavailable": str(err)}
            continue
        report["shapes"][weights.name] = _shape_info(weights)
        report["results"] += _run_weights(weights, ops, runner, args)
        del weights
    return report


# ----------------------------------------------------------------------------- markdown
def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    ms = seconds * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def _ratio(r: float | None) -> str:
    if r is None:
        return "–"
    return f"{r:,.0f}x" if r >= 100 else f"{r:.3g}x"


def _agreement(record: dict) -> str:
    err = record.get("max_rel_error")
    if err is None:
        return "–"
    return f"ok ({err:.1e})" if record.get("agree") else f"**MISMATCH ({err:.1e})**"


def _side_notes(record: dict) -> list[str]:
    notes = list(record.get("notes", []))
    for side, label in (("lowrank", "lowrank"), ("reference", "TL")):
        entry = record.get(side) or {}
        notes += [f"{label} {key}: {entry[key]}" for key in ("skipped", "error") if key in entry]
    return notes


def summary_line(record: dict) -> str:
    """One progress line for a result record: timings, speed-up and agreement."""
    lr, tl = record.get("lowrank") or {}, record.get("reference") or {}
    text = (
        f"{record['op']}: lowrank {_ms(lr.get('median_s'))} ms, TL {_ms(tl.get('median_s'))} ms, "
        f"speed-up {_ratio(record.get('speedup'))}, agreement {_agreement(record)}"
    )
    notes = _side_notes(record)
    return text + (f" [{'; '.join(notes)}]" if notes else "")


def _forward_line(machine: dict) -> list[str]:
    """The header's sentence on TL's forward model (absent from older results files)."""
    kind = machine.get("transformer_lens_forward")
    return ["", f"TL's `forward` runs a {kind}."] if kind else []


def markdown(report: dict) -> str:
    """Render the report as a Markdown page."""
    m, s = report["machine"], report["settings"]
    lines = [
        f"# lowrank vs TransformerLens on `{m['name']}`",
        "",
        f"{m['platform']} ({m['device_kind']}), {m['cpu_count']} CPU cores ({m['cpu_model']}); "
        f"torch on {m['torch_device']} with {m['torch_threads']} threads; jax {m['jax']}, "
        f"jaxlib {m['jaxlib']}, torch {m['torch']}, transformer-lens {m['transformer_lens']}, "
        f"lowrank {m['lowrank']}; {m['date']}.",
        *_forward_line(m),
        "",
        f"Median of {s['repeats']} calls after a warm-up call, the same random weights for both "
        f"libraries; forward pass on tokens {s['tokens'][0]} x {s['tokens'][1]}. Memory is the "
        "extra memory of one call: lowrank from XLA's memory analysis (temp + output), TL from "
        "the peak resident-set growth (CPU) or `max_memory_allocated` (CUDA). Agreement is the "
        f"max relative error between the two results (tolerance {s['tolerance']:g}).",
        "",
        "| shape | op | lowrank ms | TL ms | speed-up | compile s | memory lowrank / TL "
        "| agreement | notes |",
        "|---|---|---:|---:|---:|---:|---|---|---|",
    ]
    for r in report["results"]:
        lr, tl = r.get("lowrank") or {}, r.get("reference") or {}
        compile_s = lr.get("compile_s")
        lines.append(
            f"| {r['shape']} | {r['op']} | {_ms(lr.get('median_s'))} | {_ms(tl.get('median_s'))} "
            f"| {_ratio(r.get('speedup'))} | {'–' if compile_s is None else f'{compile_s:.2f}'} "
            f"| {_bytes(lr.get('peak_bytes'))} / {_bytes(tl.get('peak_bytes'))} "
            f"| {_agreement(r)} | {'; '.join(_side_notes(r))} |"
        )
    for shape, info in report.get("shapes", {}).items():
        if "unavailable" in info:
            lines += ["", f"`{shape}` was not run: {info['unavailable']}"]
    return "\n".join(lines) + "\n"


def write(report: dict, out_dir: Path, merge: bool) -> tuple[Path, Path]:
    """Write the report's JSON and Markdown files and return their paths.

    With ``merge``, results already in the JSON file are kept unless this report has newer
    ones for the same shape and op.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{report['machine']['name']}.json"
    if merge and json_path.exists():
        old = json.loads(json_path.read_text())
        new_keys = {(r["shape"], r["op"]) for r in report["results"]}
        kept = [r for r in old.get("results", []) if (r["shape"], r["op"]) not in new_keys]
        report["results"] = kept + report["results"]
        report["shapes"] = {**old.get("shapes", {}), **report["shapes"]}
    order = {name: i for i, name in enumerate([*SHAPE_NAMES, *OPS_BY_NAME])}
    report["results"].sort(key=lambda r: (order.get(r["shape"], 99), order.get(r["op"], 99)))
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown(report))
    return json_path, md_path


# ---------------------------------------------------------------------------------- CLI
def _list(choices: Sequence[str]) -> Any:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if items == ["all"]:
            return list(choices)
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{bad or text!r}: choose from {', '.join(choices)}")
        return items

    return parse


def parser() -> argparse.ArgumentParser:
    """Build the command-line parser."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument(
        "--shapes",
        type=_list(SHAPE_NAMES),
        help="comma-separated, or 'all' (default gpt2-small, none with --checkpoint): "
        f"{', '.join(SHAPE_NAMES)}",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="a local HF checkpoint directory, loaded and processed as TL's from_pretrained "
        "(repeatable)",
    )
    p.add_argument(
        "--ops",
        type=_list(list(OPS_BY_NAME)),
        default=list(OPS_BY_NAME),
        help=f"comma-separated (default all): {', '.join(o.name for o in OPS)}",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed calls after the warm-up (5)")
    p.add_argument(
        "--reference-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="skip TL where one call is estimated to take longer, and time it only "
        "once when its warm-up call took longer (default 120)",
    )
    p.add_argument("--no-reference", action="store_true", help="time lowrank only (no TL)")
    p.add_argument("--machine", help="results file name (default: platform + device kind)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="default benchmarks/results")
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the other (shape, op) records of an existing results file",
    )
    p.add_argument("--torch-device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--torch-threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch.set_num_threads (default os.cpu_count(), as JAX's CPU threads)",
    )
    p.add_argument("--batch", type=int, default=4, help="forward batch size (4)")
    p.add_argument("--seq", type=int, default=128, help="forward sequence length (128, <= n_ctx)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--markdown-only",
        type=Path,
        metavar="JSON",
        help="only regenerate the markdown table next to this results JSON",
    )
    return p  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks from the command line ``argv`` and return the exit status."""
    args = parser().parse_args(argv)
    if args.markdown_only:
        report = json.loads(args.markdown_only.read_text())
        md_path = args.markdown_only.with_suffix(".md")
        md_path.write_text(markdown(report))
        print(f"wrote {md_path}")
        return 0
    if args.repeats < 1:
        parser().error("--repeats must be at least 1")
    if args.shapes is None:
        args.shapes = [] if args.checkpoint else ["gpt2-small"]
    for path in args.checkpoint:
        try:
            check_checkpoint(path)
        except (OSError, CheckpointError) as err:
            parser().error(f"--checkpoint: {err}")
    report = run(args)
    json_path, md_path = write(report, args.out_dir, args.merge)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
