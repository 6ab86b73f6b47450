"""`acedist inspect ANNOTATIONS.csv|.jsonl`: estimated against given values where a song has both,
the quality flags and near-duplicate groups, as a summary, ``NAME.review.json`` and a plot
``NAME.review.png`` beside the file.

Where the user gave a value, ``acedist annotate`` still records its own estimate (``bpm_estimate``;
with ``--all`` the user's value moves to ``bpm_given``), so every such song is a check of the
estimator on the user's own music, and every disagreement a value one of the two got wrong.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from ..errors import EXIT_OK, UserError
from .scores import ACCURACY_2, mirex_key_score, tempo_ratio
from .table import FIELDS

KEY_RELATIONS = {1.0: "same", 0.5: "fifth", 0.3: "relative", 0.2: "parallel", 0.0: "other"}


def read_annotations(path: Path) -> list[dict[str, Any]]:
    try:
        if path.suffix.lower() == ".csv":
            with open(path, encoding="utf-8", newline="") as f:
                rows = list(csv.DictReader(f))
        else:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as error:
        raise UserError(f"{path}: cannot read the annotations: {error}") from None
    if rows and not {"key", "bpm_estimate", "flags"} <= set(rows[0]):
        raise UserError(f"{path} is not an acedist annotate file (no key / bpm_estimate / flags columns)")
    return rows


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def given_and_estimated(row: dict[str, Any], name: str) -> tuple[str, str] | None:
    """The user's value and the estimate of ``name`` in one row, when it has both (as text)."""
    estimate = row.get(f"{name}_estimate")
    given = row.get(f"{name}_given")
    if _blank(given) and row.get(f"{name}_source") == "given":
        given = row.get(name)
    if _blank(given) or _blank(estimate):
        return None
    return str(given), str(estimate)


def compare(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per field, how the estimates agree with the given values; the flags; the duplicate groups."""
    report: dict[str, Any] = {"songs": len(rows), "not_analysed": sum(1 for r in rows if not _blank(r.get("error")))}
    pairs = {name: [(row["key"], *pair) for row in rows if (pair := given_and_estimated(row, name))] for name in FIELDS}
    tempo = [(key, float(given), float(estimate)) for key, given, estimate in pairs["bpm"]]
    ratios = Counter(tempo_ratio(estimate, given) for _, given, estimate in tempo)
    report["bpm"] = {"compared": len(tempo), "ratios": dict(ratios.most_common()),
                     "accuracy_2": sum(ratios[r] for r in ACCURACY_2) / len(tempo) if tempo else None,
                     "points": [[given, estimate] for _, given, estimate in tempo],
                     "disagree": [key for key, given, estimate in tempo if tempo_ratio(estimate, given) not in ACCURACY_2]}
    keys = []
    for key, given, estimate in pairs["keyscale"]:
        given, estimate = _key(given), _key(estimate)
        if given and estimate:
            keys.append((key, given, estimate, mirex_key_score(estimate, given)))
    report["keyscale"] = {"compared": len(keys),
                          "relations": dict(Counter(KEY_RELATIONS[score] for *_, score in keys).most_common()),
                          "mirex": sum(score for *_, score in keys) / len(keys) if keys else None,
                          "disagree": [key for key, _, _, score in keys if score < 1]}
    for name in ("timesignature", "language"):
        found = pairs[name]
        report[name] = {"compared": len(found), "agree": sum(g == e for _, g, e in found) / len(found) if found else None,
                        "confusions": dict(Counter(f"{g} -> {e}" for _, g, e in found if g != e).most_common()),
                        "disagree": [key for key, g, e in found if g != e]}
    flags = Counter()
    for row in rows:
        for flag in filter(None, (part.split(":", 1)[0].strip() for part in str(row.get("flags") or "").split("; "))):
            flags[flag] += 1
    report["flags"] = dict(flags.most_common())
    groups: dict[str, list[str]] = {}
    for row in rows:
        if not _blank(row.get("duplicate_group")):
            groups.setdefault(str(row["duplicate_group"]), []).append(row["key"])
    report["duplicate_groups"] = list(groups.values())
    return report


def _key(text: str) -> str | None:
    """A key as the prompt spells it ("F# minor"), or None for one ACE-Step does not know."""
    from ..sources.fields import RowNotes, check_keyscale

    return check_keyscale(text, RowNotes())


def _plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    points = report["bpm"]["points"]
    ax = axes[0]
    if points:
        given, estimated = zip(*points)
        ax.scatter(given, estimated, s=14, color="#4a7ab5")
        low, high = 30, 300
        for factor, style in ((1, "-"), (2, ":"), (0.5, ":"), (1.5, "--"), (2 / 3, "--")):
            ax.plot([low, high], [low * factor, high * factor], style, color="grey", linewidth=0.8)
        ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlim(low, high), ax.set_ylim(low, high)
    ax.set_xlabel("given bpm"), ax.set_ylabel("estimated bpm")
    ax.set_title(f"bpm ({report['bpm']['compared']} songs; lines x1, x2, x1/2, x3/2, x2/3)")
    for ax, (title, counts) in zip(axes[1:], (("key: estimate vs given", report["keyscale"]["relations"]),
                                              ("time signature: given -> estimated", report["timesignature"]["confusions"]),
                                              ("quality flags", report["flags"]))):
        items = list(counts.items())[:12] or [("none", 0)]
        ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="#b5794a")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=80)
    plt.close(fig)


def review_annotations(path: str | Path, log: Callable[[str], None] = print) -> tuple[dict[str, Any], int]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such annotations file")
    report = compare(read_annotations(path))
    stem = path.with_suffix("")
    (stem.parent / f"{stem.name}.review.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    _plot(stem.parent / f"{stem.name}.review.png", report)
    log(f"{path}: {report['songs']} songs ({report['not_analysed']} not analysed)")
    bpm, key = report["bpm"], report["keyscale"]
    if bpm["compared"]:
        log(f"  bpm: {bpm['compared']} given and estimated; within 4 % up to x2 / x3: {bpm['accuracy_2']:.0%}; "
            f"ratios {bpm['ratios']}")
    if key["compared"]:
        log(f"  key: {key['compared']} compared, MIREX score {key['mirex']:.2f}; {key['relations']}")
    for name in ("timesignature", "language"):
        if report[name]["compared"]:
            log(f"  {name}: {report[name]['compared']} compared, {report[name]['agree']:.0%} agree; "
                f"{report[name]['confusions'] or 'no disagreement'}")
    for name in FIELDS:
        if report[name]["disagree"]:
            log(f"  check {name}: {', '.join(report[name]['disagree'])}")
    log(f"  flags: {report['flags'] or 'none'}; near-duplicate groups: {len(report['duplicate_groups'])}")
    log(f"  wrote {stem.name}.review.json and {stem.name}.review.png beside it")
    return report, EXIT_OK
