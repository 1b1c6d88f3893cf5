"""User-facing error types of seerjax.

Every error a user can cause is a ``ValueError`` subclass whose message names the argument, file or
tensor, the bad value and what was expected (DESIGN.md, Contracts). A file that does not exist raises
:class:`MissingFileError`, which is both a ``FileNotFoundError`` and a ``ValueError``, so callers may
catch either.
"""

from __future__ import annotations


class SeerjaxError(ValueError):
    """Base class of seerjax's user-facing errors."""


class ConfigError(SeerjaxError):
    """A model configuration holds a field or value seerjax does not support."""


class CheckpointError(SeerjaxError):
    """A checkpoint directory, file or tensor does not match what the model expects."""


class MissingFileError(CheckpointError, FileNotFoundError):
    """A path, config.json or weights file does not exist."""
