"""Errors a person can fix from the command line: they print as one line, no stack trace."""


class ConfigError(ValueError):
    """A setting, file or value that does not fit; the message names it and what was expected."""


class RunStopped(RuntimeError):
    """A run stopped on purpose to protect its results (diverged, damaged checkpoints, bad data);
    the message says why and what to do. Ranks print it as one line and exit 3."""


class DataError(RunStopped):
    """Training data that cannot be used (e.g. a flood of bad samples); names the source."""
