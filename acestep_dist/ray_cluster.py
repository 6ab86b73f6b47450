"""Connecting to a Ray cluster, or starting an embedded one on this machine."""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager

# One OpenMP thread per worker process: Ray already runs a worker per CPU, and oversubscribed
# threads make CPU work many times slower.
EMBEDDED_WORKER_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
_CLUSTERS_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


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
    _embedded_auth()
    with _on_loopback():
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=dashboard,
                 dashboard_host="127.0.0.1", object_store_memory=512 * 1024**2,
                 runtime_env={"env_vars": {**EMBEDDED_WORKER_ENV, **(worker_env or {})}})
    return True


@contextmanager
def _on_loopback():
    """Every server of the embedded cluster (GCS, raylet, object manager, workers, dashboard) listens
    on 127.0.0.1 only. Ray on Linux replaces a loopback node address by the machine's and binds its
    gRPC servers there; it keeps loopback where "clusters" are disabled (its macOS/Windows default),
    a switch Ray reads from the environment at import, so the module's copy is set too. Restored
    after start-up: a later ``ray.init(address=...)`` of this process to a real cluster needs the
    machine's address."""
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(_CLUSTERS_SWITCH), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTERS_SWITCH] = "0"  # the cluster's own processes read it at their start
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_CLUSTERS_SWITCH, None)
        else:
            os.environ[_CLUSTERS_SWITCH] = saved_env


def _embedded_auth() -> None:
    """Token authentication for an embedded cluster, unless the environment already chose a mode.

    Ray turns token authentication on for the local clusters it starts when ``RAY_AUTH_MODE`` is
    unset; it would write a token to ~/.ray/auth_token for that. The token given here instead is
    random per process and lives only in this process's environment, which the cluster's processes
    inherit: nothing is written to the user's home, and nobody else can submit work to the cluster
    while it runs. ``RAY_AUTH_MODE`` (token with the user's own token, or disabled) is respected."""
    if os.environ.get("RAY_AUTH_MODE") or os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
