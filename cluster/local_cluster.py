"""Start or stop a local multi-node Ray cluster: several raylets on this machine, for tests and
for trying `--address` without real nodes.

    python cluster/local_cluster.py start --nodes 2 --port 6390 --temp-dir /tmp/acedist-cluster
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/tmp/acedist-cluster/auth_token
    acedist prep SONGS --model M --out OUT --address 127.0.0.1:6390
    python cluster/local_cluster.py kill-node --node 1 --temp-dir /tmp/acedist-cluster   # a node lost
    python cluster/local_cluster.py rejoin --node 1 --temp-dir /tmp/acedist-cluster      # ... and back
    python cluster/local_cluster.py stop --temp-dir /tmp/acedist-cluster

Token authentication is on: the nodes use RAY_AUTH_TOKEN from the environment when it is set,
else a random token that `start` writes to TEMP_DIR/auth_token (mode 600); every client needs
RAY_AUTH_MODE=token and that token (the export line above).

Each node runs `ray start --block` in its own process group, so `stop` ends exactly this
cluster's processes (never `ray stop`, which kills every Ray process of the host). Node i gets the
custom resource `node{i}` so work can be pinned or checked per node.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

STATE = "local_cluster.json"


TOKEN_FILE = "auth_token"


def _token_in_environment() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"))


def cluster_env(temp_dir: Path | None = None) -> dict[str, str]:
    """The environment of the cluster's processes and of its clients: token authentication with the
    environment's RAY_AUTH_TOKEN, else the token file of the cluster in ``temp_dir``."""
    env = dict(os.environ)
    if not _token_in_environment():
        if temp_dir is None:
            raise ValueError("no RAY_AUTH_TOKEN in the environment: give the cluster's temp dir (its token file)")
        env["RAY_AUTH_TOKEN_PATH"] = str(temp_dir / TOKEN_FILE)
    env.update(
        RAY_AUTH_MODE="token",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",  # Ray calls several raylets on one host a "Windows/OSX cluster"
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
    )
    env.pop("RAY_ADDRESS", None)
    return env


def _ray_executable() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def start(nodes: int, port: int, temp_dir: Path, cpus_per_node: int, object_store_mb: int, timeout: float = 90.0,
          dashboard_port: int | None = None) -> str:
    """Start the cluster; its GCS address. ``dashboard_port``: the head also runs the dashboard with
    its job API (`ray job submit --address http://127.0.0.1:PORT`), on loopback."""
    temp_dir.mkdir(parents=True, exist_ok=True)
    token = temp_dir / TOKEN_FILE
    if not (_token_in_environment() or token.exists()):
        token.touch(mode=0o600)
        token.write_text(secrets.token_hex(32))
    address = f"127.0.0.1:{port}"
    state = {"address": address, "port": port, "cpus_per_node": cpus_per_node, "object_store_mb": object_store_mb,
             "dashboard_port": dashboard_port, "pids": []}
    for index in range(nodes):
        _start_node(temp_dir, state, index)
        if index == 0:
            _wait_for_nodes(address, 1, timeout, temp_dir)
    _wait_for_nodes(address, nodes, timeout, temp_dir)
    return address


def _start_node(temp_dir: Path, state: dict, index: int) -> None:
    """Start node ``index`` (0: the head) as `ray start --block` in a process group of its own, and
    record its PID in the cluster's state file (a node started again replaces its old PID)."""
    address = state["address"]
    if index == 0:
        command = [_ray_executable(), "start", "--head", "--port", str(state["port"]), "--node-ip-address", "127.0.0.1",
                   "--temp-dir", str(temp_dir)]
        dashboard_port = state["dashboard_port"]
        command += (["--include-dashboard=true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port)]
                    if dashboard_port else ["--include-dashboard=false"])
    else:
        command = [_ray_executable(), "start", "--address", address, "--node-ip-address", "127.0.0.1"]
    # each node's dashboard agent (the job API's executor) on a port of its own: Ray's default
    # (52365) is taken by any other Ray instance on this machine, and then jobs find no agent
    command += ["--block", "--num-cpus", str(state["cpus_per_node"]),
                "--object-store-memory", str(state["object_store_mb"] * 1024**2), "--disable-usage-stats",
                "--resources", json.dumps({f"node{index}": 1}), "--dashboard-agent-listen-port", str(_free_port())]
    log = open(temp_dir / f"node{index}.log", "a")
    process = subprocess.Popen(command, env=cluster_env(temp_dir), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    pids = state["pids"]
    pids[index:index + 1] = [process.pid]
    (temp_dir / STATE).write_text(json.dumps(state))


def _state(temp_dir: Path) -> dict:
    path = temp_dir / STATE
    if not path.exists():
        raise FileNotFoundError(f"no local cluster in {temp_dir} (no {STATE})")
    return json.loads(path.read_text())


def _processes_of(root: int) -> dict[int, str]:
    """PID -> command line of process ``root`` and its live descendants: a node's processes (Ray
    starts the node's workers in process groups of their own, so the group does not find them)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        stat = _stat(int(entry.name)) if entry.name.isdigit() else None
        if stat and stat[0] != "Z":
            parents[int(entry.name)] = stat[1]
    found, frontier = set(), {root} & parents.keys()
    while frontier:
        found |= frontier
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
    return {pid: _command(pid) for pid in found}


def _node_pid(state: dict, index: int) -> int:
    """The PID of node ``index``'s `ray start --block`."""
    if not 0 <= index < len(state["pids"]):
        raise RuntimeError(f"no node {index}: the cluster's nodes are 0-{len(state['pids']) - 1}")
    return state["pids"][index]


def node_processes(temp_dir: Path, index: int) -> dict[int, str]:
    """PID -> command line of node ``index``'s processes (its workers show as ``ray::Class.method``)."""
    return _processes_of(_node_pid(_state(temp_dir), index))


def kill_raylet(temp_dir: Path, index: int, timeout: float = 60.0) -> int:
    """SIGKILL node ``index``'s raylet, as when its machine dies; wait until the rest of that node
    (its `ray start --block`, which ends the node's other processes when the raylet is gone, and
    the workers, which end when their raylet does) has ended. The raylet's PID."""
    processes = node_processes(temp_dir, index)
    raylets = [pid for pid, command in processes.items() if command.split(" ")[0].endswith("/raylet")]
    if len(raylets) != 1:
        raise RuntimeError(f"node {index}: expected one raylet among its processes, found {raylets}")
    os.kill(raylets[0], signal.SIGKILL)
    deadline = time.time() + timeout
    while time.time() < deadline and any(_alive(pid) for pid in processes):
        time.sleep(0.5)
    for pid, command in processes.items():  # stragglers (a worker blocked in a call) go the same way
        if _alive(pid) and _command(pid) == command:  # (not a process that has since taken an ended one's PID)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return raylets[0]


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent PID) of a process; None once it has ended."""
    try:
        # the fields after the parenthesised command name: state, ppid, ...
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def rejoin(temp_dir: Path, index: int, timeout: float = 90.0) -> None:
    """Start node ``index`` again (after `kill_raylet`): a new raylet with the same resources joins
    the head, as a replaced machine does; wait until the cluster has all its nodes alive again."""
    state = _state(temp_dir)
    if _alive(_node_pid(state, index)):
        raise RuntimeError(f"node {index} is running (kill it first: kill-node --node {index})")
    _start_node(temp_dir, state, index)
    _wait_for_nodes(state["address"], len(state["pids"]), timeout, temp_dir)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_nodes(address: str, count: int, timeout: float, temp_dir: Path) -> None:
    deadline = time.time() + timeout
    probe = (f"import ray; ray.init(address='{address}', logging_level='ERROR'); "
             f"print(sum(1 for n in ray.nodes() if n['Alive']))")
    while time.time() < deadline:
        result = subprocess.run([sys.executable, "-c", probe], env=cluster_env(temp_dir), capture_output=True, text=True, timeout=60)
        if result.returncode == 0 and result.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(1.0)
    raise RuntimeError(f"the local cluster at {address} did not reach {count} live nodes in {timeout:.0f} s")


def stop(temp_dir: Path) -> None:
    state_path = temp_dir / STATE
    if not state_path.exists():
        return
    pids = json.loads(state_path.read_text())["pids"]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in reversed(pids):
            try:
                os.killpg(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(2.0 if sig == signal.SIGTERM else 0)
    state_path.unlink(missing_ok=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("start")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--port", type=int, default=6390)
    up.add_argument("--cpus-per-node", type=int, default=1)
    up.add_argument("--object-store-mb", type=int, default=300)
    up.add_argument("--dashboard-port", type=int, help="run the dashboard and its job API on 127.0.0.1:PORT")
    up.add_argument("--temp-dir", type=Path, required=True)
    down = sub.add_parser("stop")
    down.add_argument("--temp-dir", type=Path, required=True)
    lose = sub.add_parser("kill-node", help="SIGKILL a worker node's raylet (a node lost)")
    back = sub.add_parser("rejoin", help="start a killed node again")
    for command in (lose, back):
        command.add_argument("--temp-dir", type=Path, required=True)
        command.add_argument("--node", type=int, required=True, help="the node's index (1, 2, ...; 0 is the head)")
    args = parser.parse_args(argv)
    if args.action == "start":
        print(start(args.nodes, args.port, args.temp_dir, args.cpus_per_node, args.object_store_mb,
                    dashboard_port=args.dashboard_port))
        if not _token_in_environment():
            print(f"clients: export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={args.temp_dir / TOKEN_FILE}", file=sys.stderr)
    elif args.action in ("kill-node", "rejoin"):
        if args.node == 0:
            parser.error("node 0 is the head: losing it ends the cluster (use stop)")
        try:
            if args.action == "kill-node":
                print(f"killed node {args.node}'s raylet (pid {kill_raylet(args.temp_dir, args.node)})")
            else:
                rejoin(args.temp_dir, args.node)
        except (OSError, RuntimeError) as error:
            print(f"local_cluster: {error}", file=sys.stderr)
            return 1
    else:
        stop(args.temp_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
