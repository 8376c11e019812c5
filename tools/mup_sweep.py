"""`megamu-sweep` from a checkout: `python tools/mup_sweep.py --help` (megamu installed in the environment)."""
from megamu.cli.sweep import main

raise SystemExit(main())
