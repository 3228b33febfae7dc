"""Errors a user can act on. The CLI prints them as one line; anything else is a bug and keeps its traceback."""


class SoraError(Exception):
    """Base class for errors caused by input or configuration, not by Sora itself."""


class DataError(SoraError):
    """Unreadable, missing or malformed data. The message names the file (and line where known)."""


class ConfigError(SoraError):
    """An invalid recipe, flag or override."""


class CheckpointError(SoraError):
    """A checkpoint directory that is missing, incomplete or incompatible."""


class SoraWarning(UserWarning):
    """Input Sora can use but probably should not as it is (the CLI prints it as one yellow line)."""
