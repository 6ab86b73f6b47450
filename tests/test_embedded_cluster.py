"""The embedded cluster acedist starts when no --address is given: token authentication on with a
token nobody else has, and every server it runs listening on the loopback interface only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Starts the embedded cluster as `acedist prep/train` do, reports what it listens on and its
# address, then waits until told to stop (so a second process can probe it).
SERVER = r"""
import json, os, sys
import psutil, ray
from acestep_dist.ray_cluster import init_ray
assert init_ray(None, dashboard=True)
node = ray._private.worker.global_worker.node
session = node.get_session_dir_path()
processes = [p for p in psutil.process_iter() if any(session in a for a in p.cmdline())] + [psutil.Process()]
listening = sorted({c.laddr.ip for p in processes for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN})
print(json.dumps({"mode": os.environ.get("RAY_AUTH_MODE"), "token_length": len(os.environ.get("RAY_AUTH_TOKEN", "")),
                  "gcs": node.gcs_address, "dashboard": node.webui_url, "nodes": [n["NodeManagerAddress"] for n in ray.nodes()],
                  "processes": len(processes), "listening": listening,
                  "home_token": os.path.exists(os.path.expanduser("~/.ray/auth_token"))}), flush=True)
sys.stdin.readline()
ray.shutdown()
"""

INTRUDER = r"""
import socket, sys, urllib.error, urllib.request
from ray._private.services import get_node_ip_address
try:  # the job API: what `ray job submit` would use to run code on the cluster
    urllib.request.urlopen(f"http://{sys.argv[2]}/api/jobs/", timeout=30)
    print("jobs listed")
except urllib.error.HTTPError as error:
    print("jobs refused", error.code)
# the GCS port through the machine's network address, as another machine would reach it
outside = get_node_ip_address()
port = int(sys.argv[1].rsplit(":", 1)[1])
try:
    socket.create_connection((outside, port), timeout=10).close()
    print("gcs reachable at", outside)
except ConnectionRefusedError:
    print("gcs unreachable at", outside)
"""


def test_the_embedded_cluster_takes_a_private_token_and_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    server = subprocess.Popen([sys.executable, "-c", SERVER], env=env, cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        report = json.loads(server.stdout.readline())
        assert report["mode"] == "token" and report["token_length"] == 64
        assert not report["home_token"]  # the token lives in the environment, no file in the user's home
        assert report["nodes"] == ["127.0.0.1"] and report["gcs"].startswith("127.0.0.1:")
        assert report["processes"] >= 3  # GCS, raylet, dashboard, ...: all of them checked
        assert set(report["listening"]) <= {"127.0.0.1", "::ffff:127.0.0.1"}, report["listening"]
        # without the cluster's token the job API refuses; through the network address the GCS port is closed
        intruder = dict(env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
        attempt = subprocess.run([sys.executable, "-c", INTRUDER, report["gcs"], report["dashboard"]], env=intruder,
                                 cwd=ROOT, capture_output=True, text=True, timeout=180)
        jobs, gcs = attempt.stdout.splitlines()
        assert jobs == "jobs refused 401", attempt.stderr[-2000:]
        assert gcs.startswith("gcs unreachable at ") and not gcs.endswith("127.0.0.1"), gcs
    finally:
        server.communicate("stop\n", timeout=120)
