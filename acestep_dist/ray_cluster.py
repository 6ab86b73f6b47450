"""Connecting to a Ray cluster, or starting an embedded one on this machine."""

from __future__ import annotations

import os

# One OpenMP thread per worker process: Ray already runs a worker per CPU, and oversubscribed
# threads make CPU work many times slower.
EMBEDDED_WORKER_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def init_ray(address: str | None, dashboard: bool = False, worker_env: dict[str, str] | None = None) -> bool:
    """Connect to ``address`` (or RAY_ADDRESS), else start an embedded cluster. True if we started it.

    ``dashboard``: the embedded cluster runs the dashboard (loopback only), whose state API Ray Train
    polls to watch its controller; prep does not need it and saves its CPU. ``worker_env``: variables
    every worker of the job needs (e.g. which model families to register), named by the caller."""
    import ray

    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=True,
                 runtime_env={"env_vars": dict(worker_env or {})})
        return False
    # The one place acedist sets RAY_AUTH_MODE: an embedded cluster lives and dies with this process,
    # listens on loopback only, and has no token file to read. Clusters a user deploys keep tokens on.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1", object_store_memory=512 * 1024**2,
             runtime_env={"env_vars": {**EMBEDDED_WORKER_ENV, **(worker_env or {})}})
    return True
