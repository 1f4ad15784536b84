"""Typed errors raised by the model layer. No framework imports: the service maps them to HTTP."""


class ModelError(Exception):
    """Base class of every error the model layer raises on purpose."""


class ConfigError(ModelError):
    """A model config is invalid; the message names the key path, the value and the range."""


class CheckpointError(ModelError):
    """A checkpoint directory is missing, unreadable or does not match its config."""


class ArchitectureError(ModelError):
    """An architecture name or import path cannot be resolved into a gated network."""


class InvalidInputError(ModelError):
    """Model inputs have the wrong shape, length or values (the service answers 400)."""


class DeviceError(ModelError):
    """The requested device does not exist on this machine."""
