"""Given and estimated values merged into the rows a person reviews, edits and hands to prep.

Each row is a canonical manifest row (``key``, ``audio``, ``caption``, ``lyrics``, ``bpm``,
``keyscale``, ``timesignature``, ``language``), so ``acedist prep annotations.csv`` reads it with
the same keys the source gave, and also a folder's ``metadata.csv`` row (``audio`` names the file).
Beside each of the four values: where it came from (``bpm_source``: ``given`` or ``estimated``);
the estimate, its confidence and a note saying why there is none or that it is a default (kept
even where the user's value stays, for review and for ``acedist inspect``'s comparison); and with
``--all`` the user's replaced value (``bpm_given``): a replaced value is never lost. Quality flags
and near-duplicate groups close the row.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from ..records import Record

FIELDS = ("bpm", "keyscale", "timesignature", "language")
MODES = ("only-missing", "all")
FORMATS = (".csv", ".jsonl")


def columns() -> list[str]:
    per_field = [f"{name}_{part}" for name in FIELDS for part in ("source", "estimate", "confidence", "note", "given")]
    return ["key", "audio", "caption", "lyrics", *FIELDS, *per_field, "seconds", "loudness_lufs", "flags",
            "duplicate_group", "error"]


def annotation_row(key: str, record: Record, analysis: dict[str, Any] | None, mode: str,
                   duplicate_group: str = "", error: str = "", audio: str | None = None) -> dict[str, Any]:
    """One output row. ``analysis``: ``analysis.analyse_wave``'s result (None when the file could not
    be analysed: the given values stay, ``error`` says why). ``audio``: the path to write (default:
    the record's)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    row: dict[str, Any] = {"key": key, "audio": audio or record.audio, "caption": record.caption,
                           "lyrics": record.lyrics}
    estimates = (analysis or {}).get("estimates", {})
    for name in FIELDS:
        given = getattr(record, name)
        estimate = estimates.get(name) or {}
        value = estimate.get("value")
        row[f"{name}_estimate"] = value
        row[f"{name}_confidence"] = estimate.get("confidence")
        row[f"{name}_note"] = estimate.get("note") or None  # why there is no estimate, or a default's reason
        row[f"{name}_given"] = None
        if given is not None and (mode == "only-missing" or value is None):
            row[name], row[f"{name}_source"] = given, "given"
        elif value is not None:
            row[name], row[f"{name}_source"] = value, "estimated"
            if given is not None and given != value:
                row[f"{name}_given"] = given  # --all replaced it: kept here
        else:
            row[name], row[f"{name}_source"] = None, None
    quality = (analysis or {}).get("quality", {})
    row["seconds"] = (analysis or {}).get("seconds")
    row["loudness_lufs"] = quality.get("loudness_lufs")
    flags = dict(quality.get("flags", {}))
    if duplicate_group:
        flags["near-duplicate"] = f"the same recording as the others of group {duplicate_group}"
    row["flags"] = "; ".join(f"{check}: {why}" for check, why in flags.items())
    row["duplicate_group"] = duplicate_group
    row["error"] = error
    return row


def check_out_path(path: Path) -> None:
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"{path}: the annotations file must end in {' or '.join(FORMATS)}")


def write_table(rows: Iterable[dict[str, Any]], path: Path) -> None:
    """CSV (blank for none) or JSONL (null), by ``path``'s suffix; written whole, then renamed in
    place, so an interrupted run leaves no half file."""
    check_out_path(path)
    rows = list(rows)
    if path.suffix.lower() == ".csv":
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=columns(), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({name: "" if row.get(name) is None else row[name] for name in columns()})
        text = buffer.getvalue()
    else:
        text = "".join(json.dumps({name: row.get(name) for name in columns()}, ensure_ascii=False) + "\n"
                       for row in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
