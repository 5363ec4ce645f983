"""Exception types shared by every stage; each message names what is wrong."""


class V4CError(Exception):
    """Base class of every error v4c raises on purpose."""


class ConfigError(V4CError, ValueError):
    """An inconsistent or unknown model configuration; the message names the field."""


class CheckpointError(V4CError):
    """A checkpoint file that is missing, truncated, corrupt or of the wrong kind."""


class WeightMismatchError(CheckpointError):
    """Checkpoint tensors that do not match the graph (missing, unexpected, mis-shaped, wrong dtype)."""

    def __init__(self, message, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


class GraphError(V4CError):
    """An IR graph that fails verification, or IR text that does not parse."""


class ArtifactError(V4CError):
    """An artifact that is missing, tampered with, or built for another toolchain."""
