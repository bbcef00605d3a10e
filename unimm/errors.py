"""Errors a person can fix from the command line: they print as one line, no stack trace."""


class ConfigError(ValueError):
    """A setting, file or value that does not fit; the message names it and what was expected."""


class DataError(RuntimeError):
    """Training data that cannot be used (e.g. a flood of bad samples); names the source."""
