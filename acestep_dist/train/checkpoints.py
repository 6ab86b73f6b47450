"""Checkpoint integrity: the file list every rank writes into a checkpoint, its verification, and
the driver's choice of the newest intact checkpoint to resume from.

Each rank saves its own files into its own folder and Ray Train merges the ranks' folders into one
``checkpoint_*`` folder. So each rank lists what it wrote, with sha256 and size, in
``acedist_files.rank<R>.json``, written last in its folder: no barrier is needed, and a checkpoint
is intact when the list of every rank ``0 .. world_size - 1`` is there and every listed file
matches. A missing list (a rank's upload never finished) or a missing or changed file marks the
checkpoint damaged; `--resume` then falls back to the newest intact one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import UserError
from ..shards import file_sha256
from .layout import STATE_FILE, ema_files, weight_files

FILES_PREFIX = "acedist_files.rank"
CHECKPOINT_PREFIX = "checkpoint_"


def files_list_name(rank: int) -> str:
    return f"{FILES_PREFIX}{rank}.json"


def write_files_list(folder: Path, rank: int, world_size: int, step: int) -> None:
    """List every file this rank put into ``folder`` (its part of a checkpoint); call it last.

    Hashing costs one read of what the rank just wrote (about 1 GB/s per core): small beside a
    LoRA step, seconds per checkpoint for a full fine-tune's optimizer partition."""
    import fsspec

    local = fsspec.filesystem("file")
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith(FILES_PREFIX):
            digest, size = file_sha256(local, str(path))
            files[path.relative_to(folder).as_posix()] = {"sha256": digest, "bytes": size}
    listing = {"rank": rank, "world_size": world_size, "step": step, "files": files}
    (folder / files_list_name(rank)).write_text(json.dumps(listing, indent=1) + "\n")


def missing_weights(state: dict[str, Any], files: Iterable[str], checkpoint: bool = True) -> list[str]:
    """The trained weights a checkpoint (or, ``checkpoint`` false, ``final/``) of this run should hold
    and does not, given its files (paths relative to it; a listed folder counts when it holds a file)."""
    files = set(files)
    return [name for name in (*weight_files(state), *ema_files(state, checkpoint=checkpoint))
            if name not in files and not any(f.startswith(f"{name}/") for f in files)]


@dataclass
class CheckpointCheck:
    path: str
    step: int | None
    problems: list[str]
    world_size: int | None = None  # the number of workers that wrote it

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]


def verify_checkpoint(fs, path: str) -> CheckpointCheck:
    """Every rank's file list present and every listed file there with its size and sha256."""
    path = path.rstrip("/")
    listings: dict[int, dict[str, Any]] = {}
    problems: list[str] = []
    for list_path in sorted(fs.glob(f"{path}/{FILES_PREFIX}*.json")):
        try:
            with fs.open(list_path, "r") as f:
                listing = json.load(f)
            listings[int(listing["rank"])] = listing
        except (ValueError, KeyError, TypeError) as error:
            problems.append(f"{list_path.rsplit('/', 1)[-1]} unreadable ({error})")
    if 0 not in listings:
        problems.append(f"no file list {files_list_name(0)} (the checkpoint was not completely written)")
        return CheckpointCheck(path, None, problems)
    world, step = int(listings[0]["world_size"]), int(listings[0]["step"])
    absent = [rank for rank in range(world) if rank not in listings]
    if absent:
        problems.append(f"no file list of rank(s) {', '.join(map(str, absent))} of {world} "
                        f"(the checkpoint was not completely written)")
    files: dict[str, dict[str, Any]] = {}
    for rank in sorted(listings):
        files.update(listings[rank]["files"])
    if STATE_FILE not in files:
        problems.append(f"rank 0 listed no {STATE_FILE}")
    # sizes first: a missing file is found without hashing gigabytes of optimizer state
    for name, want in files.items():
        target = f"{path}/{name}"
        if not fs.exists(target):
            problems.append(f"{name} is missing")
        elif fs.size(target) != want["bytes"]:
            problems.append(f"{name} has {fs.size(target)} bytes, the file list says {want['bytes']}")
    if not problems:
        for name, want in files.items():
            if file_sha256(fs, f"{path}/{name}")[0] != want["sha256"]:
                problems.append(f"{name} changed since it was written (sha256 mismatch)")
    if not problems:
        with fs.open(f"{path}/{STATE_FILE}", "r") as f:
            state = json.load(f)
        problems += [f"{name} is missing" for name in missing_weights(state, files)]
    return CheckpointCheck(path, step, problems, world)


def list_checkpoints(fs, root: str) -> list[str]:
    """The run's checkpoint folders, newest first (Ray names them by the time they were reported)."""
    if not fs.exists(root):
        return []
    folders = [p for p in fs.glob(f"{root}/{CHECKPOINT_PREFIX}*") if fs.isdir(p)]
    return sorted(folders, key=lambda p: p.rstrip("/").rsplit("/", 1)[-1], reverse=True)


def choose_resume_checkpoint(fs, root: str, run: str, log: Callable[[str], None] = print) -> CheckpointCheck:
    """The newest intact checkpoint of the run; each newer damaged one is named in a warning."""
    damaged: list[CheckpointCheck] = []
    for path in list_checkpoints(fs, root):
        check = verify_checkpoint(fs, path)
        if not check.problems:
            if damaged:
                log(f"warning: resuming from {check.name} (step {check.step}), the newest intact checkpoint")
            return check
        damaged.append(check)
        log(f"warning: checkpoint {check.name} is damaged and skipped: {'; '.join(check.problems[:3])}")
    if not damaged:
        raise UserError(f"--resume: {run} holds no checkpoint to continue from")
    raise UserError(f"--resume: no intact checkpoint in {run} ("
                    + "; ".join(f"{c.name}: {c.problems[0]}" for c in damaged[:3])
                    + "); start a new run with another --output")
