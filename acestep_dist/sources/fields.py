"""Every text and metadata field of a source row, checked and put in the one form the prompt uses.

Every source (folder metadata tables, manifests, DiffSynth, the ACE-Step dataset JSON, Hugging Face
and upstream datasets) passes its row's values through ``check_fields`` before a record exists, so
no later stage sees a number where text belongs (one such value used to fail a whole text-encoder
batch) and nothing is dropped or changed without a warning naming the row and the field:

- ``caption``, ``lyrics``: text, or the row is rejected (dropping them would train on the wrong
  prompt); text with control characters (binary data) is rejected too.
- ``bpm``: a number, rounded to a whole bpm as the prompt writes it, within ACE-Step's 30-300;
  anything else is dropped (the prompt says ``N/A``).
- ``keyscale``: a note A-G, an optional accidental (``#``, ``b``, ``♯``, ``♭``) and ``major`` /
  ``minor`` (also spelled ``maj`` / ``min`` / ``m``, any case), written as ACE-Step writes it
  (``F# minor``); anything else is dropped (``N/A``).
- ``timesignature``: beats per bar, as ACE-Step's prompt gives them (``3/4`` and ``6/8`` read as
  3 and 6). Upstream labels only 2, 3, 4 and 6; another whole number up to 16 (a 9/8 jig) is kept
  with a warning that the model may not know it; anything else is dropped (``N/A``).
- ``language``: an ISO 639-1 code ACE-Step 1.5 knows, or ``unknown``, any case; a regional code
  (``pt-BR``) becomes its language (``pt``) with a warning; anything else is dropped (the prompt
  says ``unknown``).
- ``repeat``: a whole number >= 1 (``2``, ``2.0``, ``"2"``), default 1; anything else (``1.7``,
  ``0``, ``"twice"``) rejects the row: the training weight the user asked for cannot be honoured.
- ``alt_captions``: a list of texts (or one text, or a JSON list in a CSV cell); items that are
  not text, or a value that is no list, are dropped with a warning.

Ranges and lists are upstream ACE-Step 1.5's (``acestep/constants.py``: ``VALID_LANGUAGES``,
``BPM_MIN`` / ``BPM_MAX``, ``VALID_TIME_SIGNATURES``, the keyscale notes and modes).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

BPM_MIN, BPM_MAX = 30, 300
TIME_SIGNATURES = ("2", "3", "4", "6")  # what upstream's labeller writes
MAX_BEATS = 16
UNKNOWN_LANGUAGE = "unknown"
LANGUAGES = frozenset((
    "ar", "az", "bg", "bn", "ca", "cs", "da", "de", "el", "en", "es", "fa", "fi", "fr", "he", "hi", "hr", "ht",
    "hu", "id", "is", "it", "ja", "ko", "la", "lt", "ms", "ne", "nl", "no", "pa", "pl", "pt", "ro", "ru", "sa",
    "sk", "sr", "sv", "sw", "ta", "te", "th", "tl", "tr", "uk", "ur", "vi", "yue", "zh", UNKNOWN_LANGUAGE,
))
_KEYSCALE = re.compile(r"^([A-Ga-g])\s*([#b♯♭]?)\s*(major|minor|maj|min|m)$", re.IGNORECASE)
# C0 controls other than tab / newline / carriage return, DEL and C1 controls: binary data, not text
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x0c\x0e-\x1f\x7f-\x9f]")


class RowRejected(ValueError):
    """A row that cannot become a record; the message is the reason."""


@dataclass
class RowNotes:
    """Warnings about one row's fields (reasons, each naming the field); the source turns them into
    problems naming the row."""

    notes: list[str] = field(default_factory=list)

    def dropped(self, name: str, value: Any, why: str, instead: str) -> None:
        self.notes.append(f"{name} {value!r} {why}; dropped (the prompt says {instead})")


def is_blank(value: Any) -> bool:
    """None, NaN (pandas / CSV), and empty or white-space text all mean 'not given'."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and not value.strip())


def check_text(name: str, value: Any) -> str | None:
    """A caption / lyrics value: stripped text, None when not given; RowRejected otherwise."""
    if is_blank(value):
        return None
    if not isinstance(value, str):
        raise RowRejected(f"{name} must be text; got {value!r} ({type(value).__name__})")
    if _CONTROL.search(value):
        raise RowRejected(f"{name} contains control characters (binary data?): {value[:40]!r}")
    return value.strip()


def _number(value: Any) -> float | None:
    """A finite number from a number or numeric text; None for anything else (booleans included)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def check_bpm(value: Any, notes: RowNotes) -> int | None:
    if is_blank(value):
        return None
    number = _number(value)
    if number is None:
        notes.dropped("bpm", value, "is not a number", "N/A")
        return None
    bpm = int(round(number))  # the prompt writes whole bpm (normalize_bpm)
    if not BPM_MIN <= bpm <= BPM_MAX:
        notes.dropped("bpm", value, f"is outside ACE-Step's range {BPM_MIN}-{BPM_MAX}", "N/A")
        return None
    return bpm


def check_keyscale(value: Any, notes: RowNotes) -> str | None:
    if is_blank(value):
        return None
    match = _KEYSCALE.match(value.strip()) if isinstance(value, str) else None
    if match is None:
        notes.dropped("keyscale", value, "is not a key ACE-Step knows (a note A-G, optional #/b, major/minor, "
                                         "e.g. 'C major', 'F# minor')", "N/A")
        return None
    note, accidental, mode = match.groups()
    accidental = accidental.replace("B", "b")
    return f"{note.upper()}{accidental} {'major' if mode.lower() in ('major', 'maj') else 'minor'}"


def check_timesignature(value: Any, notes: RowNotes) -> str | None:
    if is_blank(value):
        return None
    text = str(value).strip() if isinstance(value, (str, int, float)) and not isinstance(value, bool) else ""
    beats = text.split("/")[0].strip() if text.count("/") <= 1 else ""  # "3/4" -> "3", as ACE-Step writes it
    if beats.endswith(".0"):
        beats = beats[:-2]
    if not beats.isdecimal() or not 1 <= int(beats) <= MAX_BEATS:
        notes.dropped("timesignature", value, f"is not a time signature (beats per bar, 1-{MAX_BEATS}, or a "
                                              f"fraction such as 3/4 or 6/8)", "N/A")
        return None
    beats = str(int(beats))
    if beats not in TIME_SIGNATURES:
        notes.notes.append(f"timesignature {value!r} kept as {beats!r}, but ACE-Step's own labels use only "
                           f"{', '.join(TIME_SIGNATURES)} beats per bar: the model may not know it")
    return beats


def check_language(value: Any, notes: RowNotes) -> str | None:
    if is_blank(value):
        return None
    code = value.strip().lower() if isinstance(value, str) else ""
    if code in LANGUAGES:
        return code
    primary = re.split(r"[-_]", code)[0]
    if primary != code and primary in LANGUAGES:
        notes.notes.append(f"language {value!r} read as {primary!r} (ACE-Step knows languages, not regions)")
        return primary
    notes.dropped("language", value, "is not a language code ACE-Step knows (ISO 639-1, e.g. 'en', 'de', 'zh', "
                                     "or 'unknown')", "'unknown'")
    return None


def check_repeat(value: Any) -> int:
    if is_blank(value):
        return 1
    number = _number(value)
    if number is None or number != int(number) or number < 1:
        raise RowRejected(f"repeat must be a whole number >= 1 (the song's epoch multiplier); got {value!r}")
    return int(number)


def check_alt_captions(value: Any, notes: RowNotes) -> tuple[str, ...]:
    if is_blank(value):
        return ()
    if isinstance(value, str):
        try:  # a JSON list in a CSV cell
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        value = parsed if isinstance(parsed, list) else [value]
    if not isinstance(value, (list, tuple)):
        notes.notes.append(f"alt_captions {value!r} is not a list of texts; dropped")
        return ()
    found = []
    for item in value:
        if is_blank(item):
            continue
        if not isinstance(item, str) or _CONTROL.search(item):
            notes.notes.append(f"alt_captions item {item!r} is not text; dropped")
            continue
        found.append(item.strip())
    return tuple(found)


_METADATA_NAMES = {
    "bpm": ("bpm", "tempo"),
    "keyscale": ("keyscale", "key_scale"),
    "timesignature": ("timesignature", "time_signature", "timesig"),
    "language": ("language", "vocal_language", "lang"),
}


def metadata_values(row: dict[str, Any], key_means_keyscale: bool = False) -> dict[str, Any]:
    """The raw bpm / keyscale / timesignature / language of a row, under any of their common names.

    ``key`` is the sample id in manifests and datasets; only sidecar metadata tables may use it
    for the musical key (``key_means_keyscale``)."""
    values = {}
    for name, spellings in _METADATA_NAMES.items():
        if name == "keyscale" and key_means_keyscale:
            spellings = spellings + ("key",)
        values[name] = next((row[s] for s in spellings if s in row and not is_blank(row[s])), None)
    return values


def check_fields(values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Record fields from a row's raw ``values`` (any of caption, lyrics, bpm, keyscale, timesignature,
    language, repeat, alt_captions), and warnings each naming its field. RowRejected when the row
    cannot be used."""
    notes = RowNotes()
    checked: dict[str, Any] = {}
    for name in ("caption", "lyrics"):
        if name in values:
            checked[name] = check_text(name, values[name])
    if "repeat" in values:
        checked["repeat"] = check_repeat(values["repeat"])
    if "bpm" in values:
        checked["bpm"] = check_bpm(values["bpm"], notes)
    if "keyscale" in values:
        checked["keyscale"] = check_keyscale(values["keyscale"], notes)
    if "timesignature" in values:
        checked["timesignature"] = check_timesignature(values["timesignature"], notes)
    if "language" in values:
        checked["language"] = check_language(values["language"], notes)
    if "alt_captions" in values:
        checked["alt_captions"] = check_alt_captions(values["alt_captions"], notes)
    return checked, notes.notes
