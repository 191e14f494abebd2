from lowrank.cli import main

raise SystemExit(main())
