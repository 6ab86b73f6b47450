"""How many GPU workers per node a run gets when the user leaves ``--gpus-per-node`` to ``auto``:
the GPUs the nodes have, CPU only when no node has one."""

from __future__ import annotations

import os
from typing import Callable

from acestep_dist.errors import UserError

AUTO = "auto"


def parse_gpus_per_node(value: int | str) -> int | str:
    """``auto`` or a whole number >= 0 (the command line gives strings)."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise UserError(f"--gpus-per-node {value!r}: give a number of GPUs (0: train on CPU) or auto") from None
    if count < 0 or str(count) != str(value).strip():
        raise UserError(f"--gpus-per-node {value!r}: give a whole number >= 0 or auto")
    return count


def choose_gpus_per_node(requested: int | str, nodes: int, workers: int | None,
                         count: Callable[[], tuple[list[float], str]]) -> tuple[int, str]:
    """(GPU workers per node, why) for ``requested`` (a count, or ``auto``). ``count()`` gives the
    GPUs of each node that is up and a name for where they were counted; it is called for ``auto``
    only."""
    requested = parse_gpus_per_node(requested)
    if requested != AUTO:
        return requested, (f"{requested} GPU worker(s) per node, as asked" if requested else "on CPU, as asked")
    if workers is not None:
        return 0, "on CPU: --workers asks for CPU workers"
    gpus_by_node, where = count()
    with_gpus = sorted((int(g) for g in gpus_by_node if int(g) > 0), reverse=True)
    if not with_gpus:
        return 0, (f"on CPU: no GPU on {where} (give --gpus-per-node N if GPU nodes are still to start, "
                   f"e.g. on an autoscaling cluster)")
    if len(with_gpus) < nodes:
        raise UserError(f"--nodes {nodes}: {where} has {len(with_gpus)} node(s) with GPUs up; give --gpus-per-node N "
                        f"to wait for an autoscaler to start more, or ask for fewer --nodes")
    per_node = min(with_gpus[:nodes])
    counts = ", ".join(str(g) for g in with_gpus[:nodes])
    note = f" (the fewest of the {nodes} nodes' {counts})" if len(set(with_gpus[:nodes])) > 1 else ""
    return per_node, f"{per_node} GPU worker(s) per node on {nodes} node(s): the GPUs of {where}{note}"


def visible_gpus(address: str | None, connect: Callable[[], object], local_only: bool) -> tuple[list[float], str]:
    """The GPUs of each live node, and a name for where they were counted. An embedded cluster (no
    address) is this machine: torch counts its GPUs without starting Ray. A cluster's nodes are
    read from Ray after ``connect()`` (kept for the run). ``local_only``: never connect (dry runs)."""
    if address or os.environ.get("RAY_ADDRESS"):
        if local_only:
            return _local_gpus(), "this machine (a dry run does not connect to the cluster)"
        import ray

        connect()
        return [node["Resources"].get("GPU", 0.0) for node in ray.nodes() if node["Alive"]], "the cluster's live nodes"
    return _local_gpus(), "this machine"


def _local_gpus() -> list[float]:
    import torch

    return [float(torch.cuda.device_count())]
