"""megamu's user errors: one small hierarchy, so every tool maps them to one `error:` line and exit 2.

A `MegamuError` is something the user can fix (a bad key, a missing file, a corrupt checkpoint, data
that cannot be fitted); its message names the key or file and says how. Anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

EXIT_USER_ERROR = 2


class MegamuError(Exception):
    """A problem the user can fix; the message names the key, file or line and the fix."""


class ConfigError(MegamuError, ValueError):
    """A bad config key, value or combination (raised before anything is allocated)."""


class DataError(MegamuError, ValueError):
    """A missing, truncated or mismatched data file (.bin/.idx, tokenizer, input corpus)."""


class CheckpointError(MegamuError, RuntimeError):
    """A checkpoint that is missing, incomplete, or saved with another layout."""


class FitError(MegamuError, ValueError):
    """Loss points that cannot be read or fitted (too few, non-finite, malformed)."""
