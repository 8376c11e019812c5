"""`megamu-coord-check` from a checkout: `python tools/coord_check.py --help` (megamu installed in the environment)."""
from megamu.cli.coord_check import main

raise SystemExit(main())
