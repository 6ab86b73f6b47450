"""Metadata files that list audio with its texts, one row per song.

- canonical manifest (JSONL or CSV): ``audio``, ``caption``, ``lyrics``, ``bpm``, ``keyscale``,
  ``timesignature``, ``language``, optional ``key``, ``repeat``, ``alt_captions``;
- DiffSynth-Studio metadata (``.json`` list / ``.jsonl`` / ``.csv``): ``audio``, ``prompt``,
  ``lyrics``, ``bpm``, ``keyscale``, ``timesignature``, ``vocal_language``;
- the ACE-Step 1.5 dataset builder's JSON: ``{"metadata": {"custom_tag", "tag_position",
  "genre_ratio", ...}, "samples": [{"audio_path", "caption", "genre", "prompt_override",
  "custom_tag", "lyrics", "bpm", "keyscale", "timesignature", "language", "duration",
  "is_instrumental", "labeled"}]}``. The caption is built as upstream's preprocessing builds its
  training prompt (see ``BuilderPrompts``), trigger word included.

Audio paths are resolved against the metadata file's folder; absolute paths are allowed (a
manifest is the user's own file), but every path must name an existing regular file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..config import PrepConfig
from ..records import Record
from .base import Entry, Problem, SourceError, SourceListing, add_entries, clean_optional, read_table_text, warn_row
from .fields import check_fields, check_text, metadata_values

FORMATS = ("manifest", "diffsynth", "acestep-json")


@dataclass
class SourceRow:
    """One row of a metadata file as read: ``where`` names it (``FILE:LINE`` for JSONL and CSV, where
    LINE is the line it starts on; ``FILE sample N`` for a JSON list), ``value`` is what the row
    holds (an object, or anything else a line may hold), ``error`` says why a line could not be read."""

    where: str
    value: Any = None
    error: str | None = None


def read_rows(path: Path, warnings: list[Problem]) -> tuple[list[SourceRow], dict[str, Any]]:
    """Rows of a .jsonl, .csv, or .json (a list, or an object with ``samples``) file, and the
    object's top-level ``metadata`` (the dataset builder's settings; empty when there is none).
    A legacy-encoded file is read with a warning (``decode_text``); a JSONL line that is not JSON or
    a CSV line with more values than columns is one bad row, unless no line can be read at all."""
    text = read_table_text(path, warnings)
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return _csv_rows(path, text), {}
        if suffix == ".jsonl":
            rows = []
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(SourceRow(f"{path}:{number}", json.loads(line)))
                    except json.JSONDecodeError as error:
                        rows.append(SourceRow(f"{path}:{number}", error=f"line {number} is not valid JSON: {error}"))
            if rows and all(row.error for row in rows):
                raise SourceError(f"{path}: not valid JSONL: {rows[0].error}")
            return rows, {}
        data = json.loads(text)
    except (json.JSONDecodeError, csv.Error) as error:
        raise SourceError(f"{path}: not valid {suffix.lstrip('.').upper()}: {error}") from None
    if isinstance(data, dict) and isinstance(data.get("samples"), list):
        metadata = data.get("metadata", {})
        if not isinstance(metadata, dict):
            raise SourceError(f"{path}: 'metadata' must be an object, not {type(metadata).__name__}")
        samples = data["samples"]
    elif isinstance(data, list):
        samples, metadata = data, {}
    else:
        raise SourceError(f"{path}: expected a list of rows or an object with 'samples'")
    return [SourceRow(f"{path} sample {index + 1}", value) for index, value in enumerate(samples)], metadata


def _csv_rows(path: Path, text: str) -> list[SourceRow]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows, last_line = [], 1
    for row in reader:
        where = f"{path}:{last_line + 1}"
        last_line = reader.line_num
        extra = row.pop(None, None)  # values beyond the header's columns
        if extra:
            rows.append(SourceRow(where, error=f"line has {len(extra)} more values than the header has columns "
                                               f"({', '.join(reader.fieldnames or [])})"))
        else:
            rows.append(SourceRow(where, row))
    return rows


TAG_POSITIONS = ("prepend", "append", "replace")
PROMPT_OVERRIDES = ("caption", "genre")
GENRE_SEED = 42  # upstream's select_genre_indices seeds Python's random with 42


def _is_false(value: Any) -> bool:
    return value is False or (isinstance(value, (str, int)) and str(value).strip().lower() in ("false", "0", "no"))


@dataclass(frozen=True)
class BuilderPrompts:
    """The training prompt of upstream ACE-Step 1.5's dataset builder, for its JSON.

    Upstream (``acestep/training/dataset_builder_modules``: ``models.py`` ``AudioSample.get_training_prompt``,
    ``preprocess_utils.py`` ``select_genre_indices``, ``serialization.py``) keeps ``tag_position``
    (prepend / append / replace; default prepend) and ``genre_ratio`` (a percentage, 0-100) in the
    top-level ``metadata`` object, and ``custom_tag``, ``genre`` and ``prompt_override`` per sample
    (the builder copies the dataset's ``custom_tag`` into every sample; here a sample without one
    takes the dataset's). The base text is the sample's ``genre`` when ``prompt_override`` is
    "genre", its ``caption`` when "caption", else the genre for the samples ``genre_ratio`` picks,
    the caption for the rest. The tag is then joined with ", " before (prepend) or after (append)
    that text, or replaces it; with an empty text the prompt is the tag alone.

    genre_ratio: upstream draws the genre samples once, when it preprocesses (``random.seed(42)``,
    shuffle the indices of the labeled samples, the first ``int(n * ratio / 100)`` use the genre),
    and its tensors keep that one caption for every epoch. So this is a build-time choice, not a
    per-epoch one: we draw the same way over the same list (the samples not marked
    ``labeled: false``, in file order), so a sample gets the text upstream would give it, encode
    that one caption and record the choice as ``extra["prompt_from"] = "genre"``. Alternative
    captions sampled per epoch would train something upstream does not.
    """

    custom_tag: str = ""
    tag_position: str = "prepend"
    genre_ratio: float = 0.0

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], path: Path) -> "BuilderPrompts":
        tag = metadata.get("custom_tag", "")
        if tag is not None and not isinstance(tag, str):
            raise SourceError(f"{path}: metadata.custom_tag must be text, got {tag!r}")
        position = metadata.get("tag_position", "prepend")
        if position not in TAG_POSITIONS:
            raise SourceError(f"{path}: metadata.tag_position must be one of {', '.join(TAG_POSITIONS)}; "
                              f"got {position!r}")
        ratio = metadata.get("genre_ratio", 0)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) \
                or not 0 <= ratio <= 100:
            raise SourceError(f"{path}: metadata.genre_ratio must be a number from 0 to 100 (the percentage of "
                              f"samples whose genre is their prompt, as upstream's builder writes it); got {ratio!r}")
        return cls((tag or "").strip(), position, float(ratio))

    def genre_rows(self, rows: list[Any]) -> set[int]:
        """Indices into ``rows`` of the samples whose prompt is their genre (absent an override)."""
        labeled = [i for i, row in enumerate(rows) if isinstance(row, dict) and not _is_false(row.get("labeled"))]
        order = list(range(len(labeled)))
        random.Random(GENRE_SEED).shuffle(order)
        return {labeled[j] for j in order[: int(len(labeled) * self.genre_ratio / 100)]}

    def tagged(self, text: str, tag: str) -> str:
        if not tag:
            return text
        if self.tag_position == "replace":
            return tag
        if not text:
            return tag
        return f"{tag}, {text}" if self.tag_position == "prepend" else f"{text}, {tag}"

    def prompt(self, row: dict[str, Any], picked_for_genre: bool,
               alt_captions: tuple[str, ...] = ()) -> tuple[str, str, tuple[str, ...]]:
        """(caption, "caption" or "genre", alternative captions) for one sample, given its checked
        ``alt_captions``; ValueError names a bad field."""
        override = clean_optional(row.get("prompt_override"))
        if override is not None and override not in PROMPT_OVERRIDES:
            raise ValueError(f"prompt_override must be 'caption', 'genre' or null; got {override!r}")
        tag = clean_optional(row.get("custom_tag"))
        if tag is not None and not isinstance(tag, str):
            raise ValueError(f"custom_tag must be text; got {tag!r}")
        tag = tag or self.custom_tag
        use = override or ("genre" if picked_for_genre else "caption")
        text = check_text(use, row.get(use)) or ""
        caption = self.tagged(text, tag)
        # not upstream's (its builder has no alternative captions): ours get the trigger word too, so
        # the caption of every epoch carries it; "replace" makes them all the caption, so none are left
        alts = dict.fromkeys(self.tagged(alt, tag) for alt in alt_captions)
        return caption, use, tuple(alt for alt in alts if alt != caption)


def detect_format(rows: Iterable[Any], path: Path) -> str:
    """From the columns of the rows that are objects (the others are rejected one by one later)."""
    columns = set().union(*(row.keys() for row in rows if isinstance(row, dict)))
    if "audio_path" in columns:
        return "acestep-json"
    if "audio" in columns and "prompt" in columns and "caption" not in columns:
        return "diffsynth"
    if "audio" in columns:
        return "manifest"
    raise SourceError(f"{path}: no 'audio' or 'audio_path' column (found: {', '.join(sorted(columns)) or 'none'})")


def list_manifest(path: Path, config: PrepConfig, format: str | None = None) -> SourceListing:
    listing = SourceListing()
    source_rows, dataset_metadata = read_rows(path, listing.warnings)
    if not source_rows:
        raise SourceError(f"{path}: no rows")
    rows = [row.value for row in source_rows]
    format = format or detect_format(rows, path)
    if format not in FORMATS:
        raise SourceError(f"unknown metadata format {format!r}; known: {', '.join(FORMATS)}")
    audio_column = "audio_path" if format == "acestep-json" else "audio"
    builder = BuilderPrompts.from_metadata(dataset_metadata, path) if format == "acestep-json" else None
    genre_rows = builder.genre_rows(rows) if builder else set()
    caption_column = "prompt" if format == "diffsynth" else "caption"
    root = path.parent
    entries = []
    for index, (source_row, row) in enumerate(zip(source_rows, rows)):
        where = source_row.where
        if source_row.error:
            listing.rejected.append(Problem(where, "source", source_row.error, where))
            continue
        if not isinstance(row, dict):
            listing.rejected.append(Problem(where, "source", f"row is not an object but {type(row).__name__} "
                                            f"{json.dumps(row, ensure_ascii=False)[:60]} ({where})", where))
            continue
        audio = clean_optional(row.get(audio_column))
        if not isinstance(audio, str) or "\0" in audio:
            listing.rejected.append(Problem(where, "source", f"missing or invalid {audio_column!r} ({where})", where))
            continue
        audio_path = (root / audio).resolve()  # a manifest is the user's own file: absolute paths are fine
        if not audio_path.is_file():
            listing.rejected.append(Problem(str(audio_path), "source", f"audio file not found ({where})", where))
            continue
        values = {"caption": row.get(caption_column), "lyrics": row.get("lyrics"), "repeat": row.get("repeat"),
                  "alt_captions": row.get("alt_captions"), **metadata_values(row)}
        if format == "acestep-json" and str(row.get("is_instrumental", "")).lower() in ("true", "1"):
            values["lyrics"] = None
        try:
            checked, notes = check_fields(values)
            extra = {}
            missing = "missing caption"
            if builder is not None:
                checked["caption"], prompt_from, checked["alt_captions"] = builder.prompt(
                    row, index in genre_rows, checked["alt_captions"])
                checked["caption"] = checked["caption"] or None
                if prompt_from == "genre":
                    extra["prompt_from"] = "genre"
                    missing = "missing genre (the prompt for this sample) and no custom_tag"
        except ValueError as error:  # RowRejected, or a builder field
            listing.rejected.append(Problem(str(audio_path), "source", f"{error} ({where})", where))
            continue
        if checked["caption"] is None:
            if not config.allow_missing_caption:
                listing.rejected.append(Problem(str(audio_path), "source", f"{missing} ({where})", where))
                continue
            listing.warnings.append(Problem(str(audio_path), "source", f"{missing} ({where}); empty caption used", where))
            checked["caption"] = ""
        warn_row(listing, str(audio_path), where, notes)
        explicit_key = clean_optional(row.get("key"))
        if explicit_key is not None:
            stem = str(explicit_key)
        else:
            stem = str(Path(audio).with_suffix("")) if not Path(audio).is_absolute() else audio_path.stem
        entries.append(Entry(stem, Record(key="", audio=str(audio_path), extra=extra, row=where, **checked),
                             str(audio_path), explicit=explicit_key is not None))
    add_entries(listing, entries, config)
    return listing
