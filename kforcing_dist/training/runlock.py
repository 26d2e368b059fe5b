"""One run at a time per run folder: a lock file naming its holder (host, pid, command).

Two commands training into the same folder would interleave their logs and delete each other's
temporary checkpoints. ``train-teacher`` and ``distill`` take ``<folder>/.lock`` (the folder of
one stage: ``<run>/teacher``, ``<run>/k1``, ...; stages of one run are separate jobs) before they
touch anything in it, and remove it when they end, however they end.

The lock is a file created with ``os.open(O_CREAT | O_EXCL)``, not an ``fcntl.flock``: run
folders usually live on a cluster file system shared by many nodes, where exclusive creation is
atomic (NFSv3+, Lustre, GPFS) but flock is node-local or unsupported, so it would not stop a
second job on another node. The price is a file left behind by a process that died without
cleaning up (SIGKILL, a node crash). Such a lock is taken over, with a warning, when its holder
is provably gone: a process on this host that no longer runs (or whose pid now belongs to a
younger process), or an earlier run of this same Slurm job (a requeued job runs one incarnation
at a time). A lock held from another host is never guessed about: the message names it and
says how to remove it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path

from .checkpoint import CheckpointError

log = logging.getLogger("kforcing_dist")

LOCK_FILE = ".lock"


class RunFolderBusy(CheckpointError):
    """Another live run holds the run folder."""


def _process_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot, /proc/PID/stat field 22): with the
    pid it identifies a process even after the pid is reused. None where /proc is missing."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


class RunFolderLock:
    """``with RunFolderLock(folder, command, job=...):`` holds ``folder/.lock`` for the block.

    ``job``: the Slurm job id and restart count ({"id": ..., "restart": ...}) or None; the app
    reads them from the environment.
    """

    def __init__(self, folder: Path, command: str, job: dict | None = None):
        self.path = Path(folder) / LOCK_FILE
        self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                       "process_start": _process_start(os.getpid()), "command": command,
                       "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "job": job,
                       "token": uuid.uuid4().hex}
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # a few rounds only when stale locks are being taken over concurrently
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                reason = self._stale_reason(holder)
                if reason is None:
                    raise self._busy(holder) from None
                if self._remove_stale(holder):
                    log.warning("took over the lock on %s left by %s: %s", self.path.parent,
                                self._who(holder), reason)
                continue
            os.close(fd)
            self.held = True  # the exclusive creation is the lock; the record only names the holder
            self.write_record()
            return
        raise self._busy(self._read())

    def write_record(self) -> bool:
        """Write who holds the lock into it; False when that fails (a full disk: the lock is held
        all the same, and others see an unreadable lock, which they never take over). The app
        calls it again once the leftovers of dead runs are removed."""
        try:
            with open(self.path, "w") as f:
                json.dump(self.record, f)
                f.flush()
                os.fsync(f.fileno())
            return True
        except OSError:
            with contextlib.suppress(OSError):
                os.truncate(self.path, 0)  # empty, never half a record: see _is_empty
            return False

    def release(self) -> None:
        """Remove the lock if it is still this process's (never someone else's)."""
        if self.held:
            holder = self._read()
            mine = holder.get("token") == self.record["token"] if holder else self._is_empty()
            if mine:
                self.path.unlink(missing_ok=True)
        self.held = False

    def _is_empty(self) -> bool:
        """Our lock whose record could not be written (it held nothing else: an unreadable
        lock is never taken over)."""
        try:
            return self.path.stat().st_size == 0
        except OSError:
            return False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    # ---------------------------------------------------------------- holder
    def _read(self) -> dict | None:
        """The holder's record; None when unreadable (being written this instant, or garbage)."""
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _stale_reason(self, holder: dict | None) -> str | None:
        """Why the holder is certainly gone, or None when it may still run."""
        if holder is None:
            return None
        mine, theirs = self.record["job"], holder.get("job")
        if mine and theirs and mine.get("id") == theirs.get("id") \
                and int(theirs.get("restart") or 0) < int(mine.get("restart") or 0):
            return f"an earlier run of this Slurm job ({mine['id']}, restart {theirs.get('restart') or 0})"
        if holder.get("host") == self.record["host"] and isinstance(holder.get("pid"), int) \
                and not _alive(holder["pid"], holder.get("process_start")):
            return "that process no longer runs"
        return None

    def _remove_stale(self, holder: dict) -> bool:
        """Move the stale lock aside, then check that what was moved is the lock judged stale: a
        concurrent starter may have replaced it with its own live lock in between (put it back)."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = None
        if moved != holder:
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    @staticmethod
    def _who(holder: dict | None) -> str:
        if holder is None:
            return "an unknown process (the lock file is unreadable)"
        job = holder.get("job")
        return (f"`{holder.get('command')}` (host {holder.get('host')}, pid {holder.get('pid')}, "
                f"since {holder.get('since')}" + (f", Slurm job {job['id']}" if job else "") + ")")

    def _busy(self, holder: dict | None) -> RunFolderBusy:
        return RunFolderBusy(
            f"run folder {self.path.parent} is in use by {self._who(holder)}; wait for it to finish or stop "
            f"it, or use another -o/--output-dir; if no run uses the folder any more (it ran on "
            f"another host), delete {self.path}")
