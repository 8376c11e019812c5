"""megamu's user errors: one small hierarchy, so every tool maps them to one `error:` line and exit 2.

A `MegamuError` is something the user can fix (a bad key, a missing file, a corrupt checkpoint, data
that cannot be fitted); its message names the key or file and says how. Anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

EXIT_USER_ERROR = 2


class MegamuError(Exception):
    """A problem the user can fix; the message names the key, file or line and the fix."""

    # Whether every rank of a node meets it alike (the same config and files), so that one rank per node
    # says it; False for a problem with one rank's own files, which that rank must say.
    every_rank = True


class ConfigError(MegamuError, ValueError):
    """A bad config key, value or combination (raised before anything is allocated)."""


class DataError(MegamuError, ValueError):
    """A missing, truncated or mismatched data file (.bin/.idx, tokenizer, input corpus)."""


class CheckpointError(MegamuError, RuntimeError):
    """A checkpoint that is missing, incomplete, or saved with another layout."""


class RankCheckpointError(CheckpointError):
    """A checkpoint file only this rank reads is missing or unreadable: this rank says so."""

    every_rank = False


class FitError(MegamuError, ValueError):
    """Loss points that cannot be read or fitted (too few, non-finite, malformed)."""


class MegamuWarning(UserWarning):
    """Something the user should know that does not stop the tool (a record skipped, a fallback taken);
    console scripts print it as one `warning:` line."""
