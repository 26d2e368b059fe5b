"""Checkpoint folders: atomic ``step-XXXXXXXX/`` directories with a completion marker.

A save goes into a hidden temporary folder, is renamed to its final name, and only then is
the ``COMPLETE`` marker written (atomically). A folder without the marker - a crash during the
save, a half-copied folder - is never taken for a checkpoint. Keeps the newest N.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from ..errors import CheckpointError

MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def list_complete(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_RE.match(child.name)
        if m and child.is_dir() and is_complete(child):
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_complete(root: Path) -> Path | None:
    found = list_complete(root)
    return found[-1][1] if found else None


def temp_dir_for(root: Path, step: int) -> Path:
    """The temporary folder a save of ``step`` writes into (same filesystem, so rename is atomic)."""
    return root / f".tmp-{step_dir_name(step)}"


def begin_save(root: Path, step: int) -> Path:
    """Create (fresh) the temporary folder for a save; called on one rank."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_for(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def finish_save(root: Path, step: int, info: dict) -> Path:
    """Rename the temporary folder into place and mark it complete; called on one rank."""
    tmp = temp_dir_for(root, step)
    final = root / step_dir_name(step)
    if final.exists():  # a stale incomplete (or superseded) folder of the same step
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_json_atomic(final / MARKER, {"step": step, "time": time.time(), **info})
    return final


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints and any stale temporaries."""
    removed = []
    complete = list_complete(root)
    for _, path in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    for child in root.iterdir() if root.is_dir() else []:
        if child.name.startswith(".tmp-step-"):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed
