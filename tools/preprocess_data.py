"""`megamu-preprocess` from a checkout: `python tools/preprocess_data.py --help` (megamu installed in the environment)."""
from megamu.cli.preprocess import main

raise SystemExit(main())
