"""A folder of audio with sidecar texts (SimpleTuner's layout), searched recursively.

``song.wav`` + ``song.txt`` (caption) + optional ``song.lyrics`` (file names configurable, e.g.
``{stem}_lyrics.txt``), and optionally a ``metadata.csv`` / ``metadata.jsonl`` in any folder giving
bpm, keyscale, timesignature, language (and a caption for files without a sidecar) per file.
Each audio file is one row of the listing; text files in a legacy encoding are read with a warning
(``base.decode_text``); metadata values are checked as ``fields`` says.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..config import PrepConfig
from ..records import Record
from .base import (
    AUDIO_EXTENSIONS, Entry, Problem, SourceError, SourceListing, add_entries, clean_optional, read_table_text, read_text,
    warn_row,
)
from .fields import RowRejected, check_fields, metadata_values

METADATA_FILES = ("metadata.csv", "metadata.jsonl")


def _metadata_entries(path: Path, warnings: list[Problem]) -> list[tuple[int, object]]:
    """(line, row) of one metadata file."""
    text = read_table_text(path, warnings)
    if path.suffix == ".csv":
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            entries, line = [], 1
            for entry in reader:
                entries.append((line + 1, entry))
                line = reader.line_num
            return entries
        except csv.Error as error:
            raise SourceError(f"{path}: cannot read metadata: {error}") from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                entries.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise SourceError(f"{path}:{number}: cannot read metadata: {error}") from None
    return entries


def _read_metadata(folder: Path, warnings: list[Problem]) -> dict[str, tuple[dict, str]]:
    """audio file (absolute) -> (row, "FILE:LINE"), for every metadata file under ``folder``."""
    rows: dict[str, tuple[dict, str]] = {}
    for name in METADATA_FILES:
        for path in sorted(folder.rglob(name)):
            for line, entry in _metadata_entries(path, warnings):
                where = f"{path}:{line}"
                if not isinstance(entry, dict):
                    raise SourceError(f"{where}: a metadata row must be an object, not {type(entry).__name__}")
                file = clean_optional(entry.get("file") or entry.get("file_name") or entry.get("audio")
                                      or entry.get("filename"))
                if not isinstance(file, str):
                    warnings.append(Problem(str(path), "source", f"metadata row names no file; ignored ({where})", where))
                    continue
                audio = (path.parent / file).resolve()
                if not audio.is_file():
                    warnings.append(Problem(str(path), "source", f"metadata row names {file}, which is not in the "
                                            f"folder; ignored ({where})", where))
                    continue
                if str(audio) in rows:
                    warnings.append(Problem(str(audio), "source", f"{file} has metadata rows at {rows[str(audio)][1]} "
                                            f"and {where}; the later one is used", where))
                rows[str(audio)] = (entry, where)
    return rows


def list_folder(folder: Path, config: PrepConfig) -> SourceListing:
    folder = folder.resolve()  # records carry absolute paths: workers and reruns read the same files
    if not folder.is_dir():
        raise SourceError(f"{folder} is not a folder")
    audio = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
    if not audio:
        raise SourceError(f"{folder}: no audio files ({', '.join(sorted(AUDIO_EXTENSIONS))})")
    listing = SourceListing()
    metadata = _read_metadata(folder, listing.warnings)
    entries = []
    for path in audio:
        where = str(path)  # a folder's row is its audio file
        row, row_where = metadata.get(str(path.resolve()), ({}, where))
        caption_path = path.with_name(config.caption_file.format(stem=path.stem, name=path.name))
        lyrics_path = path.with_name(config.lyrics_file.format(stem=path.stem, name=path.name))
        try:
            values = metadata_values(row, key_means_keyscale=True)
            if caption_path.is_file():
                values["caption"] = read_text(caption_path, where, listing.warnings, where)
            else:
                values["caption"] = row.get("caption")
            values["lyrics"] = read_text(lyrics_path, where, listing.warnings, where) if lyrics_path.is_file() else None
            checked, notes = check_fields(values)
        except RowRejected as error:
            listing.rejected.append(Problem(where, "source", f"{error} ({row_where})", where))
            continue
        except (ValueError, OSError) as error:
            listing.rejected.append(Problem(where, "source", str(error), where))
            continue
        warn_row(listing, where, row_where, notes)
        if checked["caption"] is None:
            reason = f"{'empty' if caption_path.is_file() else 'missing'} caption {caption_path.name}"
            if not config.allow_missing_caption:
                listing.rejected.append(Problem(where, "source", reason, where))
                continue
            listing.warnings.append(Problem(where, "source", f"{reason}; empty caption used", where))
            checked["caption"] = ""
        record = Record(key="", audio=str(path), row=where, **checked)
        entries.append(Entry(str(path.relative_to(folder).with_suffix("")), record, where))
    add_entries(listing, entries, config)
    return listing
