"""Datasets made by ACE-Step v1's upstream converter (``convert2hf_dataset.py``).

A ``save_to_disk`` folder (or hub id) with the columns ``keys``, ``filename``, ``tags`` (a list;
older files spell the feature ``Sequence``, newer ``List``; ``datasets`` reads both),
``speaker_emb_path`` (always empty, ignored), ``norm_lyrics`` and ``recaption`` (a struct of
alternative captions, often empty). The converter writes every song ``repeat_count`` times (users
pass 2000): identical rows collapse into one record with ``repeat`` = their count, so a song is
decoded and encoded once and the training sampler repeats it instead.

``filename`` is relative to the folder the converter ran in, which this dataset does not record:
it is resolved against an explicit audio root, else the dataset folder's parent and the current
directory. Rows whose file is not found are rejected (one problem per distinct file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..config import PrepConfig
from ..records import Record
from .base import Problem, SourceListing, apply_text_limits, clean_optional, find_file, unique_keys

UPSTREAM_COLUMNS = ("keys", "filename", "tags", "norm_lyrics")
EMPTY_CAPTION = "music"  # what upstream trains on when a song has no tags


def is_upstream_dataset(columns: Iterable[str]) -> bool:
    return set(UPSTREAM_COLUMNS) <= set(columns)


@dataclass
class UpstreamListing:
    """Records before text limits (``convert`` writes them as they are), plus what happened."""

    records: list[Record] = field(default_factory=list)
    unresolved: list[Problem] = field(default_factory=list)  # one per distinct missing file
    rows: int = 0
    duplicates: int = 0  # rows folded into an earlier identical row


def tag_caption(tags: Any) -> str:
    """Tags joined with ", " in stored order (upstream shuffles them per read; a fixed order keeps
    prep deterministic). A tag may itself contain commas; it is kept whole."""
    if isinstance(tags, str):
        tags = [tags]
    parts = [str(tag).strip() for tag in tags or () if clean_optional(tag)]
    return ", ".join(parts) or EMPTY_CAPTION


def alt_captions(recaption: Any, caption: str) -> tuple[str, ...]:
    """Non-empty string values of the recaption struct, in field order, without repeats or a copy of
    the tag caption (sampling that would only weight the tags more)."""
    if isinstance(recaption, dict):
        values = list(recaption.values())
    elif isinstance(recaption, (list, tuple)):
        values = list(recaption)
    else:
        values = [recaption]
    found: list[str] = []
    for value in values:
        text = clean_optional(value) if isinstance(value, str) else None
        if text and text != caption and text not in found:
            found.append(text)
    return tuple(found)


def search_roots(source: str | Path, audio_root: str | Path | None) -> list[Path]:
    if audio_root is not None:
        return [Path(audio_root).expanduser().resolve()]
    roots = [Path(source).resolve().parent] if Path(source).is_dir() else []
    return roots + [Path.cwd()]


def _identity(row: dict[str, Any]) -> str:
    """Rows are repeats of one song when every content field is equal (speaker_emb_path is ignored)."""
    return json.dumps([row.get("keys"), row.get("filename"), row.get("tags"), row.get("norm_lyrics"),
                       row.get("recaption")], sort_keys=True, default=str)


def read_upstream(dataset, source: str | Path, audio_root: str | Path | None = None,
                  dedupe: bool = True) -> UpstreamListing:
    """``dataset``: an opened ``datasets.Dataset`` with the upstream columns."""
    roots = search_roots(source, audio_root)
    searched = ", ".join(str(root) for root in roots)
    listing = UpstreamListing()
    # identity -> [first row, count]; dicts keep first-seen order
    songs: dict[str, list] = {}
    for index, row in enumerate(dataset.select_columns(
            [c for c in (*UPSTREAM_COLUMNS, "recaption") if c in dataset.column_names])):
        listing.rows += 1
        identity = _identity(row) if dedupe else str(index)
        if identity in songs:
            songs[identity][1] += 1
            listing.duplicates += 1
        else:
            songs[identity] = [row, 1]

    entries: list[tuple[str, Record]] = []
    missing: set[str] = set()
    for row, count in songs.values():
        filename = clean_optional(row.get("filename"))
        audio = find_file(filename, roots) if isinstance(filename, str) and "\0" not in filename else None
        if audio is None:
            name = str(filename or "")
            if name not in missing:  # --no-dedupe: a missing song's repeats are one problem
                missing.add(name)
                reason = (f"audio file not found (searched {searched}); pass the folder the upstream "
                          f"converter ran in as --audio-root" if name else "row has no filename")
                listing.unresolved.append(Problem(name or str(source), "source", reason))
            continue
        caption = tag_caption(row.get("tags"))
        lyrics = clean_optional(row.get("norm_lyrics"))
        stem = clean_optional(row.get("keys")) or audio.stem
        entries.append((str(stem), Record(key="", audio=str(audio), caption=caption,
                                          lyrics=None if lyrics is None else str(lyrics),
                                          alt_captions=alt_captions(row.get("recaption"), caption), repeat=count)))
    # make_key semantics; with --no-dedupe the repeats of one song get suffixes _1, _2, ...
    for (_, record), key in zip(entries, unique_keys([stem for stem, _ in entries])):
        listing.records.append(record.with_(key=key))
    return listing


def list_upstream(dataset, source: str | Path, config: PrepConfig) -> SourceListing:
    """The prep view of an upstream dataset: deduplicated records, text limits applied."""
    upstream = read_upstream(dataset, source)
    listing = SourceListing(rejected=list(upstream.unresolved))
    for record in upstream.records:
        listing.records.append(apply_text_limits(record, config, f"{source}:{record.key}", listing.warnings))
    return listing
