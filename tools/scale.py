"""`megamu-scale` from a checkout: `python tools/scale.py --help` (megamu installed in the environment)."""
from megamu.cli.scale import main

raise SystemExit(main())
