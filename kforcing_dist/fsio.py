"""Durable, shareable files: fsync before a rename, permissions that follow the umask, sizes.

Checkpoints and exports are written to a temporary name and renamed into place. A rename is
only as durable as the data behind it, so every file (and the folders holding the names) is
fsynced first; otherwise a machine crash can leave a folder marked complete whose files are
empty. Some writers (safetensors) create their files with mode 0600; on a shared cluster the
result must be readable like any other file the user writes, so such files are re-moded to
what the process's umask gives a new file. Torch-free: the decoder and the trainer share it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable


def fsync_path(path: Path) -> None:
    """fsync one file or folder (a folder's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (and ``root`` itself), deepest first."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(temporary path)`` in the same folder, fsync, then rename:
    a reader sees the old file or the whole new one, never half of it (also after a crash)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_json_atomic(path: Path, obj, sort_keys: bool = True) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def current_umask() -> int:
    """This process's umask. Read from /proc where it exists, because the portable way
    (set it and set it back) briefly changes it for every thread of the process."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give every file under ``root`` mode 0666 and every folder 0777, less the umask: what a
    plain ``open``/``mkdir`` would have given them."""
    mask = current_umask()
    os.chmod(root, (0o777 if root.is_dir() else 0o666) & ~mask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(Path(folder) / name, 0o777 & ~mask)
        for name in files:
            os.chmod(Path(folder) / name, 0o666 & ~mask)


def tree_size(root: Path) -> int:
    """Bytes in the files under ``root`` (0 when it does not exist); files that vanish while
    it is counted are skipped."""
    if root.is_file():
        return root.stat().st_size
    total = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += (Path(folder) / name).lstat().st_size
            except OSError:
                pass
    return total


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
