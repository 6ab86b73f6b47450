"""Connecting to a Ray cluster, or starting an embedded one on this machine."""

from __future__ import annotations

import os

# One OpenMP thread per worker process: Ray already runs a worker per CPU, and oversubscribed
# threads make CPU work many times slower.
EMBEDDED_WORKER_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def init_ray(address: str | None, dashboard: bool = False) -> bool:
    """Connect to ``address`` (or RAY_ADDRESS), else start an embedded cluster. True if we started it.

    ``dashboard``: the embedded cluster runs the dashboard (loopback only), whose state API Ray Train
    polls to watch its controller; prep does not need it and saves its CPU."""
    import ray

    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=True)
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # an embedded cluster needs no token file
    ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1", object_store_memory=512 * 1024**2,
             runtime_env={"env_vars": EMBEDDED_WORKER_ENV})
    return True
