"""ACE-Step 1.5 (turbo, shift variants, base, SFT, XL) on diffusers' components.

``FAMILY`` is what the registry registers (``interface.py``); the model code is imported only
when it is used, so listing the family stays cheap."""

from __future__ import annotations

import importlib

from .interface import FAMILY

# name -> module of the family's internals, for code (and tests) that work with 1.5 itself
_LAZY = {
    "AceStep15": "family", "LatentStats": "family", "TrainingBatch": "family",
    "ALL_PARTS": "loading", "AceStep15Components": "loading", "load_components": "loading",
    "VARIANT_NAMES": "options", "VariantSpec": "variants", "detect_variant": "variants", "variant_spec": "variants",
}

__all__ = ["FAMILY", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
