"""Metadata files that list audio with its texts, one row per song.

- canonical manifest (JSONL or CSV): ``audio``, ``caption``, ``lyrics``, ``bpm``, ``keyscale``,
  ``timesignature``, ``language``, optional ``key``, ``repeat``, ``alt_captions``;
- DiffSynth-Studio metadata (``.json`` list / ``.jsonl`` / ``.csv``): ``audio``, ``prompt``,
  ``lyrics``, ``bpm``, ``keyscale``, ``timesignature``, ``vocal_language``;
- the ACE-Step 1.5 dataset builder's JSON: ``{"samples": [{"audio_path", "caption", "lyrics",
  "bpm", "keyscale", "timesignature", "language", "duration", "is_instrumental"}]}``.

Audio paths are resolved against the metadata file's folder; absolute paths are allowed (a
manifest is the user's own file), but every path must name an existing regular file.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable

from ..config import PrepConfig
from ..records import Record
from .base import Problem, SourceError, SourceListing, apply_text_limits, clean_optional, metadata_fields, unique_keys

FORMATS = ("manifest", "diffsynth", "acestep-json")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl, .csv, or .json (a list, or an object with ``samples``) file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise SourceError(f"{path}: cannot read: {error}") from None
    try:
        if path.suffix.lower() == ".csv":
            return list(csv.DictReader(text.splitlines()))
        if path.suffix.lower() == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except (json.JSONDecodeError, csv.Error) as error:
        raise SourceError(f"{path}: not valid {path.suffix.lstrip('.').upper()}: {error}") from None
    if isinstance(data, dict) and isinstance(data.get("samples"), list):
        return data["samples"]
    if isinstance(data, list):
        return data
    raise SourceError(f"{path}: expected a list of rows or an object with 'samples'")


def detect_format(rows: Iterable[dict[str, Any]], path: Path) -> str:
    columns = set().union(*(row.keys() for row in rows)) if rows else set()
    if "audio_path" in columns:
        return "acestep-json"
    if "audio" in columns and "prompt" in columns and "caption" not in columns:
        return "diffsynth"
    if "audio" in columns:
        return "manifest"
    raise SourceError(f"{path}: no 'audio' or 'audio_path' column (found: {', '.join(sorted(columns)) or 'none'})")


def _alt_captions(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = [value]
    if not isinstance(value, (list, tuple)):
        return ()
    return tuple(str(v).strip() for v in value if clean_optional(v))


def list_manifest(path: Path, config: PrepConfig, format: str | None = None) -> SourceListing:
    rows = read_rows(path)
    if not rows:
        raise SourceError(f"{path}: no rows")
    format = format or detect_format(rows, path)
    if format not in FORMATS:
        raise SourceError(f"unknown metadata format {format!r}; known: {', '.join(FORMATS)}")
    audio_column = "audio_path" if format == "acestep-json" else "audio"
    caption_column = "prompt" if format == "diffsynth" else "caption"
    listing = SourceListing()
    root = path.parent
    entries = []
    for index, row in enumerate(rows):
        where = f"{path}:{index + 1}"
        if not isinstance(row, dict):
            listing.rejected.append(Problem(where, "source", "row is not an object"))
            continue
        audio = clean_optional(row.get(audio_column))
        if not isinstance(audio, str) or "\0" in audio:
            listing.rejected.append(Problem(where, "source", f"missing or invalid {audio_column!r}"))
            continue
        audio_path = (root / audio).resolve()
        if not audio_path.is_file():
            listing.rejected.append(Problem(str(audio_path), "source", f"audio file not found ({where})"))
            continue
        caption = clean_optional(row.get(caption_column))
        if caption is None:
            if not config.allow_missing_caption:
                listing.rejected.append(Problem(str(audio_path), "source", f"missing caption ({where})"))
                continue
            listing.warnings.append(Problem(str(audio_path), "source", f"missing caption ({where}); empty caption used"))
        lyrics = clean_optional(row.get("lyrics"))
        if format == "acestep-json" and str(row.get("is_instrumental", "")).lower() in ("true", "1"):
            lyrics = None
        try:
            repeat = int(clean_optional(row.get("repeat")) or 1)
        except (TypeError, ValueError):
            repeat = 0
        if repeat < 1:
            listing.rejected.append(Problem(str(audio_path), "source", f"repeat must be a positive integer ({where})"))
            continue
        explicit_key = clean_optional(row.get("key"))
        stem = str(explicit_key) if explicit_key else (
            str(Path(audio).with_suffix("")) if not Path(audio).is_absolute() else audio_path.stem
        )
        # in a canonical manifest "key" is the sample's key, not the musical key (keyscale)
        musical = {k: v for k, v in row.items() if k != "key"} if format == "manifest" else row
        entries.append((stem, Record(
            key="", audio=str(audio_path), caption=str(caption or ""), lyrics=None if lyrics is None else str(lyrics),
            repeat=repeat, alt_captions=_alt_captions(row.get("alt_captions")), **metadata_fields(musical),
        ), where))
    for (stem, record, where), key in zip(entries, unique_keys([e[0] for e in entries])):
        listing.records.append(apply_text_limits(record.with_(key=key), config, where, listing.warnings))
    return listing
