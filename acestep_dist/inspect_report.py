"""`acedist inspect DIR`: verify every shard against its marker and the manifest (checksums, tensor
shapes, one sample per key, readable manifest lines), summarise the dataset, and write
``inspect_report.json`` and ``inspect_report.png`` into DIR."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .errors import EXIT_CORRUPT, EXIT_OK, UserError
from .shards import MANIFEST_FILE, ShardMarker, duplicate_keys, marker_schema, read_manifest, shard_name, verify_shard



def _spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    array = np.asarray(values, dtype=float)
    return {"min": float(array.min()), "median": float(np.median(array)), "mean": float(array.mean()),
            "max": float(array.max())}


def _plot(path_open, stats: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # histograms of duration, bpm and each length the schema measures (but frames: the duration's)
    panels = [("duration (s)", stats["_durations"]), ("bpm", stats["_bpms"])]
    panels += [(count.replace("_", " "), values) for count, values in stats["_counts"].items()]
    columns = (len(panels) + 2 + 1) // 2
    fig, axes = plt.subplots(2, columns, figsize=(4.7 * columns, 7), squeeze=False)
    for ax, (title, values) in zip(axes.flat, panels):
        ax.hist(values or [0], bins=min(30, max(5, len(values))), color="#4a7ab5")
        ax.set_title(title)
    for ax in list(axes.flat)[len(panels) + 2:]:
        ax.axis("off")
    for ax, (title, counter) in zip(list(axes.flat)[len(panels):], [("key", stats["keys"]), ("language", stats["languages"])]):
        items = counter.most_common(12) or [("none", 0)]
        ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="#b5794a")
        ax.set_title(title)
    fig.suptitle(f"{stats['samples']} samples, {stats['hours']:.3f} h")
    fig.tight_layout()
    with path_open() as f:
        fig.savefig(f, format="png", dpi=80)
    plt.close(fig)


@dataclass
class _MarkerSurvey:
    """What the readable markers say: their samples (verified against their shards), every key with
    where it sits, and which family's schema each shard follows."""

    samples: list[dict[str, Any]] = field(default_factory=list)
    manifest_keys: list[str] = field(default_factory=list)
    located: list[tuple[str, str]] = field(default_factory=list)  # (key, "shard-N.tar sample i") of every marker row
    schemas: dict[tuple[str, int], list[str]] = field(default_factory=dict)  # (family, schema version) -> its shards
    schema: Any = None  # the last readable marker's


def _read_and_verify_markers(fs, root: str, out: str, marker_paths: list[str],
                             problems: dict[str, list[str]]) -> _MarkerSurvey:
    survey = _MarkerSurvey()
    for path in marker_paths:
        name = path.rsplit("/", 1)[-1]
        try:
            with fs.open(path, "r") as f:
                marker = ShardMarker.from_json(f.read())
            survey.schema = marker_schema(marker, f"{out}/{name}")
        except UserError as error:
            problems[name] = [str(error)]
            continue
        except (ValueError, TypeError, KeyError) as error:
            problems[name] = [f"unreadable marker: {error}"]
            continue
        schema = survey.schema
        survey.schemas.setdefault((schema.family, schema.version), []).append(shard_name(marker.index))
        survey.manifest_keys += [row["key"] for row in marker.samples]
        survey.located += [(row["key"], f"{shard_name(marker.index)} sample {i}")
                           for i, row in enumerate(marker.samples)]
        check = verify_shard(fs, root, marker, schema)
        if check.problems:
            problems[check.shard] = check.problems
        survey.samples += check.samples
    return survey


def _check_families_and_keys(survey: _MarkerSurvey, problems: dict[str, list[str]]) -> None:
    if len(survey.schemas) > 1:
        problems["families"] = ["one output holds one family's samples; found " + "; ".join(
            f"{family} v{version} in {len(shards)} shard(s) (e.g. {shards[0]})"
            for (family, version), shards in survey.schemas.items())]
    # training keeps one sample per key: a second one would silently replace the first
    duplicated = duplicate_keys(survey.located)
    if duplicated:
        problems["duplicate keys"] = duplicated


def _check_manifest(fs, root: str, manifest_keys: list[str], problems: dict[str, list[str]]) -> None:
    manifest_path = f"{root}/{MANIFEST_FILE}"
    if not fs.exists(manifest_path):
        problems[MANIFEST_FILE] = ["missing (prep did not finish?)"]
        return
    rows, bad_lines = read_manifest(fs, manifest_path)
    listed = [row["key"] for _, row in rows]
    manifest_problems = bad_lines + duplicate_keys((row["key"], f"line {n}") for n, row in rows)
    if not bad_lines and sorted(listed) != sorted(manifest_keys):
        manifest_problems.append(f"lists {len(listed)} samples, the shard markers {len(manifest_keys)}")
    if manifest_problems:
        problems[MANIFEST_FILE] = manifest_problems


def _gather_statistics(survey: _MarkerSurvey, shard_count: int) -> dict[str, Any]:
    """The dataset's summary; keys starting with ``_`` hold the raw values for the plots only."""
    metas = [s["meta"] for s in survey.samples]
    stats: dict[str, Any] = {
        "samples": len(survey.samples),
        "shards": shard_count,
        "hours": sum(m["duration"] for m in metas) / 3600,
        "_durations": [m["duration"] for m in metas],
        "_bpms": [m["bpm"] for m in metas if m.get("bpm")],
        "_counts": _counts(survey.schema, metas),
        "keys": Counter(m.get("keyscale") or "unknown" for m in metas),
        "languages": Counter(m.get("language") or "unknown" for m in metas),
        "with_lyrics": sum(1 for m in metas if m.get("lyrics")),
        "caption_chars": _spread([len(m["caption"]) for m in metas]),
    }
    stats["duration"], stats["bpms"] = _spread(stats["_durations"]), _spread(stats["_bpms"])
    optional = _optional_counts(survey.schema)
    for count, values in stats["_counts"].items():
        stats[count] = _spread(values)
        if count in optional:  # an optional tensor's: how many samples hold it
            stats[count]["samples"] = len(values)
    if survey.schemas:
        stats["families"] = {f"{family} v{version}": len(shards)
                             for (family, version), shards in survey.schemas.items()}
    return stats


def _optional_counts(schema) -> set[str]:
    return {spec.length for spec in schema.tensors if spec.optional} if schema is not None else set()


def _counts(schema, metas: list[dict[str, Any]]) -> dict[str, list]:
    """Each count the schema measures (but frames: the duration's) over the samples that have it;
    an optional tensor's count only when some sample holds the tensor."""
    optional = _optional_counts(schema)
    counts = {}
    for count in (schema.counts if schema is not None else ()):
        values = [m[count] for m in metas if m.get(count) is not None]
        if count != "frames" and (values or count not in optional):
            counts[count] = values
    return counts


def _write_report(fs, root: str, stats: dict[str, Any], problems: dict[str, list[str]]) -> dict[str, Any]:
    """Write inspect_report.png and inspect_report.json; return the report (the JSON's content)."""
    _plot(lambda: fs.open(f"{root}/inspect_report.png", "wb"), stats)
    report = {k: (dict(v) if isinstance(v, Counter) else v) for k, v in stats.items() if not k.startswith("_")}
    report["problems"] = problems
    with fs.open(f"{root}/inspect_report.json", "w") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    return report


def _spread_line(label: str, spread: dict[str, float], unit: str = "") -> str:
    if not spread:
        return f"{label:<14} -"
    held = f"  ({spread['samples']} samples)" if "samples" in spread else ""
    return (f"{label:<14} min {spread['min']:.1f}{unit}  median {spread['median']:.1f}{unit}  "
            f"max {spread['max']:.1f}{unit}{held}")


def _print_summary(out: str, root: str, stats: dict[str, Any], report: dict[str, Any],
                   log: Callable[[str], None]) -> int:
    """Log the summary and every problem; return the exit code."""
    log(f"{out}: {stats['samples']} samples in {stats['shards']} shards, {stats['hours']:.3f} hours, "
        f"{stats['with_lyrics']} with lyrics")
    log(_spread_line("duration", report["duration"], " s"))
    log(_spread_line("bpm", report["bpms"]))
    for count in stats["_counts"]:
        log(_spread_line(count.replace("_", " "), report[count]))
    log(_spread_line("caption chars", report["caption_chars"]))
    log(f"{'keys':<14} " + ", ".join(f"{k} {v}" for k, v in stats["keys"].most_common(8)))
    log(f"{'languages':<14} " + ", ".join(f"{k} {v}" for k, v in stats["languages"].most_common(8)))
    log(f"report: {root}/inspect_report.json, plots: {root}/inspect_report.png")
    if report["problems"]:
        for shard, reasons in report["problems"].items():
            for reason in reasons:
                log(f"CORRUPT {shard}: {reason}")
        return EXIT_CORRUPT
    log("all shards verified")
    return EXIT_OK


def inspect_output(out: str, log: Callable[[str], None] = print) -> tuple[dict[str, Any], int]:
    from .storage import open_fs

    fs, root = open_fs(out)
    marker_paths = sorted(fs.glob(f"{root}/shard-*.json"))
    if not marker_paths:
        raise UserError(f"{out}: no shards (shard-*.json markers) found; is this an `acedist prep` output?")
    # every check adds its findings here, under the shard or file they concern, in the order found
    problems: dict[str, list[str]] = {}
    survey = _read_and_verify_markers(fs, root, out, marker_paths, problems)
    _check_families_and_keys(survey, problems)
    _check_manifest(fs, root, survey.manifest_keys, problems)
    stats = _gather_statistics(survey, len(marker_paths))
    report = _write_report(fs, root, stats, problems)
    return report, _print_summary(out, root, stats, report, log)
