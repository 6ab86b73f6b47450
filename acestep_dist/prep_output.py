"""The ``--out`` folder of ``acedist prep``: one run at a time, and only prep's own files touched.

Ownership. Prep lists every file it writes in its state file (``prep_state.json``) *before* writing
it: shards, markers, their temporaries, the manifest and reports. It deletes or replaces only files
that list names, and only names of its own exact patterns (``shard-000000.tar``, ``.json``,
``.tar.tmp``, ...), so a file it did not write is never touched, whatever it is called. A non-empty
folder without a state file is not a prep output: prep refuses it, or with ``--overwrite`` writes
beside what is there; a file there named like one of prep's own (which prep would replace) is
refused even then.

Lock. A run holds ``.acedist-prep.lock`` in the folder for its whole length; a second run on the
same folder stops with an error naming the holder. Local folders use ``filelock.SoftFileLock``: the
lock file records the holder's pid, host and process start, and a lock whose holder is dead on this
host is stale and taken over. A holder on another host cannot be probed from here, so the error
names it and says which file to delete once that run is known to be gone. On fsspec URLs (object
stores) the lock is a lease object: JSON with host, pid, a token and an expiry, created with
exclusive creation where the store offers it (else written and read back), renewed every minute,
and stale once 10 minutes past its last renewal or when its holder is dead on this host. Without
exclusive creation two runs starting within the same moment can both pass; that is as far as an
object store lets a lock go.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import threading
import time
from typing import Any, Callable, Iterable

from .errors import UserError

STATE_FILE = "prep_state.json"
LOCK_FILE = ".acedist-prep.lock"
# audio a Hugging Face dataset stores inside itself, written once by content hash and reused by
# reruns; prep never deletes it
SOURCE_AUDIO_DIR = "source_audio"
STATE_VERSION = 2  # 2: the state lists the files prep wrote
# Everything prep writes into --out; it deletes or replaces nothing else.
OWN_NAME = re.compile(
    r"(?:shard-(?P<index>\d{6})\.(?:tar|json)|manifest\.jsonl|errors\.jsonl|warnings\.jsonl|prep_report\.json)(?:\.tmp)?"
)
LEASE_SECONDS = 600.0
RENEW_SECONDS = 60.0


class OutputInUse(UserError):
    """Another prep run holds the output folder."""


def is_own_name(name: str) -> bool:
    return OWN_NAME.fullmatch(name) is not None


def shard_index(name: str) -> int | None:
    """The index of a shard, marker or their temporary named ``name``; None for other names."""
    match = OWN_NAME.fullmatch(name)
    return int(match["index"]) if match and match["index"] is not None else None


# ------------------------------------------------------------------------------------------ lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class _LocalLock:
    def __init__(self, path: str, out: str):
        from filelock import SoftFileLock

        self.path, self.out = path, out
        self.lock = SoftFileLock(path)

    def acquire(self) -> None:
        from filelock import Timeout

        try:
            self.lock.acquire(blocking=False)  # takes over a lock whose holder died on this host
        except Timeout:
            raise OutputInUse(f"{self.out} is in use by another acedist prep ({self._holder()}); wait for it to "
                              f"finish, or choose another --out (if that run is gone, delete {self.path})") from None

    def _holder(self) -> str:
        try:
            with open(self.path, encoding="utf-8") as f:
                pid, host = f.read().splitlines()[:2]  # filelock's record: pid, host, process start
            return f"pid {int(pid)} on {host}"
        except (OSError, ValueError):
            return "holder unknown"

    def release(self) -> None:
        self.lock.release()


class _Lease:
    """A lock object on an object store: a JSON lease renewed by a background thread."""

    def __init__(self, fs, path: str, out: str):
        self.fs, self.path, self.out = fs, path, out
        self.token = secrets.token_hex(16)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _record(self) -> bytes:
        now = time.time()
        return json.dumps({"host": self.host, "pid": self.pid, "token": self.token, "renewed": now,
                           "expires": now + LEASE_SECONDS}).encode()

    def _read(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):
            return {}  # unreadable: treated as stale below

    def _stale(self, holder: dict) -> bool:
        if not isinstance(holder.get("expires"), (int, float)) or holder["expires"] < time.time():
            return True
        return holder.get("host") == self.host and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"])

    def _refuse(self, holder: dict) -> OutputInUse:
        remaining = max(0, int(holder.get("expires", 0) - time.time()))
        return OutputInUse(f"{self.out} is in use by another acedist prep (pid {holder.get('pid')} on "
                           f"{holder.get('host')}; its lease expires in {remaining} s unless renewed); wait for it to "
                           f"finish, or choose another --out (if that run is gone, delete {self.path})")

    def acquire(self) -> None:
        holder = self._read()
        if holder is not None:
            if not self._stale(holder):
                raise self._refuse(holder)
            self.fs.rm_file(self.path)
        try:
            with self.fs.open(self.path, "xb") as f:  # exclusive creation where the store offers it
                f.write(self._record())
        except FileExistsError:
            raise self._refuse(self._read() or {}) from None
        except (ValueError, NotImplementedError):  # no exclusive creation here: write, then read back
            self.fs.pipe_file(self.path, self._record())
            time.sleep(1.0)  # a racing writer's record lands within this
        holder = self._read() or {}
        if holder.get("token") != self.token:
            raise self._refuse(holder)
        self._renewer = threading.Thread(target=self._renew, name="acedist-prep-lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_SECONDS):
            try:
                if (self._read() or {}).get("token") != self.token:
                    return  # taken over after an expiry: nothing of ours left to renew
                self.fs.pipe_file(self.path, self._record())
            except Exception:  # a storage hiccup; the next renewal tries again
                continue

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            if (self._read() or {}).get("token") == self.token:
                self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass


class OutputLock:
    """Exclusive use of an output folder for one run (context manager)."""

    def __init__(self, fs, root: str, out: str):
        from fsspec.implementations.local import LocalFileSystem

        path = f"{root}/{LOCK_FILE}"
        local = "://" not in out and isinstance(fs, LocalFileSystem)
        self._lock = _LocalLock(path, out) if local else _Lease(fs, path, out)

    def __enter__(self) -> "OutputLock":
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


# ----------------------------------------------------------------------------------------- state
class OutputFolder:
    """The files prep wrote in ``--out``, as its state file lists them."""

    def __init__(self, fs, root: str, out: str, log: Callable[[str], None] = print):
        self.fs, self.root, self.out, self.log = fs, root, out, log
        self.state: dict[str, Any] | None = None  # None: no usable state file (not a prep output)
        self.files: set[str] = set()
        state_path = f"{root}/{STATE_FILE}"
        if fs.exists(state_path):
            try:
                with fs.open(state_path, "r") as f:
                    state = json.load(f)
            except (ValueError, UnicodeDecodeError):
                state = None
            if isinstance(state, dict) and state.get("state_version") == STATE_VERSION and isinstance(state.get("files"), list):
                self.state = state
                self.files = {name for name in state["files"] if isinstance(name, str) and is_own_name(name)}

    def _names(self) -> list[str]:
        """Names in the folder, but the lock (and filelock's own files beside it)."""
        return sorted(
            name for name in (path.rstrip("/").rsplit("/", 1)[-1] for path in self.fs.ls(self.root, detail=False))
            if not (name == LOCK_FILE or name.startswith(LOCK_FILE + "."))
        )

    def check_ownership(self, overwrite: bool) -> None:
        """Refuse a folder that is not a prep output (unless ``overwrite``) and, always, files named like
        prep's own that its state does not list: prep would replace them."""
        names = self._names()
        ours = self.files | ({STATE_FILE, STATE_FILE + ".tmp", SOURCE_AUDIO_DIR} if self.state is not None else set())
        others = [name for name in names if name not in ours]
        if self.state is None and names and not overwrite:
            what = "an `acedist prep` output of an older version that did not record its files" \
                if STATE_FILE in names else "not an `acedist prep` output"
            raise UserError(f"{self.out} is {what} and is not empty ({_sample(names)}); choose an empty or new "
                            f"--out, or pass --overwrite to write beside those files (prep never deletes them)")
        clashing = [name for name in others if is_own_name(name)]
        if clashing:
            raise UserError(f"{self.out} holds {_sample(clashing)}, named like prep's own files but not written by "
                            f"this prep (its {STATE_FILE} does not list them); prep would replace them: move them "
                            f"away or choose another --out")
        if others:
            self.log(f"prep: leaving alone {len(others)} file(s) in {self.out} that prep did not write: {_sample(others)}")

    def check_family(self, identity: dict[str, Any], overwrite: bool) -> None:
        """One output holds one family's samples, of one schema version: refuse another's, unless
        it is to be replaced."""
        if self.state is None or overwrite:
            return
        from .families import LEGACY_FAMILY, LEGACY_SCHEMA_VERSION

        family = self.state.get("family", LEGACY_FAMILY)
        version = self.state.get("schema_version", LEGACY_SCHEMA_VERSION)
        if family != identity["family"]:
            raise UserError(f"{self.out} holds samples of the model family {family}, this model is "
                            f"{identity['family']}: one output holds one family; choose a new --out, or pass "
                            f"--overwrite to replace them")
        if version != identity["schema_version"]:
            raise UserError(f"{self.out} holds {family} samples of schema version {version}, this acedist writes "
                            f"version {identity['schema_version']}; pass --overwrite to rewrite them")

    def check_fingerprint(self, fingerprint: str, overwrite: bool) -> None:
        """Refuse output made with another model or prep config, unless it is to be replaced."""
        previous = self.state.get("fingerprint") if self.state is not None else None
        if self.state is not None and previous != fingerprint and not overwrite:
            raise UserError(
                f"{self.out} holds shards made with another model or prep config (fingerprint {previous} != "
                f"{fingerprint}); pass --overwrite to replace them, or choose a new --out")

    def start(self, fingerprint: str, overwrite: bool, about: dict[str, Any]) -> None:
        """Keep the output of the same fingerprint (a resume); remove another's with ``overwrite``."""
        self.check_fingerprint(fingerprint, overwrite)
        if self.state is not None and self.state.get("fingerprint") != fingerprint:
            self.remove(sorted(self.files))
        self.state = {"state_version": STATE_VERSION, "fingerprint": fingerprint, **about, "files": []}
        self._save()

    def claim(self, *names: str) -> None:
        """Record names before their files are written, so even a killed run's leftovers are known."""
        new = [name for name in names if name not in self.files]
        for name in new:
            if not is_own_name(name):
                raise ValueError(f"{name!r} is not one of prep's file names")
        if new:
            self.files.update(new)
            self._save()

    def remove(self, names: Iterable[str]) -> None:
        """Delete listed files (never a name the state does not list)."""
        for name in names:
            if name not in self.files:
                raise ValueError(f"{name!r} was not written by this prep")
            path = f"{self.root}/{name}"
            if self.fs.exists(path):
                self.fs.rm(path)
            self.files.discard(name)
        if self.state is not None:
            self._save()

    def remove_leftovers(self, shards: int) -> None:
        """Temporaries of a killed run, and shards beyond the plan (the source shrank)."""
        stale = [name for name in self.files
                 if name.endswith(".tmp") or (shard_index(name) is not None and shard_index(name) >= shards)]
        if stale:
            self.remove(sorted(stale))

    def _save(self) -> None:
        self.state["files"] = sorted(self.files)
        path = f"{self.root}/{STATE_FILE}"
        with self.fs.open(path + ".tmp", "w") as f:
            json.dump(self.state, f, indent=1)
        self.fs.mv(path + ".tmp", path)


def _sample(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
