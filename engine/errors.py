"""Errors a user can fix. The `herd` command prints them as one line, never as a traceback."""


class HerdError(Exception):
    """Base class: the message names the key, file or line at fault."""


class ConfigError(HerdError):
    """A configuration value is unknown, of the wrong type or impossible."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class DataError(HerdError):
    """A data file is missing, malformed or holds values the model cannot take."""
