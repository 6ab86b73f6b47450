"""Fault injection for the tests that prove resume and restart: one variable, read once.

``ACEDIST_FAULT`` holds JSON ``{"point": NAME, "when": {FIELD: VALUE, ...}, "action": "stall" | "kill",
"delay": SECONDS}``. ``point(NAME, **fields)`` stalls (sleeps an hour, for a test to SIGKILL the
process at a known point) or SIGKILLs its own process after ``delay`` seconds, when every ``when``
field equals the given one. Without the variable ``point`` returns at once (one environment
lookup), so a normal run has no path that sleeps or kills. Training forwards this variable (and no other of ours) to Ray workers.

Points: ``prep.before_shard`` (shards_written), ``train.micro_step`` (step, micro, rank, first_step),
``train.after_step`` (step, rank).
"""

from __future__ import annotations

import json
import os
import signal
import time

VARIABLE = "ACEDIST_FAULT"


def point(name: str, **fields) -> None:
    raw = os.environ.get(VARIABLE)
    if not raw:
        return
    fault = json.loads(raw)
    if fault.get("point") != name or any(fields.get(key) != value for key, value in fault.get("when", {}).items()):
        return
    time.sleep(float(fault.get("delay", 0)))
    if fault.get("action") == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(3600)


def environment() -> dict[str, str]:
    """The variable, for a worker's environment (empty when no fault is set)."""
    return {VARIABLE: os.environ[VARIABLE]} if os.environ.get(VARIABLE) else {}


def spec(point_name: str, action: str = "stall", delay: float = 0.0, **when) -> str:
    """The variable's value for a fault (tests build it with this)."""
    return json.dumps({"point": point_name, "when": when, "action": action, "delay": delay})
