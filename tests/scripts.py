"""The console scripts (setup.py's entry points) of the environment running the tests."""
from __future__ import annotations

import os
import sys

BIN = os.path.dirname(sys.executable)


def script(name: str) -> str:
    """The path of console script `name` beside this interpreter (`pip install -e .` puts it there)."""
    return os.path.join(BIN, name)
