"""Command line: ``python -m lowrank report [MODEL] [--out DIR]``."""

from __future__ import annotations

import argparse
import sys

from lowrank.models import EMBEDDED_MODEL

DESCRIPTION = """\
Analyse the weights of a GPT-2 or GPT-Neo model head by head: copying scores of the OV and
full OV circuits, Q/K/V-composition scores of all head pairs (with the 1/sqrt(d_model)
random baseline), singular values of the embeddings and the effective rank of W_pos, the SVD
interpreter's top tokens for the most-copying heads, and positional QK patterns."""

REPORT_HELP = """\
Prints the tables and writes, into --out: one PNG per figure, report.json (every number)
and index.html (tables and figures on one page). MODEL is a local checkpoint directory
(config.json + model.safetensors) or a Hugging Face hub id (needs the hub cache or network);
by default the small model embedded in the package. Weights are processed as in
TransformerLens (fold LayerNorm, centre writing weights and unembedding, fold value biases).
With --distributed, every process of a multi-host job (a TPU pod slice, several GPU hosts, or
processes on one machine) runs this same command: jax.distributed.initialize() joins them, each
process reads the checkpoint memory-mapped and places only the slices its own devices hold on
a (layers, heads) mesh over all devices, the per-head analyses run sharded, and process 0
prints and writes the report. On TPU pods and SLURM the coordinator, process count and id are
detected; elsewhere pass them.
Exit status: 0 on success, 2 when the model cannot be loaded or the arguments are wrong."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lowrank", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    report = sub.add_parser(
        "report",
        help="analyse a model's heads; print tables, write figures, JSON and HTML",
        description=REPORT_HELP,
    )
    report.add_argument(
        "model",
        nargs="?",
        default=EMBEDDED_MODEL,
        metavar="MODEL",
        help=f"checkpoint directory or hub id (default: the embedded {EMBEDDED_MODEL!r})",
    )
    report.add_argument(
        "--out", default="report", metavar="DIR", help="output directory (default: ./report)"
    )
    report.add_argument(
        "--top-heads",
        type=int,
        default=3,
        metavar="N",
        help="heads (by full OV copying score) to interpret and plot (default: 3)",
    )
    report.add_argument(
        "--quiet", action="store_true", help="no progress bar (tables are still printed)"
    )
    pod = report.add_argument_group("multi-process (pod) runs")
    pod.add_argument(
        "--distributed",
        action="store_true",
        help="join a jax.distributed job and shard the analyses over all of its devices",
    )
    pod.add_argument(
        "--coordinator", metavar="HOST:PORT", help="address of process 0 (default: detected)"
    )
    pod.add_argument("--num-processes", type=int, metavar="N", help="(default: detected)")
    pod.add_argument("--process-id", type=int, metavar="I", help="(default: detected)")
    return parser


def _join_distributed(args: argparse.Namespace) -> None:
    import jax

    # CPU processes exchange data through gloo; accelerators use their own interconnect.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )


def _report(args: argparse.Namespace) -> int:
    import jax

    from lowrank.models import CheckpointError, load_pretrained
    from lowrank.report import Progress, build_report, format_tables, write_html

    if args.top_heads < 1:
        print("error: --top-heads must be at least 1", file=sys.stderr)
        return 2
    mesh = None
    if args.distributed:
        _join_distributed(args)
    writer = jax.process_index() == 0
    progress = None if args.quiet or not writer else Progress(total=8)
    try:
        if args.distributed:
            from lowrank import sharding
            from lowrank.models import read_config, resolve_checkpoint

            directory = resolve_checkpoint(args.model)
            config = read_config(directory)
            mesh = sharding.make_mesh(config.n_layers, config.n_heads)
            model = load_pretrained(directory, place=sharding.sharded_place(mesh))
        else:
            model = load_pretrained(args.model)
    except (CheckpointError, OSError, ValueError) as err:
        message = " ".join(str(err).split())
        print(f"error: cannot load model {args.model!r}: {message}", file=sys.stderr)
        return 2
    if progress:
        progress.step("load model")
    report = build_report(
        model, args.out, name=args.model, top_heads=args.top_heads, progress=progress, mesh=mesh
    )
    if not writer:
        return 0
    page = write_html(report, args.out)
    if progress:
        progress.step("report.json + index.html")
    print(format_tables(report))
    print(f"\nWrote {len(report['figures'])} figures, report.json and {page}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "report":
        return _report(args)
    return 2  # unreachable: argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
