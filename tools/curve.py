"""`megamu-curve` from a checkout: `python tools/curve.py --help` (megamu installed in the environment)."""
from megamu.cli.curve import main

raise SystemExit(main())
