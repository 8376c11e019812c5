"""`megamu-train-tokenizer` from a checkout: `python tools/train_tokenizer.py --help` (megamu installed in the environment)."""
from megamu.cli.train_tokenizer import main

raise SystemExit(main())
