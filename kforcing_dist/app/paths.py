"""The files and folders a command writes, checked before its work starts.

A run folder under a file, an output file that is a folder or a read-only location would
otherwise fail minutes (or hours) later as an ``OSError`` traceback; here each one is an
:class:`~kforcing_dist.errors.OutputPathError` (exit 2) naming the path, the problem and the fix.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..errors import OutputPathError

RUN_FOLDER = "the run folder (-o / output_dir)"


def _nearest_existing(path: Path) -> Path:
    return next(p for p in path.parents if p.exists())


def output_folder(path, what: str) -> Path:
    """Create the folder ``path`` (and its parents) and prove a file can be written in it.
    ``what`` names it for the user, e.g. "the run folder (-o)"."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{what} {folder} is a file, not a folder; give a folder path "
                              f"(or move the file away)")
    if not folder.exists():
        above = _nearest_existing(folder)
        if not above.is_dir():
            raise OutputPathError(f"{what} {folder} lies under {above}, which is a file: no folder "
                                  f"can be made there; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise OutputPathError(f"{what} {folder} cannot be created or written ({exc.strerror}); "
                              f"choose a writable location") from None
    return folder


def check_output_file(path, what: str) -> Path:
    """Refuse an output file that cannot be created: a folder, or a missing / non-folder parent.
    (Permissions show when it is opened: :func:`open_output_file`.)"""
    file = Path(path)
    if file.is_dir():
        raise OutputPathError(f"{what} {file} is a folder; give a file path, e.g. {file / 'out.jsonl'}")
    parent = file.parent
    if not parent.exists():
        raise OutputPathError(f"{what} {file}: the folder {parent} does not exist; create it "
                              f"(mkdir -p {parent}) or write elsewhere")
    if not parent.is_dir():
        raise OutputPathError(f"{what} {file}: {parent} is a file, not a folder; choose another path")
    return file


def open_output_file(path, what: str):
    """``open(path, "w")`` after :func:`check_output_file`, with OSError as OutputPathError."""
    file = check_output_file(path, what)
    try:
        return open(file, "w")
    except OSError as exc:
        raise OutputPathError(f"{what} {file} cannot be written ({exc.strerror}); choose a "
                              f"writable location") from None
