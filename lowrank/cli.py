"""Command line: ``python -m lowrank report [MODEL] [--out DIR]``."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shlex
import sys
from pathlib import Path
from typing import Any

# lowrank.models.EMBEDDED_MODEL(S), written out so that --help does not import jax (tested).
EMBEDDED_MODEL = "induction-2l"
EMBEDDED_MODELS = (EMBEDDED_MODEL, "induction-2l-rope")

#: Seconds ``--distributed`` processes wait to join, for heartbeats and to shut down
#: (jax.distributed's own defaults are 300, 100 and 300).
DISTRIBUTED_TIMEOUT = 300

DESCRIPTION = """\
Analyse the weights of a GPT-2 or GPT-Neo model head by head: copying scores of the OV and
full OV circuits, Q/K/V-composition scores of all head pairs (with the 1/sqrt(d_model)
random baseline), singular values of the embeddings and the effective rank of W_pos, the SVD
interpreter's top tokens for the most-copying heads, and positional QK patterns."""

REPORT_HELP = """\
Prints the tables and writes, into --out: one PNG per figure, report.json (every number)
and index.html (tables and figures on one page). The report is written into a fresh folder
beside --out that replaces it only when complete: a failed or interrupted run leaves the previous
report as it was. An existing --out must be empty or an earlier report.
MODEL is a local checkpoint directory (config.json + model.safetensors) or a Hugging Face hub id
(needs the hub cache or network); by default the small model embedded in the package. Weights
are processed as in TransformerLens (fold LayerNorm, centre writing weights and unembedding,
fold value biases).
With --distributed, every process of a multi-host job (a TPU pod slice, several GPU hosts, or
processes on one machine) runs this same command: jax.distributed.initialize() joins them, each
process reads the checkpoint memory-mapped and places only the slices its own devices hold on
a (layers, heads) mesh over all devices, the per-head analyses run sharded, and process 0
prints and writes the report. On TPU pods and SLURM the coordinator, process count and id are
detected; elsewhere pass them.
Exit status: 0 on success; 2 when the arguments are wrong, --out cannot be written, or the model
cannot be loaded or holds NaN/Inf weights (checked before any analysis); 1 when writing the
report failed (the previous report is left unchanged)."""


def build_parser() -> argparse.ArgumentParser:
    """Build the ``python -m lowrank`` argument parser with its subcommands."""
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
        help="checkpoint directory, hub id or the name of an embedded model ("
        + ", ".join(EMBEDDED_MODELS)
        + f"; default: {EMBEDDED_MODEL!r})",
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
    report.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pytorch_model.bin (pickle, via torch.load(weights_only=True)) when a "
        "checkpoint has no safetensors",
    )
    report.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="report a model whose weights hold NaN or Inf (a warning instead of an error)",
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
    pod.add_argument(
        "--distributed-timeout",
        type=int,
        metavar="SECONDS",
        help="how long processes wait for each other to join, to answer heartbeats and to shut "
        f"down (default: {DISTRIBUTED_TIMEOUT}; raise it on loaded machines)",
    )
    return parser


class _Exit(Exception):
    """Stop the command: print ``message`` as one line on stderr, exit with ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    known = ("CheckpointError", "OutputDirError", "ValueError", "TypeError", "OSError")
    return text if type(err).__name__ in known else f"{type(err).__name__}: {text}"


def _check_pod_options(args: argparse.Namespace) -> None:
    """The multi-process options, checked before anything is joined or loaded."""
    given = [
        option
        for option, value in (
            ("--coordinator", args.coordinator),
            ("--num-processes", args.num_processes),
            ("--process-id", args.process_id),
            ("--distributed-timeout", args.distributed_timeout),
        )
        if value is not None
    ]
    if given and not args.distributed:
        raise _Exit(2, f"error: {', '.join(given)} need --distributed")
    if args.num_processes is not None and args.num_processes < 1:
        raise _Exit(2, f"error: --num-processes must be at least 1, got {args.num_processes}")
    if args.process_id is not None and not (
        0 <= args.process_id < (args.num_processes or args.process_id + 1)
    ):
        raise _Exit(
            2,
            f"error: --process-id must be in [0, --num-processes), got {args.process_id} "
            f"of {args.num_processes}",
        )
    if args.distributed_timeout is not None and args.distributed_timeout < 1:
        raise _Exit(
            2, f"error: --distributed-timeout must be at least 1, got {args.distributed_timeout}"
        )
    if args.coordinator is not None:
        host, _, port = args.coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise _Exit(2, f"error: --coordinator must be HOST:PORT, got {args.coordinator!r}")


def _join_distributed(args: argparse.Namespace) -> None:
    import jax

    # CPU processes exchange data through gloo; accelerators use their own interconnect.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = args.distributed_timeout or DISTRIBUTED_TIMEOUT
    try:
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=timeout,
            heartbeat_timeout_seconds=timeout,
            shutdown_timeout_seconds=timeout,
        )
    except Exception as err:
        raise _Exit(2, f"error: cannot join the distributed job: {_one_line(err)}") from err


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model (placed over a mesh when distributed) and the mesh (or ``None``)."""
    from lowrank.models import load_pretrained, read_config, resolve_checkpoint

    try:
        directory = resolve_checkpoint(args.model, allow_pickle=args.allow_pickle)
        if Path(directory).resolve() == Path(args.out).resolve():
            raise ValueError(f"MODEL and --out are the same folder {args.out!r}")
        config = read_config(directory)
        n_heads = config.n_layers * config.n_heads
        if args.top_heads > n_heads:
            raise _Exit(
                2, f"error: --top-heads {args.top_heads} is more than the model's {n_heads} heads"
            )
        load = functools.partial(
            load_pretrained, directory, allow_pickle=args.allow_pickle, config=config
        )
        if not args.distributed:
            return load(), None
        from lowrank import sharding

        mesh = sharding.make_mesh(config.n_layers, config.n_heads)
        return load(place=sharding.sharded_place(mesh)), mesh
    except _Exit:
        raise
    except Exception as err:  # a bad checkpoint can raise anything: report it, never a traceback
        raise _Exit(2, f"error: cannot load model {args.model!r}: {_one_line(err)}") from err


def _check_finite(model: Any, allow: bool) -> None:
    from lowrank.report import nonfinite_parameters

    bad = nonfinite_parameters(model)
    if not bad:
        return
    names = ", ".join(bad)
    if not allow:
        raise _Exit(
            2,
            f"error: the model's weights hold NaN or Inf in {names} "
            "(pass --allow-nonfinite to report it anyway)",
        )
    print(f"warning: the model's weights hold NaN or Inf in {names}", file=sys.stderr)


def _report(args: argparse.Namespace) -> int:
    import jax

    from lowrank import atomic_dir
    from lowrank.report import (
        REPORT_FILE_NAMES,
        REPORT_FILE_SUFFIXES,
        analyse,
        format_tables,
        progress_bar,
        provenance,
        write_files,
    )

    if args.top_heads < 1:
        raise _Exit(2, "error: --top-heads must be at least 1")
    _check_pod_options(args)
    kinds = {"names": REPORT_FILE_NAMES, "suffixes": REPORT_FILE_SUFFIXES}
    try:  # before anything is computed or loaded (on process 0 again, once it is known)
        atomic_dir.check_target(args.out, **kinds)
    except atomic_dir.OutputDirError as err:
        raise _Exit(2, f"error: --out: {err}") from err
    if args.distributed:
        _join_distributed(args)
    writer = jax.process_index() == 0
    with contextlib.ExitStack() as stack:
        folder = None
        if writer:
            try:  # creating the staging folder is the real test that --out can be written
                folder = stack.enter_context(atomic_dir.staged(args.out, **kinds))
            except (atomic_dir.OutputDirError, OSError) as err:
                raise _Exit(2, f"error: --out: {_one_line(err)}") from err
        progress = progress_bar(8, enabled=writer and not args.quiet)
        stack.callback(progress.close)  # before publishing (callbacks run last-in first-out)
        model, mesh = _load(args)
        progress.set_description_str("load model")
        progress.update()
        _check_finite(model, args.allow_nonfinite)
        results = analyse(
            model, name=args.model, top_heads=args.top_heads, mesh=mesh, progress=progress
        )
        if folder is None:
            return 0
        try:
            meta = provenance("python -m lowrank " + shlex.join(args.argv))
            report = write_files(results, folder, meta=meta, progress=progress)
            stack.close()  # publish: the new report replaces the old one in one step
        except OSError as err:
            raise _Exit(
                1,
                f"error: could not write the report into {args.out!r} ({_one_line(err)}); "
                "the previous contents of that folder are unchanged",
            ) from err
    print(format_tables(report))
    print(f"\nWrote {len(report['figures'])} figures, report.json and index.html to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    # transformers advises at import that torch is missing, which the analyses never need.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        if args.command == "report":
            return _report(args)
    except _Exit as stop:
        print(str(stop), file=sys.stderr)
        return stop.code
    return 2  # unreachable: argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
