"""Checkpoint folders: atomic ``step-XXXXXXXX/`` directories with a completion marker.

A save goes into a hidden temporary folder, is fsynced, renamed to its final name, and only then
is the ``COMPLETE`` marker written (atomically). A folder without the marker - a crash during the
save, a half-copied folder - is never taken for a checkpoint. Keeps the newest N. A save that
fails (a full disk) removes its temporary folder and says how much space it needed; the
temporaries a dead run left behind are removed when the next run starts (:func:`remove_leftovers`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from pathlib import Path

from ..errors import CheckpointError
from ..fsio import fsync_path, fsync_tree, human_bytes, tree_size, write_json_atomic

MARKER = "COMPLETE"
# what a failed or interrupted save / export leaves behind (see temp_dir_for and save_decoder)
TEMP_PREFIX = ".tmp-step-"
EXPORT_TEMP_PREFIXES = (".export.partial-", ".export.old-")
_STEP_RE = re.compile(r"^step-(\d{8})$")


class DamagedFile(Exception):
    """A file of a complete checkpoint cannot be read; the message names it and why."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def read_json(path: Path, required: tuple[str, ...] = ()) -> dict:
    """A checkpoint's JSON file (an object holding ``required`` keys), or DamagedFile."""
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise DamagedFile(f"{path.name} is missing") from None
    except (OSError, ValueError) as exc:
        raise DamagedFile(f"{path} is not readable JSON ({exc})") from None
    missing = [k for k in required if k not in obj] if isinstance(obj, dict) else list(required)
    if missing:
        raise DamagedFile(f"{path} lacks {', '.join(missing)}")
    return obj


def describe_engine_damage(engine_dir: Path, exc: BaseException) -> str:
    """Name the unreadable file of a DeepSpeed engine folder whose load raised ``exc``.

    Torch files are zip archives; a truncated or overwritten one has no readable central
    directory, which is cheap to check without loading any tensor."""
    import zipfile

    for path in sorted(p for p in engine_dir.rglob("*") if p.is_file()):
        try:
            with zipfile.ZipFile(path):
                pass
        except (zipfile.BadZipFile, OSError) as bad:
            return f"{path} cannot be read ({bad})"
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"DeepSpeed could not load {engine_dir} ({type(exc).__name__}: {first})"


def mark_damaged(folder: Path, reason: str) -> None:
    """Turn a complete checkpoint into an ignored one (``COMPLETE`` -> ``DAMAGED``), kept for
    inspection; a later save of the same step replaces the folder."""
    write_json_atomic(folder / "DAMAGED", {"reason": reason, "time": time.time()})
    (folder / MARKER).unlink(missing_ok=True)


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
    return root / f".tmp-{step_dir_name(step)}"  # starts with TEMP_PREFIX


def begin_save(root: Path, step: int) -> Path:
    """Create (fresh) the temporary folder for a save; called on one rank."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_for(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def finish_save(root: Path, step: int, info: dict) -> Path:
    """fsync, rename the temporary folder into place and mark it complete; called on one rank.

    Every file is fsynced before the rename: a marker that survives a machine crash must not
    point at files still in the page cache. One rank fsyncs all files: on one node the page
    cache is shared, and on a network file system every rank's close() already sent its data.
    """
    tmp = temp_dir_for(root, step)
    final = root / step_dir_name(step)
    fsync_tree(tmp)
    if final.exists():  # a stale incomplete (or superseded) folder of the same step
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(root)
    write_json_atomic(final / MARKER, {"step": step, "time": time.time(), **info})
    fsync_path(final)
    return final


def failed_save(root: Path, step: int, cause: BaseException | None) -> "CheckpointError":
    """Remove the temporary folder of a save that failed and describe the failure (called on one
    rank; ``cause`` None: it failed on another rank). The error says how much the save needed -
    the previous checkpoint's size, or what was written before it failed when that is more -
    and how much is free once the partial save is gone."""
    tmp, final = temp_dir_for(root, step), root / step_dir_name(step)
    written = tree_size(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    if final.is_dir() and not is_complete(final):  # renamed, but the marker could not be written
        written = max(written, tree_size(final))
        shutil.rmtree(final, ignore_errors=True)
    previous = latest_complete(root)
    needed = max(written, tree_size(previous) if previous is not None else 0)
    free = shutil.disk_usage(root).free
    reason = "it failed on another rank" if cause is None else _describe(cause)
    full = isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)
    if full or needed > free:
        reason, fix = f"not enough space: {reason}", "free space there or point -o/--output-dir at a larger disk"
    else:
        fix = "fix the cause"
    resume = f"resumes from {previous.name}" if previous is not None else "starts over"
    return CheckpointError(
        f"saving checkpoint {step_dir_name(step)} in {root} failed ({reason}); the save needs about "
        f"{human_bytes(needed)} ({human_bytes(written)} were written before it failed) and "
        f"{human_bytes(free)} are free there; the partial save was removed: {fix}, then rerun the "
        f"same command (it {resume})")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{os.strerror(exc.errno)}" + (f": {exc.filename}" if exc.filename else "")
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def remove_leftovers(run_dir: Path) -> list[tuple[Path, int]]:
    """Remove what dead runs left in a run folder: temporary checkpoint folders
    (``checkpoints/.tmp-step-*``) and temporary exports (``.export.partial-*``, ``.export.old-*``).
    Only safe while this run holds the run folder's lock. Returns (path, bytes) per removal."""
    candidates = [p for p in (run_dir / "checkpoints").glob(TEMP_PREFIX + "*")]
    candidates += [p for prefix in EXPORT_TEMP_PREFIXES for p in run_dir.glob(prefix + "*")]
    removed = []
    for path in sorted(candidates):
        size = tree_size(path)
        shutil.rmtree(path, ignore_errors=True)
        removed.append((path, size))
    return removed


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints and any stale temporaries."""
    removed = []
    complete = list_complete(root)
    for _, path in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    for child in root.iterdir() if root.is_dir() else []:
        if child.name.startswith(TEMP_PREFIX):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed
