"""`megamu-generate` from a checkout: `python tools/generate.py --help` (megamu installed in the environment)."""
from megamu.cli.generate import main

raise SystemExit(main())
