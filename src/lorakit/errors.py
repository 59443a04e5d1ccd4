"""Exceptions raised by lorakit.

Every error carries a one-line message that names the culprit (module, file, key) so a user can act on it.
"""

from __future__ import annotations


class LorakitError(Exception):
    """Base class for all lorakit errors."""


class ConfigError(LorakitError, ValueError):
    """A configuration value or key is invalid. `key`: the field at fault, when one is (for file-level messages)."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class TargetError(LorakitError, ValueError):
    """Target selection matched nothing or matched an unsupported module."""


class AdapterError(LorakitError, ValueError):
    """An adapter is unknown, duplicated, or does not fit the model."""


class AdapterFileError(LorakitError, OSError):
    """An adapter file is missing, corrupt, truncated, or in a refused format."""


class ModelLoadError(LorakitError, OSError):
    """A base model could not be located or loaded."""


class QuantizationError(LorakitError, ValueError):
    """A model cannot be quantized as asked, or an operation needs full-precision weights (merge into 4 bits)."""


class OutputError(LorakitError, FileExistsError):
    """A destination cannot be written as asked (e.g. a file stands where an output folder goes)."""


class DiskFullError(LorakitError, OSError):
    """A write ran out of disk space (or quota); the destination was left as it was."""

    def __str__(self) -> str:
        return str(self.strerror)


class TrainingError(LorakitError, RuntimeError):
    """Training cannot go on (non-finite loss, bad resume)."""
