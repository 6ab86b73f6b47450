"""Errors a user can fix. The CLI prints them as one clear message, without a stack trace."""

from __future__ import annotations

import difflib
from typing import Sequence


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


def suggest(key: str, known: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known key, or nothing."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def explain_validation(error, known: Sequence[str], source: str) -> ConfigError:
    """A pydantic ``ValidationError`` as one line naming each bad key (and the closest known one)."""
    lines = []
    for problem in error.errors():
        location = ".".join(str(part) for part in problem["loc"])
        if problem["type"] == "extra_forbidden":
            lines.append(f"unknown key {location!r}{suggest(location, known)}")
        elif location:
            lines.append(f"{location}: {problem['msg']} (got {problem.get('input')!r})")
        else:
            lines.append(problem["msg"].removeprefix("Value error, "))
    return ConfigError(f"{source}: " + "; ".join(lines))
