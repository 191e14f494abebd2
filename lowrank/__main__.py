"""Run the command-line interface: ``python -m lowrank``."""

import sys
from pathlib import Path

import lowrank

if getattr(lowrank, "__file__", None) is None:
    # python -m puts the working directory first on sys.path, so a folder named lowrank/ there
    # (a clone, run from its parent) was imported as a namespace package instead of this one:
    # drop the working directory and import the package this file belongs to.
    del sys.modules["lowrank"]
    here = Path.cwd().resolve()
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    import lowrank  # noqa: F401

from lowrank.cli import main  # noqa: E402

raise SystemExit(main())
