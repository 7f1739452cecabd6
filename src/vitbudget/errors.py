"""Errors a user can act on. The CLI prints their message on one line and exits non-zero."""


class VitbudgetError(Exception):
    """Base class: a problem with the user's input, not a bug in vitbudget."""


class CheckpointError(VitbudgetError):
    """A checkpoint is missing, corrupt, or does not match the architecture."""


class DataError(VitbudgetError):
    """A dataset or image cannot be found or read."""


class InputError(VitbudgetError):
    """A tensor fed to a model has the wrong shape, channels or non-finite values."""


class ConfigError(VitbudgetError):
    """An unknown method, option or out-of-range setting."""


class OutputError(VitbudgetError):
    """An output path cannot be written."""
