"""Hugging Face datasets: a hub id or a ``save_to_disk`` folder, audio as an ``Audio`` column or a
path column. Audio is never decoded by ``datasets`` (its decoder needs torchcodec): the column is
read with ``Audio(decode=False)``; embedded bytes are written once to a cache folder and decoded
by PyAV like any file. Caption fields and the lyrics column are configurable (SimpleTuner's
``audio_caption_fields`` and ``lyrics_column``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..config import PrepConfig
from ..records import Record
from .base import Entry, Problem, SourceError, SourceListing, add_entries, clean_optional, find_dataset_file, warn_row
from .fields import RowRejected, check_fields, metadata_values

_AUDIO_FALLBACKS = ("audio", "filename", "file", "path", "audio_path")


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def open_dataset(source: str | Path, split: str):
    """A ``datasets.Dataset`` from a saved folder or a hub id (the split of a DatasetDict)."""
    import datasets

    try:
        if Path(source).is_dir():
            loaded = datasets.load_from_disk(str(source))
        else:
            loaded = datasets.load_dataset(str(source), split=split)
    except FileNotFoundError as error:
        raise SourceError(f"{source}: not a Hugging Face dataset ({error})") from None
    except Exception as error:  # hub unreachable, unknown repo, bad files: one clear line
        raise SourceError(f"{source}: cannot open as a Hugging Face dataset: {type(error).__name__}: {error}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise SourceError(f"{source}: no split {split!r} (has {', '.join(loaded)}); set dataset_split=")
        loaded = loaded[split]
    return loaded


def _caption(row: dict[str, Any], fields: list[str]) -> Any:
    """The first non-empty caption field as it is (``check_text`` judges it); a tag list joined."""
    for name in fields:
        value = row.get(name)
        if isinstance(value, (list, tuple)):  # tag lists
            value = ", ".join(str(v).strip() for v in value if clean_optional(v))
        if isinstance(value, dict):  # e.g. upstream's recaption struct: not a caption by itself
            continue
        if clean_optional(value) is not None:
            return value
    return None


def _audio_file(value: Any, roots: list[Path], cache_dir: Path | None, allow_outside: bool) -> Path:
    """A local file for an Audio cell ({bytes, path}) or a path string; a path must stay inside
    ``roots`` unless ``allow_outside`` (``find_dataset_file``)."""
    path, data = (value.get("path"), value.get("bytes")) if isinstance(value, dict) else (value, None)
    if data:
        if cache_dir is None:
            raise ValueError("audio stored inside the dataset is unpacked into OUT/source_audio, which needs a "
                             "local --out; for a URL --out (s3://...) run `acedist convert` first")
        digest = hashlib.sha256(data).hexdigest()[:24]
        suffix = Path(path).suffix if isinstance(path, str) and Path(path).suffix else ".bin"
        target = cache_dir / f"{digest}{suffix}"
        if not target.exists():
            cache_dir.mkdir(parents=True, exist_ok=True)
            temporary = target.with_suffix(target.suffix + ".tmp")
            temporary.write_bytes(data)
            temporary.replace(target)
        return target
    if not isinstance(path, str) or not path or "\0" in path:
        raise ValueError("no audio path or bytes")
    return find_dataset_file(path, roots, allow_outside)


def list_hf_dataset(source: str | Path, config: PrepConfig, cache_dir: Path | None = None, *, dataset=None,
                    audio_root: str | Path | None = None, allow_outside: bool = False) -> SourceListing:
    """``dataset``: already opened from ``source``; ``audio_root``: the only folder relative paths
    are resolved against (default: the dataset folder, its parent, the current directory); audio
    paths must stay inside those folders unless ``allow_outside`` (a dataset comes from elsewhere).
    One listing entry per dataset row, named ``SOURCE[INDEX]``."""
    import datasets

    if dataset is None:
        dataset = open_dataset(source, config.dataset_split)
    columns = list(dataset.column_names)
    audio_column = config.audio_column if config.audio_column in columns else next(
        (c for c in _AUDIO_FALLBACKS if c in columns), None)
    if audio_column is None:
        raise SourceError(f"{source}: no audio column ({config.audio_column!r}; found {', '.join(columns)}); set audio_column=")
    if isinstance(dataset.features.get(audio_column), datasets.Audio):
        dataset = dataset.cast_column(audio_column, datasets.Audio(decode=False))
    if audio_root is not None:
        roots = [Path(audio_root).expanduser().resolve()]
    elif Path(source).is_dir():
        roots = [Path(source).resolve(), Path(source).resolve().parent, Path.cwd()]
    else:
        roots = [Path.cwd()]
    listing = SourceListing()
    entries = []
    for index, row in enumerate(dataset):
        where = f"{source}[{index}]"
        try:
            audio = _audio_file(row[audio_column], roots, cache_dir, allow_outside)
        except (ValueError, OSError) as error:
            listing.rejected.append(Problem(where, "source", str(error), where))
            continue
        values = {"caption": _caption(row, config.audio_caption_fields), "lyrics": row.get(config.lyrics_column),
                  **metadata_values(row)}
        try:
            checked, notes = check_fields(values)
        except RowRejected as error:
            listing.rejected.append(Problem(str(audio), "source", f"{error} ({where})", where))
            continue
        if checked["caption"] is None:
            missing = f"missing caption (fields {', '.join(config.audio_caption_fields)}; {where})"
            if not config.allow_missing_caption:
                listing.rejected.append(Problem(str(audio), "source", missing, where))
                continue
            listing.warnings.append(Problem(str(audio), "source", f"{missing}; empty caption used", where))
            checked["caption"] = ""
        warn_row(listing, str(audio), where, notes)
        explicit_key = clean_optional(row.get("key")) or clean_optional(row.get("keys"))
        stem = str(explicit_key) if explicit_key is not None else audio.stem
        entries.append(Entry(stem, Record(key="", audio=str(audio), row=where, **checked), str(audio),
                             explicit=explicit_key is not None))
    add_entries(listing, entries, config)
    return listing
