"""One error root, so the CLI and the apps can tell user mistakes from bugs.

Every message names the file:line, key or value at fault and, where there is one, the fix.
"""


class FedRagAppError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(FedRagAppError, ValueError):
    """A run-config / CLI key is unknown, ill-typed or out of range."""


class DataError(FedRagAppError, ValueError):
    """A data file is missing, malformed, or lacks a field."""


class StoreError(FedRagAppError, RuntimeError):
    """A knowledge-store shard cannot be opened, is locked, or was built with another retriever."""


class CheckpointError(FedRagAppError, RuntimeError):
    """A checkpoint is missing, incomplete or does not match the configured models."""


class WeightsError(FedRagAppError, ValueError):
    """Weights have missing/unexpected keys, wrong shapes, or non-finite values."""
