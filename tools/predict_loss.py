"""`megamu-predict` from a checkout: `python tools/predict_loss.py --help` (megamu installed in the environment)."""
from megamu.cli.predict import main

raise SystemExit(main())
