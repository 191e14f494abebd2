"""Run the command-line interface: ``python -m lowrank``."""

from lowrank.cli import main

raise SystemExit(main())
