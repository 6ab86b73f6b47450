"""Sources: anything a user's songs come in, turned into one list of ``Record`` s.

``load_source`` detects the kind (``--source-type`` forces it): a folder with sidecars, a
canonical manifest, DiffSynth metadata, the ACE-Step 1.5 dataset JSON, or a Hugging Face dataset
(one made by ACE-Step v1's upstream converter is recognised by its columns).

Every source checks each row's texts and metadata as ``fields`` says, reads text files in legacy
encodings with a warning, gives unique WebDataset-safe keys, and lists one entry per source row,
each naming its row (``base``). A dataset's audio paths stay inside its folders (``base.find_dataset_file``).
"""

from __future__ import annotations

from pathlib import Path

from ..config import PrepConfig
from .base import Problem, SourceError, SourceListing
from .folder import list_folder
from .hf import is_saved_dataset, list_hf_dataset, open_dataset
from .manifest import FORMATS, list_manifest
from .upstream import UPSTREAM_COLUMNS, is_upstream_dataset, list_upstream

SOURCE_TYPES = ("folder", "hf", "upstream") + FORMATS
_DIFFSYNTH_FILES = ("metadata.json", "metadata.jsonl", "metadata.csv")


def detect_source_type(path: Path) -> str:
    if path.is_file():
        if path.suffix.lower() not in (".jsonl", ".csv", ".json"):
            raise SourceError(f"{path}: a source file must be .jsonl, .csv or .json")
        return "metadata-file"
    if path.is_dir():
        return "hf" if is_saved_dataset(path) else "folder"
    if len(str(path).split("/")) == 2 and not str(path).startswith((".", "/", "~")):
        return "hf"  # org/name: a hub dataset
    raise SourceError(f"source {path} does not exist")


def load_source(path: str | Path, config: PrepConfig, source_type: str | None = None,
                cache_dir: Path | None = None) -> SourceListing:
    """``cache_dir`` receives audio stored inside a Hugging Face dataset (written once, by hash)."""
    if source_type is not None and source_type not in SOURCE_TYPES:
        raise SourceError(f"unknown source type {source_type!r}; known: {', '.join(SOURCE_TYPES)}")
    if source_type in ("hf", "upstream") or (source_type is None and detect_source_type(Path(path)) == "hf"):
        return list_dataset(str(path), config, cache_dir, upstream={"upstream": True, "hf": False}.get(source_type))
    path = Path(path)
    kind = detect_source_type(path)
    if kind == "folder":
        if source_type in FORMATS:
            # DiffSynth keeps its metadata file at the top of the dataset folder
            for name in _DIFFSYNTH_FILES:
                if (path / name).is_file():
                    return list_manifest(path / name, config, source_type)
            raise SourceError(f"{path}: no {' / '.join(_DIFFSYNTH_FILES)} for source type {source_type}")
        return list_folder(path, config)
    if source_type == "folder":
        raise SourceError(f"{path} is a file; source type 'folder' needs a folder")
    return list_manifest(path, config, source_type)


def list_dataset(source: str, config: PrepConfig, cache_dir: Path | None = None,
                 upstream: bool | None = None) -> SourceListing:
    """A Hugging Face dataset, read as an upstream converter's dataset (``upstream`` True), as a generic
    one (False), or as its columns say (None)."""
    dataset = open_dataset(source, config.dataset_split)
    columns = dataset.column_names
    if upstream is None:
        upstream = is_upstream_dataset(columns)
    if not upstream:
        return list_hf_dataset(source, config, cache_dir, dataset=dataset)
    if not is_upstream_dataset(columns):
        raise SourceError(f"{source}: not an upstream ACE-Step dataset (needs columns {', '.join(UPSTREAM_COLUMNS)}; "
                          f"found {', '.join(columns)})")
    return list_upstream(dataset, source, config)


__all__ = ["Problem", "SOURCE_TYPES", "SourceError", "SourceListing", "detect_source_type", "list_dataset", "load_source"]
