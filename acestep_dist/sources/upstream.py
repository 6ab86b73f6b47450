"""Datasets made by ACE-Step v1's upstream converter (``convert2hf_dataset.py``).

A ``save_to_disk`` folder (or hub id) with the columns ``keys``, ``filename``, ``tags`` (a list;
older files spell the feature ``Sequence``, newer ``List``; ``datasets`` reads both),
``speaker_emb_path`` (always empty, ignored), ``norm_lyrics`` and ``recaption`` (a struct of
alternative captions, often empty). The converter writes every song ``repeat_count`` times (users
pass 2000): identical rows collapse into one record with ``repeat`` = their count, so a song is
decoded and encoded once and the training sampler repeats it instead.

``filename`` is relative to the folder the converter ran in, which this dataset does not record:
it is resolved against an explicit audio root, else the dataset folder's parent and the current
directory, and must stay inside them (a dataset comes from elsewhere: ``/etc/passwd`` or
``../../x`` are refused unless the user converts with ``--allow-outside-paths``). A song whose
file is not found is rejected: one problem for all its identical rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..config import PrepConfig
from ..records import Record
from .base import (
    AudioNotFound, Entry, Problem, SourceListing, add_entries, apply_text_limits, clean_optional, find_dataset_file,
)
from .fields import check_fields, check_text

UPSTREAM_COLUMNS = ("keys", "filename", "tags", "norm_lyrics")
EMPTY_CAPTION = "music"  # what upstream trains on when a song has no tags


def is_upstream_dataset(columns: Iterable[str]) -> bool:
    return set(UPSTREAM_COLUMNS) <= set(columns)


@dataclass
class UpstreamListing:
    """Records before text limits (``convert`` writes them as they are), plus what happened."""

    records: list[Record] = field(default_factory=list)
    unresolved: list[Problem] = field(default_factory=list)  # one per song (its repeats included)
    warnings: list[Problem] = field(default_factory=list)
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


@dataclass
class _Song:
    """One distinct song of an upstream dataset: its first row's entry (None when rejected) or
    problem, and how many rows repeat it."""

    entry: Entry | None = None
    problem: Problem | None = None
    rows: int = 1


def read_upstream(dataset, source: str | Path, audio_root: str | Path | None = None,
                  dedupe: bool = True, allow_outside: bool = False) -> UpstreamListing:
    """``dataset``: an opened ``datasets.Dataset`` with the upstream columns. Audio paths must stay
    inside the search roots unless ``allow_outside``. Rows are named ``SOURCE[INDEX]``; a song's
    identical rows are one record (``dedupe``) or one record each, and one problem when it cannot
    be used."""
    roots = search_roots(source, audio_root)
    searched = ", ".join(str(root) for root in roots)
    listing = UpstreamListing()
    songs: dict[str, _Song] = {}  # by identity
    entries: list[Entry] = []
    for index, row in enumerate(dataset.select_columns(
            [c for c in (*UPSTREAM_COLUMNS, "recaption") if c in dataset.column_names])):
        listing.rows += 1
        where = f"{source}[{index}]"
        song = songs.get(_identity(row))
        if song is not None:
            song.rows += 1
            if dedupe:
                listing.duplicates += 1
                if song.entry is not None:
                    song.entry.record = song.entry.record.with_(repeat=song.rows)
            elif song.entry is not None:  # not explicit: a repeat's suffixed key is expected, not warned about
                entries.append(Entry(song.entry.stem, song.entry.record.with_(row=where), song.entry.input))
            continue  # a rejected song's one problem stands for its repeats too
        song = songs[_identity(row)] = _Song()
        filename = clean_optional(row.get("filename"))
        name = filename if isinstance(filename, str) else ""
        try:
            if not name or "\0" in name:
                raise ValueError("row has no filename")
            try:
                audio = find_dataset_file(name, roots, allow_outside)
            except AudioNotFound:
                raise ValueError(f"audio file not found (searched {searched}); pass the folder the upstream "
                                 f"converter ran in as --audio-root") from None
            caption = check_text("tags", tag_caption(row.get("tags")))
            checked, notes = check_fields({"lyrics": row.get("norm_lyrics")})
        except ValueError as error:  # a path outside the roots, RowRejected
            song.problem = Problem(name or str(source), "source", str(error), where)
            listing.unresolved.append(song.problem)
            continue
        listing.warnings.extend(Problem(str(audio), "source", f"{note} ({where})", where) for note in notes)
        stem = clean_optional(row.get("keys"))
        record = Record(key="", audio=str(audio), caption=caption, lyrics=checked["lyrics"],
                        alt_captions=alt_captions(row.get("recaption"), caption), row=where)
        song.entry = Entry(str(stem) if stem is not None else audio.stem, record, str(audio), explicit=stem is not None)
        entries.append(song.entry)
    for song in songs.values():
        if song.problem is not None and song.rows > 1:
            song.problem.reason += f" ({song.rows} identical rows, the first {song.problem.row})"
    keyed = SourceListing()
    add_entries(keyed, entries, None)  # two different songs with one ``keys`` value are warned about
    listing.records, listing.warnings = keyed.records, listing.warnings + keyed.warnings
    return listing


def list_upstream(dataset, source: str | Path, config: PrepConfig) -> SourceListing:
    """The prep view of an upstream dataset: deduplicated records, text limits applied, audio
    paths confined to the dataset's folders (``acedist convert --allow-outside-paths`` lifts that)."""
    upstream = read_upstream(dataset, source)
    listing = SourceListing(rejected=list(upstream.unresolved), warnings=list(upstream.warnings))
    for record in upstream.records:
        listing.records.append(apply_text_limits(record, config, record.audio, listing.warnings))
    return listing
