"""
The errors main.py reports as a usage mistake (exit code 2, the message, no traceback). A module of its own, free of
torch, so that torch-free stages (the tokenizer) can raise them; trainer/config.py re-exports both.
"""


class ConfigError(ValueError):
    """A bad config key or value; main.py prints it without a traceback."""


class MissingPathError(ConfigError, FileNotFoundError):
    """A config path that must exist and does not (still a FileNotFoundError for code that catches that)."""
