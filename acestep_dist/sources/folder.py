"""A folder of audio with sidecar texts (SimpleTuner's layout), searched recursively.

``song.wav`` + ``song.txt`` (caption) + optional ``song.lyrics`` (file names configurable, e.g.
``{stem}_lyrics.txt``), and optionally a ``metadata.csv`` / ``metadata.jsonl`` in any folder giving
bpm, keyscale, timesignature, language (and a caption for files without a sidecar) per file.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..config import PrepConfig
from ..records import Record
from .base import (
    AUDIO_EXTENSIONS, Problem, SourceError, SourceListing, apply_text_limits, clean_optional, metadata_fields,
    read_text, unique_keys,
)

METADATA_FILES = ("metadata.csv", "metadata.jsonl")


def _read_metadata(folder: Path) -> dict[str, dict]:
    """file name (relative to its folder) -> row, for every metadata file under ``folder``."""
    rows: dict[str, dict] = {}
    for name in METADATA_FILES:
        for path in sorted(folder.rglob(name)):
            try:
                if name.endswith(".csv"):
                    with open(path, newline="", encoding="utf-8-sig") as f:
                        entries = list(csv.DictReader(f))
                else:
                    entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as error:
                raise SourceError(f"{path}: cannot read metadata: {error}") from None
            for entry in entries:
                file = clean_optional(entry.get("file") or entry.get("file_name") or entry.get("audio") or entry.get("filename"))
                if file:
                    rows[str((path.parent / file).resolve())] = entry
    return rows


def list_folder(folder: Path, config: PrepConfig) -> SourceListing:
    folder = folder.resolve()  # records carry absolute paths: workers and reruns read the same files
    if not folder.is_dir():
        raise SourceError(f"{folder} is not a folder")
    audio = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
    if not audio:
        raise SourceError(f"{folder}: no audio files ({', '.join(sorted(AUDIO_EXTENSIONS))})")
    metadata = _read_metadata(folder)
    listing = SourceListing()
    stems = [str(p.relative_to(folder).with_suffix("")) for p in audio]
    for path, key in zip(audio, unique_keys(stems)):
        where = str(path)
        row = metadata.get(str(path.resolve()), {})
        caption_path = path.with_name(config.caption_file.format(stem=path.stem, name=path.name))
        lyrics_path = path.with_name(config.lyrics_file.format(stem=path.stem, name=path.name))
        try:
            if caption_path.is_file():
                caption = read_text(caption_path)
            elif clean_optional(row.get("caption")):
                caption = str(row["caption"]).strip()
            elif config.allow_missing_caption:
                caption = ""
                listing.warnings.append(Problem(where, "source", f"missing caption {caption_path.name}; empty caption used"))
            else:
                listing.rejected.append(Problem(where, "source", f"missing caption {caption_path.name}"))
                continue
            lyrics = read_text(lyrics_path) if lyrics_path.is_file() else None
        except (ValueError, OSError) as error:
            listing.rejected.append(Problem(where, "source", str(error)))
            continue
        if not caption and not config.allow_missing_caption:
            listing.rejected.append(Problem(where, "source", f"empty caption {caption_path.name}"))
            continue
        record = Record(key=key, audio=str(path), caption=caption, lyrics=lyrics or None,
                        **metadata_fields(row, key_means_keyscale=True))
        listing.records.append(apply_text_limits(record, config, where, listing.warnings))
    return listing
