"""``acedist convert``: a Hugging Face dataset -> the canonical manifest ``acedist prep`` reads.

Two kinds of dataset (a ``save_to_disk`` folder or a hub id):

- one made by ACE-Step v1's upstream converter (detected by its columns): its repeated rows
  collapse into one record with ``repeat`` = their count, its recaptions become
  ``alt_captions`` (see ``sources/upstream.py``);
- any other, SimpleTuner-style: an Audio or path column, captions from the first non-empty of
  ``audio_caption_fields``, lyrics from ``lyrics_column`` (see ``sources/hf.py``). Audio stored
  inside the dataset is written once beside the manifest, in ``MANIFEST.audio/``.

A dataset comes from elsewhere, so its audio paths must stay inside ``--audio-root`` (or the
default folders): absolute paths and ``../`` leading out are refused unless ``--allow-outside-paths``.
Every row's texts and metadata are checked as ``sources/fields.py`` says, and keys are unique.

The manifest is one JSON object per song with absolute audio paths, so it can be moved, edited,
and merged with others before prep. ``MANIFEST.report.json`` says what was read and left out.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import PrepConfig
from .errors import EXIT_OK, EXIT_PARTIAL, UserError
from .records import Record
from .sources.base import Problem
from .sources.hf import list_hf_dataset, open_dataset
from .sources.upstream import is_upstream_dataset, read_upstream

# prep's convention

_METADATA_FIELDS = ("bpm", "keyscale", "timesignature", "language")


@dataclass
class ConvertResult:
    report: dict[str, Any]
    exit_code: int


def manifest_row(record: Record) -> dict[str, Any]:
    """The fields ``sources/manifest.py`` reads; unknown metadata is left out rather than null."""
    row = {"key": record.key, "audio": record.audio, "caption": record.caption,
           "alt_captions": list(record.alt_captions), "lyrics": record.lyrics, "repeat": record.repeat}
    row.update({name: getattr(record, name) for name in _METADATA_FIELDS if getattr(record, name) is not None})
    return row


def _write_atomically(path: Path, text: str) -> None:
    """A reader (or a killed run) never sees half a file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def write_manifest(records: list[Record], path: Path) -> None:
    _write_atomically(path, "".join(json.dumps(manifest_row(r), ensure_ascii=False) + "\n" for r in records))


def report_path(manifest: Path) -> Path:
    return manifest.with_name(manifest.name.removesuffix(".jsonl") + ".report.json")


def convert_dataset(source: str, out: str | Path, *, audio_root: str | Path | None = None, dedupe: bool = True,
                    allow_outside_paths: bool = False, config: PrepConfig | None = None,
                    log: Callable[[str], None] = print) -> ConvertResult:
    """Write the manifest (and its report) for ``source``. ``config`` supplies the generic-dataset
    settings (``audio_caption_fields``, ``lyrics_column``, ``audio_column``, ``dataset_split``).
    A dataset comes from elsewhere: its audio paths must stay inside ``audio_root`` (or the default
    folders) unless ``allow_outside_paths``."""
    config = config or PrepConfig()
    out = Path(out).expanduser().absolute()
    if out.suffix.lower() != ".jsonl":
        raise UserError(f"--out {out}: the manifest must be a .jsonl file")
    if audio_root is not None and not Path(audio_root).is_dir():
        raise UserError(f"--audio-root {audio_root} is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)

    dataset = open_dataset(source, config.dataset_split)
    if is_upstream_dataset(dataset.column_names):
        kind = "upstream"
        upstream = read_upstream(dataset, source, audio_root, dedupe, allow_outside_paths)
        records, rejected, warnings = upstream.records, upstream.unresolved, upstream.warnings
        rows, duplicates = upstream.rows, upstream.duplicates
    else:
        kind = "hf"
        listing = list_hf_dataset(source, config, out.with_name(out.stem + ".audio"), dataset=dataset,
                                  audio_root=audio_root, allow_outside=allow_outside_paths)
        records, rejected, warnings = listing.records, listing.rejected, listing.warnings
        rows, duplicates = len(dataset), 0

    report = {
        "source": str(source), "kind": kind, "manifest": str(out), "rows": rows, "records": len(records),
        "duplicates_collapsed": duplicates, "dedupe": dedupe if kind == "upstream" else None,
        "allow_outside_paths": allow_outside_paths,
        "rejected": [p.to_dict() for p in rejected], "warnings": [p.to_dict() for p in warnings],
    }
    _write_atomically(report_path(out), json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    collapsed = f", {duplicates} duplicate rows collapsed into repeat counts" if duplicates else ""
    log(f"convert: read {rows} rows of {source} ({kind}{collapsed})")
    _log_problems(rejected, "not converted", log)
    _log_problems(warnings, "warnings", log)
    if not records:
        raise UserError(f"{source}: no row could be converted (see {report_path(out)}); nothing written"
                        + ("; pass --audio-root, the folder the upstream converter ran in" if kind == "upstream" else ""))
    write_manifest(records, out)
    log(f"convert: wrote {len(records)} records to {out}")
    return ConvertResult(report, EXIT_PARTIAL if rejected else EXIT_OK)


def _log_problems(problems: list[Problem], title: str, log: Callable[[str], None]) -> None:
    if problems:
        log(f"convert: {len(problems)} {title}:")
        for problem in problems:
            log(f"  {problem.input}: {problem.reason}")
