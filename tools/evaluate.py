"""`megamu-eval` from a checkout: `python tools/evaluate.py --help` (megamu installed in the environment)."""
from megamu.cli.evaluate import main

raise SystemExit(main())
