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
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..config import PrepConfig
from ..records import Record
from .base import Problem, SourceError, SourceListing, apply_text_limits, clean_optional, metadata_fields, unique_keys

FORMATS = ("manifest", "diffsynth", "acestep-json")


def read_rows(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of a .jsonl, .csv, or .json (a list, or an object with ``samples``) file, and the
    object's top-level ``metadata`` (the dataset builder's settings; empty when there is none)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise SourceError(f"{path}: cannot read: {error}") from None
    try:
        if path.suffix.lower() == ".csv":
            return list(csv.DictReader(text.splitlines())), {}
        if path.suffix.lower() == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()], {}
        data = json.loads(text)
    except (json.JSONDecodeError, csv.Error) as error:
        raise SourceError(f"{path}: not valid {path.suffix.lstrip('.').upper()}: {error}") from None
    if isinstance(data, dict) and isinstance(data.get("samples"), list):
        metadata = data.get("metadata", {})
        if not isinstance(metadata, dict):
            raise SourceError(f"{path}: 'metadata' must be an object, not {type(metadata).__name__}")
        return data["samples"], metadata
    if isinstance(data, list):
        return data, {}
    raise SourceError(f"{path}: expected a list of rows or an object with 'samples'")


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

    def prompt(self, row: dict[str, Any], picked_for_genre: bool) -> tuple[str, str, tuple[str, ...]]:
        """(caption, "caption" or "genre", alternative captions) for one sample; ValueError names a bad field."""
        override = clean_optional(row.get("prompt_override"))
        if override is not None and override not in PROMPT_OVERRIDES:
            raise ValueError(f"prompt_override must be 'caption', 'genre' or null; got {override!r}")
        tag = clean_optional(row.get("custom_tag"))
        if tag is not None and not isinstance(tag, str):
            raise ValueError(f"custom_tag must be text; got {tag!r}")
        tag = tag or self.custom_tag
        use = override or ("genre" if picked_for_genre else "caption")
        text = str(clean_optional(row.get(use)) or "")
        caption = self.tagged(text, tag)
        # not upstream's (its builder has no alternative captions): ours get the trigger word too, so
        # the caption of every epoch carries it; "replace" makes them all the caption, so none are left
        alts = dict.fromkeys(self.tagged(alt, tag) for alt in _alt_captions(row.get("alt_captions")))
        return caption, use, tuple(alt for alt in alts if alt != caption)


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
    rows, dataset_metadata = read_rows(path)
    if not rows:
        raise SourceError(f"{path}: no rows")
    format = format or detect_format(rows, path)
    if format not in FORMATS:
        raise SourceError(f"unknown metadata format {format!r}; known: {', '.join(FORMATS)}")
    audio_column = "audio_path" if format == "acestep-json" else "audio"
    builder = BuilderPrompts.from_metadata(dataset_metadata, path) if format == "acestep-json" else None
    genre_rows = builder.genre_rows(rows) if builder else set()
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
        alt_captions = _alt_captions(row.get("alt_captions"))
        extra = {}
        missing = "missing caption"
        if builder is not None:
            try:
                caption, prompt_from, alt_captions = builder.prompt(row, index in genre_rows)
            except ValueError as error:
                listing.rejected.append(Problem(str(audio_path), "source", f"{error} ({where})"))
                continue
            caption = caption or None
            if prompt_from == "genre":
                extra["prompt_from"] = "genre"
                missing = "missing genre (the prompt for this sample) and no custom_tag"
        if caption is None:
            if not config.allow_missing_caption:
                listing.rejected.append(Problem(str(audio_path), "source", f"{missing} ({where})"))
                continue
            listing.warnings.append(Problem(str(audio_path), "source", f"{missing} ({where}); empty caption used"))
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
        entries.append((stem, Record(
            key="", audio=str(audio_path), caption=str(caption or ""), lyrics=None if lyrics is None else str(lyrics),
            repeat=repeat, alt_captions=alt_captions, extra=extra, **metadata_fields(row),
        ), where))
    for (stem, record, where), key in zip(entries, unique_keys([e[0] for e in entries])):
        listing.records.append(apply_text_limits(record.with_(key=key), config, where, listing.warnings))
    return listing
