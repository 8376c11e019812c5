"""`megamu-export-hf` from a checkout: `python tools/export_hf.py --help` (megamu installed in the environment)."""
from megamu.cli.export_hf import main

raise SystemExit(main())
