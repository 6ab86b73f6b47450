"""The registry of model families: the only place that knows which families exist.

Stages ask it for a family by name (``get``), for the family of a checkpoint (``open_model``), or
for every family's choices (``families``) and hold only the ``Family`` / ``FamilyModel`` objects of
``base.py``. ACE-Step 1.5 and v1 are built in. Other families register themselves:

- installed packages through the entry-point group ``acestep_dist.families`` (an entry point names
  a ``Family`` instance or class), or
- ``ACEDIST_FAMILIES=module:attribute[,module:attribute]`` for a module on the path (a family
  under development; the tests' example family). Training forwards this one variable to Ray workers,
  so a worker finds the same families as the driver.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from ..errors import ModelLoadError, UserError
from .base import (FamilyModel, Family, FamilyOptions, RenderRequest, ModelDescription, SampleSchema,
                   TensorSpec, Trainable)

PLUGINS_ENV = "ACEDIST_FAMILIES"
ENTRY_POINT_GROUP = "acestep_dist.families"
# Shards, markers and runs written before families were recorded are ACE-Step 1.5's (the only
# family then), schema version 1: they are read as that.
LEGACY_FAMILY, LEGACY_SCHEMA_VERSION = "ace-step-1.5", 1

_registry: dict[str, Family] = {}
_loaded = False

__all__ = ["Family", "FamilyModel", "FamilyOptions", "RenderRequest", "ModelDescription", "SampleSchema",
           "TensorSpec", "Trainable", "families", "get", "open_model", "register", "LEGACY_FAMILY",
           "LEGACY_SCHEMA_VERSION", "PLUGINS_ENV"]


def register(family: Family | type[Family]) -> Family:
    """Add a family (instance or class); registering the same name twice keeps the first."""
    instance = family() if isinstance(family, type) else family
    if not isinstance(instance, Family):
        raise TypeError(f"{family!r} is not an acestep_dist Family")
    return _registry.setdefault(instance.name, instance)


def _load_object(spec: str):
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UserError(f"{PLUGINS_ENV}: {spec!r} is not of the form module:attribute")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise UserError(f"{PLUGINS_ENV}: cannot load family {spec!r}: {error}") from None


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from .ace_step_15 import FAMILY as ace_step_15
    from .ace_step_v1.interface import FAMILY as ace_step_v1

    register(ace_step_15)
    register(ace_step_v1)
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        register(entry.load())
    for spec in filter(None, (part.strip() for part in os.environ.get(PLUGINS_ENV, "").split(","))):
        register(_load_object(spec))


def families() -> list[Family]:
    _ensure_loaded()
    return list(_registry.values())


def names() -> list[str]:
    return [family.name for family in families()]


def get(name: str) -> Family:
    _ensure_loaded()
    try:
        return _registry[name]
    except KeyError:
        raise UserError(f"unknown model family {name!r}; known: {', '.join(_registry)} "
                        f"(other families register through {PLUGINS_ENV} or the {ENTRY_POINT_GROUP} entry points)") from None


def union(attribute: str) -> list[str]:
    """Every family's values of a tuple attribute (variants, lora_formats, tasks, ...), in order."""
    return list(dict.fromkeys(value for family in families() for value in getattr(family, attribute)))


def family_of(model: str) -> Family:
    """The family that claims ``model`` (local folder or hub id); the surest claim wins."""
    scored = sorted(((family.claims(model), index, family) for index, family in enumerate(families())),
                    key=lambda item: (-item[0], item[1]))
    best = [family for score, _, family in scored if score == scored[0][0] and score > 0]
    if not best:
        if not Path(model).expanduser().exists():
            raise ModelLoadError(f"model {model!r}: no such folder, and not a hub id any model family "
                                 f"({', '.join(names())}) recognises (org/name)")
        raise ModelLoadError(f"model {model}: no model family recognises it (families: {', '.join(names())}); "
                             f"pass a checkpoint folder of one of them or a hub id")
    if len(best) > 1 and scored[0][0] == 2:
        raise ModelLoadError(f"model {model}: claimed by several families ({', '.join(f.name for f in best)})")
    return best[0]


def open_model(model: str) -> tuple[Family, ModelDescription]:
    """The family of ``model`` and its description (config files only, no weights)."""
    family = family_of(model)
    return family, family.describe(model)


def worker_reference(model: str, description: ModelDescription) -> str:
    """What Ray workers load: the resolved folder when the user gave a path (it must be storage every
    node reaches), or the hub id as given, so each node fills its own cache."""
    return description.source if os.path.isabs(model) else model


def plugin_env() -> dict[str, str]:
    """The variable that makes a Ray worker register the same families as this process."""
    value = os.environ.get(PLUGINS_ENV)
    return {PLUGINS_ENV: value} if value else {}

