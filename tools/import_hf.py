"""`megamu-import-hf` from a checkout: `python tools/import_hf.py --help` (megamu installed in the environment)."""
from megamu.cli.import_hf import main

raise SystemExit(main())
