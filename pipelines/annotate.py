"""`acedist annotate` as a Ray program: any source prep reads -> a reviewable annotations file.

Each song is decoded once, at its own rate, by a Ray task that runs every quality check, every
estimate and the fingerprint (``acestep_dist.annotate.analysis``); on one machine by default, on a
cluster with ``--address``. The driver groups near-duplicates from the fingerprints, merges given
and estimated values (``acestep_dist.annotate.table``) and writes the file in one piece. A file
that cannot be analysed keeps its row (its given values, and ``error`` saying why) and is listed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from acestep_dist.annotate.fingerprint import Fingerprint, near_duplicate_groups
from acestep_dist.annotate.table import FIELDS, MODES, annotation_row, check_out_path, write_table
from acestep_dist.config import PrepConfig
from acestep_dist.errors import EXIT_OK, EXIT_PARTIAL, UserError
from acestep_dist.paths import local_or_hub
from acestep_dist.ray_cluster import init_ray
from acestep_dist.sources import load_source

TASK_MEMORY = 768 * 1024**2  # ten minutes of 96 kHz stereo float and its analysis copies


@dataclass
class AnnotateResult:
    rows: list[dict[str, Any]]
    failed: list[tuple[str, str]]  # (input, reason): source rows rejected, files not analysed
    groups: list[list[str]] = field(default_factory=list)  # near-duplicate keys
    exit_code: int = EXIT_OK


def run_annotate(source: str, out: str | Path, config: PrepConfig | None = None, *, mode: str = "only-missing",
                 source_type: str | None = None, address: str | None = None, overwrite: bool = False,
                 log=print) -> AnnotateResult:
    """Annotate every song of ``source`` into ``out`` (``.csv`` or ``.jsonl``)."""
    started = time.time()
    if mode not in MODES:
        raise UserError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    out = Path(out).expanduser().resolve()  # on the driver: Ray's workers run in other directories
    try:
        check_out_path(out)
    except ValueError as error:
        raise UserError(str(error)) from None
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists (it may hold your edits); choose another --out, or --overwrite to replace it")
    config = config or PrepConfig(allow_missing_caption=True)
    # audio stored inside a dataset is written once beside the annotations: the rows name real files
    listing = load_source(local_or_hub(source), config, source_type, cache_dir=out.parent / f"{out.stem}_audio")
    failed = [(problem.input, problem.reason) for problem in listing.rejected]
    analysed = _analyse(listing.records, address)
    prints = {key: Fingerprint.from_dict(result["fingerprint"]) for key, result in analysed.items()
              if "fingerprint" in result}
    groups = near_duplicate_groups(prints)
    group_of = {key: group[0] for group in groups for key in group}
    rows = []
    for record in listing.records:
        result = analysed.get(record.key, {})
        error = result.get("error", "")
        if error:
            failed.append((record.audio, error))
        rows.append(annotation_row(record.key, record, None if error else result, mode,
                                   duplicate_group=group_of.get(record.key, ""), error=error))
    write_table(rows, out)
    _report(rows, failed, groups, out, time.time() - started, log)
    return AnnotateResult(rows, failed, groups, EXIT_PARTIAL if failed else EXIT_OK)


def _analyse(records, address: str | None) -> dict[str, dict[str, Any]]:
    """key -> the analysis (or ``{"error": reason}``) of every record, by Ray tasks."""
    if not records:
        return {}
    import ray

    from acestep_dist.annotate.analysis import analyse_row

    started_ray = init_ray(address)
    try:
        rows = [{"key": record.key, "record": json.dumps(record.to_dict())} for record in records]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
        results = dataset.map(analyse_row, num_cpus=1, memory=TASK_MEMORY).take_all()
    finally:
        if started_ray:
            ray.shutdown()
    return {row["key"]: {"error": row["error"]} if row.get("error") else json.loads(row["analysis"])
            for row in results}


def _report(rows, failed, groups, out: Path, seconds: float, log) -> None:
    estimated = {name: sum(1 for row in rows if row[f"{name}_source"] == "estimated") for name in FIELDS}
    flagged = [row for row in rows if row["flags"]]
    log(f"annotate: {len(rows)} songs in {seconds:.0f} s -> {out}")
    log("  estimated: " + ", ".join(f"{name} {count}" for name, count in estimated.items()))
    for row in flagged:
        log(f"  flagged {row['key']}: {row['flags']}")
    for group in groups:
        log(f"  near-duplicates: {' = '.join(group)}")
    for where, reason in failed:
        log(f"  not analysed {where}: {reason}")
    log("Review the file (values marked estimated, with their confidence), then prep it: "
        f"acedist prep {out} --model ...")
