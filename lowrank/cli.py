"""Command line: ``python -m lowrank report``."""

from __future__ import annotations

import argparse
import sys


def _demo() -> None:
    import jax.numpy as jnp
    import numpy as np

    import lowrank

    rng = np.random.default_rng(0)
    A = jnp.asarray(rng.standard_normal((3, 4, 64, 8)), dtype=jnp.float32)
    B = jnp.asarray(rng.standard_normal((3, 4, 8, 64)), dtype=jnp.float32)
    M = lowrank.FactoredMatrix(A, B)
    print(M)
    print("norm[0, 0]        ", float(lowrank.norm(M)[0, 0]))
    print("svdvals[0, 0, :4] ", np.asarray(lowrank.svdvals(M)[0, 0, :4]).round(3))
    ev = lowrank.eigvals(M)
    print("eigvals shape     ", ev.shape, ev.dtype)
    print("copying score[0]  ", np.asarray(ev.sum(-1).real / jnp.abs(ev).sum(-1))[0].round(3))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lowrank",
        description="Linear algebra of transformer weights: factored matrices and circuits.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("report", help="run the analyses and print a report")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "report":
        _demo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
