"""Errors a user can fix. The CLI prints them as one clear message, without a stack trace."""


class UserError(Exception):
    """A bad input: a missing file, a wrong option, a mistyped config key, a model that does not fit."""


class ConfigError(UserError):
    """A configuration file or `key=value` override that does not validate."""


class ModelLoadError(UserError):
    """A checkpoint that cannot be found, or is not an ACE-Step checkpoint of a known layout."""
