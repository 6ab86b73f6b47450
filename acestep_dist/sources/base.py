"""What every source returns: records to prepare, inputs rejected before any decoding, warnings.

A source listing has one entry per row of the source: a row is one audio file of a folder, one
line of a JSONL / CSV manifest, one sample of a JSON list, one row of a dataset. Each entry is a
record or a rejection, and names its row (``Record.row`` / ``Problem.row``), so a report can count
rows even when several rows name the same audio file. The one exception is an upstream ACE-Step v1
dataset, whose identical rows are repeats of one song: they are one entry (``repeat`` = their count)
whose row names the first of them.
"""

from __future__ import annotations

import codecs
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..config import PrepConfig
from ..errors import UserError
from ..records import Record
from .fields import is_blank

AUDIO_EXTENSIONS = {
    ".wav", ".wave", ".flac", ".aif", ".aiff", ".aifc", ".alac", ".mp3", ".ogg", ".oga", ".opus",
    ".m4a", ".mp4", ".aac", ".wma", ".w64", ".caf",
}


@dataclass
class Problem:
    """One line of errors.jsonl / warnings.jsonl: which input, at which stage, why; ``row``: the
    source row it concerns (empty for a problem with a whole file)."""

    input: str
    stage: str
    reason: str
    row: str = ""

    def to_dict(self) -> dict[str, str]:
        data = {"input": self.input, "stage": self.stage, "reason": self.reason}
        if self.row:
            data["row"] = self.row
        return data


@dataclass
class SourceListing:
    records: list[Record] = field(default_factory=list)
    rejected: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)


class SourceError(UserError):
    """A source that cannot be read at all (as opposed to one bad row, which is rejected)."""


# ---- keys

def make_key(relative_stem: str) -> str:
    """A WebDataset-safe key: no dots (WebDataset splits a member name at its first dot), no '..',
    no leading '/', no '__' (prep names a song's segments KEY__seg000, so a key never spells one).
    Letters and digits of any script are kept (NFC): ``歌`` stays ``歌``, ``café`` stays ``café``;
    tar member names are UTF-8. Every other character becomes '_'."""
    text = unicodedata.normalize("NFC", relative_stem.replace("\\", "/"))
    text = "".join(c if c in "-/" or unicodedata.category(c)[0] in "LMN" else "_" for c in text)
    text = re.sub(r"_+", "_", text)
    key = "/".join(part.strip("_") for part in text.split("/") if part.strip("_"))
    return key or "sample"


def assign_keys(stems: Sequence[str]) -> list[str]:
    """Keys for inputs in order, unique by construction: the first input with a stem's key gets it,
    later ones get ``KEY_1``, ``KEY_2``, ... skipping any suffixed key that another input's stem
    already makes (``dup.flac``, ``dup.wav``, ``dup_1.wav`` -> ``dup``, ``dup_2``, ``dup_1``)."""
    bases = [make_key(stem) for stem in stems]
    reserved = set(bases)
    taken: set[str] = set()
    next_suffix: dict[str, int] = {}
    keys = []
    for base in bases:
        key = base
        if key in taken:
            n = next_suffix.get(base, 1)
            while f"{base}_{n}" in reserved or f"{base}_{n}" in taken:
                n += 1
            next_suffix[base] = n + 1
            key = f"{base}_{n}"
        taken.add(key)
        keys.append(key)
    return keys


@dataclass
class Entry:
    """A row that became a record, before its key is assigned."""

    stem: str  # what its key is made from
    record: Record  # with ``row`` set
    input: str  # what problems about it name
    explicit: bool = False  # ``stem`` is a key the source gave (warned about when it has to change)


def add_entries(listing: SourceListing, entries: list[Entry], config: PrepConfig | None) -> None:
    """Assign unique keys (warning when a key the source gave had to change), apply text limits
    (unless ``config`` is None) and append the records."""
    for entry, key in zip(entries, assign_keys([e.stem for e in entries])):
        if entry.explicit and key != entry.stem:
            safe = make_key(entry.stem)
            why = "is already used by an earlier row" if key != safe else "is not a safe sample key"
            listing.warnings.append(Problem(entry.input, "source", f"key {entry.stem!r} {why}; this row's key is "
                                            f"{key!r} ({entry.record.row})", entry.record.row))
        record = entry.record.with_(key=key)
        if config is not None:
            record = apply_text_limits(record, config, entry.input, listing.warnings)
        listing.records.append(record)


def warn_row(listing: SourceListing, input: str, row: str, notes: Sequence[str]) -> None:
    listing.warnings.extend(Problem(input, "source", f"{note} ({row})", row) for note in notes)


# ---- text files

def read_table_text(path: Path, warnings: list["Problem"]) -> str:
    """The text of a metadata table or manifest; a legacy encoding is read with a warning naming
    the file, a file that is no text (or unreadable) stops the source."""
    try:
        text, legacy = decode_text(path.read_bytes(), path.name)
    except (OSError, ValueError) as error:
        raise SourceError(f"{path}: cannot read: {error}") from None
    if legacy:
        warnings.append(Problem(str(path), "source", f"{path} is not UTF-8; read as {legacy} (save it as UTF-8 to "
                                f"be sure of its characters)"))
    return text


def decode_text(data: bytes, name: str) -> tuple[str, str | None]:
    """(text, the legacy encoding it was in, or None) of a caption, lyrics or metadata file.

    UTF-8 (with or without BOM) and UTF-16 with a BOM are read as such; anything else is tried as
    Windows-1252 (what Notepad and Excel save as "ANSI" in Western locales; a superset of Latin-1's
    printable characters), which is accepted only if every byte is defined there and the text has
    no control characters. Bytes that are none of these raise ValueError with the reason."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        candidates = [("utf-16", None)]
    elif data.startswith(codecs.BOM_UTF8):
        candidates = [("utf-8-sig", None)]
    else:
        candidates = [("utf-8", None), ("cp1252", "Windows-1252")]
    for encoding, legacy in candidates:
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        if _BINARY.search(text):
            raise ValueError(f"{name} is not text (it holds control characters, e.g. byte "
                             f"{_BINARY.search(text).group()!r})")
        return text, legacy
    raise ValueError(f"{name} is not text in UTF-8, UTF-16 (with BOM) or Windows-1252; save it as UTF-8")


# C0 controls other than tab, newline, form feed and carriage return, and DEL: binary data
_BINARY = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


def read_text(path: Path, input: str, warnings: list[Problem], row: str = "") -> str:
    """A text file, decoded as ``decode_text`` says (a warning naming the file and its encoding
    when it was a legacy one). ValueError when it is not text."""
    text, legacy = decode_text(path.read_bytes(), path.name)
    if legacy:
        warnings.append(Problem(input, "source", f"{path} is not UTF-8; read as {legacy} (save it as UTF-8 to be "
                                f"sure of its characters)", row))
    return text


def clean_optional(value: Any) -> Any:
    """Empty strings, NaN (pandas/CSV) and None all mean 'unknown'."""
    if is_blank(value):
        return None
    return value.strip() if isinstance(value, str) else value


def apply_text_limits(record: Record, config: PrepConfig, where: str, warnings: list[Problem]) -> Record:
    """Truncate over-long captions and lyrics, with a warning naming the limit."""
    changes: dict[str, Any] = {}
    if len(record.caption) > config.caption_max_chars:
        warnings.append(Problem(where, "source", f"caption longer than limit ({len(record.caption)} > "
                                f"{config.caption_max_chars} chars); truncated to {config.caption_max_chars}",
                                record.row))
        changes["caption"] = record.caption[: config.caption_max_chars]
    if record.lyrics and len(record.lyrics) > config.lyrics_max_chars:
        warnings.append(Problem(where, "source", f"lyrics longer than limit ({len(record.lyrics)} > "
                                f"{config.lyrics_max_chars} chars); truncated to {config.lyrics_max_chars}",
                                record.row))
        changes["lyrics"] = record.lyrics[: config.lyrics_max_chars]
    return record.with_(**changes) if changes else record


# ---- audio paths

def find_file(name: str, roots: Sequence[Path]) -> Path | None:
    """An absolute path as it is, a relative one under the first root that has it; None if absent.
    For the user's own files (manifests), which may name audio anywhere."""
    candidate = Path(name).expanduser()
    for path in [candidate] if candidate.is_absolute() else [root / candidate for root in roots]:
        if path.is_file():
            return path.resolve()
    return None


class AudioNotFound(ValueError):
    """An audio path that names no file."""


OUTSIDE_HINT = ("a dataset's audio paths must stay inside its folders; if you trust it, convert it with "
                "`acedist convert SOURCE --out M.jsonl --allow-outside-paths` and prepare the manifest")


def find_dataset_file(name: str, roots: Sequence[Path], allow_outside: bool = False) -> Path:
    """A dataset's audio path (a dataset comes from elsewhere): relative paths resolve under the
    first root that has the file, and, unless ``allow_outside``, neither they (``../``) nor absolute
    paths may lead outside every root (a path written inside a root passes, so the user's own
    symlinks there still work). ValueError says which rule failed (``AudioNotFound``: no file)."""
    candidate = Path(name)
    if not allow_outside:
        inside = [root for root in roots if _within(candidate if candidate.is_absolute() else root / candidate, root)]
        if not inside:
            raise ValueError(f"audio path {name} leads outside {', '.join(str(r) for r in roots)}; {OUTSIDE_HINT}")
        roots = inside
    found = find_file(name, roots)
    if found is None:
        raise AudioNotFound(f"audio file not found: {name}")
    return found


def _within(path: Path, root: Path) -> bool:
    """``path`` as written (``..`` applied, links not followed), or the file it really is, lies in ``root``."""
    bases = {Path(os.path.abspath(root)), root.resolve()}
    return any(candidate.is_relative_to(base) for candidate in (Path(os.path.normpath(os.path.abspath(path))),
                                                                path.resolve()) for base in bases)
