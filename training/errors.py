"""`ConfigError`: a run refused by one of quietdepth's own checks, before it trains."""

from __future__ import annotations


class ConfigError(ValueError):
    """A check of ours refuses the run's settings, or a file or checkpoint they name. The `quietdepth` command
    shows it as `error: <message>` with exit status 2, as it does a malformed command line; any other exception
    keeps its traceback. A ValueError, so code that catches one catches this too."""


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """A file the settings name does not exist (also a FileNotFoundError)."""
