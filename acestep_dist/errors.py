"""Errors a user can fix. The CLI prints them as one clear message, without a stack trace."""


class UserError(Exception):
    """A bad input: a missing file, a wrong option, a mistyped config key, a model that does not fit."""


class ConfigError(UserError):
    """A configuration file or `key=value` override that does not validate."""


class ModelLoadError(UserError):
    """A checkpoint that cannot be found, or is not an ACE-Step checkpoint of a known layout."""


# Exit statuses of the commands that process many inputs (prep, convert) and of inspect.
EXIT_OK = 0
EXIT_FATAL = 1  # nothing usable was written (or a UserError)
EXIT_CORRUPT = 2  # inspect found damaged shards
EXIT_PARTIAL = 3  # some inputs were rejected (listed), the rest written
