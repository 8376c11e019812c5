"""`megamu-merge` from a checkout: `python tools/merge_tp_checkpoint.py --help` (megamu installed in the environment)."""
from megamu.cli.merge import main

raise SystemExit(main())
