"""`megamu-plan` from a checkout: `python tools/plan.py --help` (megamu installed in the environment)."""
from megamu.cli.plan import main

raise SystemExit(main())
