"""What every source returns: records to prepare, inputs rejected before any decoding, warnings."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..config import PrepConfig
from ..errors import UserError
from ..records import Record

AUDIO_EXTENSIONS = {
    ".wav", ".wave", ".flac", ".aif", ".aiff", ".aifc", ".alac", ".mp3", ".ogg", ".oga", ".opus",
    ".m4a", ".mp4", ".aac", ".wma", ".w64", ".caf",
}


@dataclass
class Problem:
    """One line of errors.jsonl / warnings.jsonl: which input, at which stage, why."""

    input: str
    stage: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"input": self.input, "stage": self.stage, "reason": self.reason}


@dataclass
class SourceListing:
    records: list[Record] = field(default_factory=list)
    rejected: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)


class SourceError(UserError):
    """A source that cannot be read at all (as opposed to one bad row, which is rejected)."""


_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-/]+")


def make_key(relative_stem: str) -> str:
    """A WebDataset-safe key: no dots (WebDataset splits a name at its first dot), no '..', no
    leading '/', so keys map to plain tar member names."""
    key = _KEY_CHARS.sub("_", relative_stem.replace("\\", "/")).strip("/")
    key = "/".join(part for part in key.split("/") if part not in ("", "_"))
    return key or "sample"


def unique_keys(stems: list[str]) -> list[str]:
    """Keys for sorted inputs; a collision (``a.mp3`` and ``a.wav``) gets a numeric suffix."""
    seen: dict[str, int] = {}
    keys = []
    for stem in stems:
        key = make_key(stem)
        if key in seen:
            seen[key] += 1
            key = f"{key}_{seen[key]}"
        else:
            seen[key] = 0
        keys.append(key)
    return keys


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{path.name} is not UTF-8 text") from None


def clean_optional(value: Any) -> Any:
    """Empty strings, NaN (pandas/CSV) and None all mean 'unknown'."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return value


def apply_text_limits(record: Record, config: PrepConfig, where: str, warnings: list[Problem]) -> Record:
    """Truncate over-long captions and lyrics, with a warning naming the limit."""
    changes: dict[str, Any] = {}
    if len(record.caption) > config.caption_max_chars:
        warnings.append(Problem(where, "source", f"caption longer than limit ({len(record.caption)} > "
                                f"{config.caption_max_chars} chars); truncated to {config.caption_max_chars}"))
        changes["caption"] = record.caption[: config.caption_max_chars]
    if record.lyrics and len(record.lyrics) > config.lyrics_max_chars:
        warnings.append(Problem(where, "source", f"lyrics longer than limit ({len(record.lyrics)} > "
                                f"{config.lyrics_max_chars} chars); truncated to {config.lyrics_max_chars}"))
        changes["lyrics"] = record.lyrics[: config.lyrics_max_chars]
    return record.with_(**changes) if changes else record


def metadata_fields(row: dict[str, Any], key_means_keyscale: bool = False) -> dict[str, Any]:
    """bpm / keyscale / timesignature / language from a metadata row, tolerant of common spellings.

    ``key`` is the sample id in manifests and datasets; only sidecar metadata tables may use it
    for the musical key (``key_means_keyscale``)."""
    def first(*names):
        for name in names:
            if name in row and clean_optional(row[name]) is not None:
                return clean_optional(row[name])
        return None

    bpm = first("bpm", "tempo")
    try:
        bpm = None if bpm is None else int(round(float(bpm)))
    except (TypeError, ValueError):
        bpm = None
    timesignature = first("timesignature", "time_signature", "timesig")
    if timesignature is not None:
        timesignature = str(timesignature).split("/")[0].strip()  # "3/4" -> "3", as ACE-Step writes it
        if timesignature.endswith(".0"):
            timesignature = timesignature[:-2]
    language = first("language", "vocal_language", "lang")
    return {
        "bpm": bpm if bpm and bpm > 0 else None,
        "keyscale": first("keyscale", "key_scale", *(("key",) if key_means_keyscale else ())),
        "timesignature": timesignature,
        "language": None if language is None else str(language),
    }


def find_file(name: str, roots: Sequence[Path]) -> Path | None:
    """An absolute path as it is, a relative one under the first root that has it; None if absent."""
    candidate = Path(name).expanduser()
    for path in [candidate] if candidate.is_absolute() else [root / candidate for root in roots]:
        if path.is_file():
            return path.resolve()
    return None
