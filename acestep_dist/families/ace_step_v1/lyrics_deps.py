"""Lazy imports of the language packages behind ACE-Step v1's lyric tokeniser (the ``v1`` extra).

They load on first use, so importing the family stays cheap and a missing package fails with one
message naming the extra instead of an ImportError deep in a Ray actor."""

from __future__ import annotations

import functools
from importlib import import_module
from types import ModuleType

from ...errors import UserError

# import name -> distribution name on PyPI
_DISTRIBUTIONS = {
    "pypinyin": "pypinyin",
    "hangul_romanize": "hangul-romanize",
    "num2words": "num2words",
    "py3langid": "py3langid",
    "cutlet": "cutlet",
}


class LyricsDependencyError(UserError):
    """A package the v1 lyric tokeniser needs is not installed."""


@functools.cache
def need(module: str) -> ModuleType:
    """Import ``module`` (e.g. ``"hangul_romanize.rule"``) or raise LyricsDependencyError."""
    try:
        return import_module(module)
    except ImportError as error:
        top = module.split(".")[0]
        name = _DISTRIBUTIONS.get(top, top)
        raise LyricsDependencyError(
            f"ACE-Step v1 lyric tokenisation needs the package {name!r} ({error}); "
            "install it with: pip install 'acestep-dist[v1]'") from None
