"""The built-in corpus: English docstrings of the Python standard library and installed packages.

It needs no network: every machine that runs the trainer already has the text. The ``.py`` files
are parsed with :mod:`ast` (never imported), each module/class/function docstring is cleaned
(:func:`clean_docstring`), exact duplicates are dropped, and the documents are written to
``builtin_corpus.jsonl`` (one ``{"text": ...}`` per line) next to ``builtin_corpus.json`` (sha256,
size, document count, fingerprint of the inputs).

Determinism: files are visited in the order of a hash of their root-relative name (so the
gathered prefix mixes packages instead of being the alphabetically first ones), results are
consumed in that order whatever the number of worker processes, gathering stops at the first file
that brings the total to ``min_bytes``, and the documents are finally sorted by the hash of their
text so any contiguous train/valid split is spread over all packages. The same Python version and
installed distributions therefore give the same file, byte for byte.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.metadata
import inspect
import json
import logging
import multiprocessing
import os
import re
import sys
import sysconfig
import time
from pathlib import Path

from tqdm import tqdm

from ..fsio import write_json_atomic
from .errors import DataError

logger = logging.getLogger(__name__)

CORPUS_FILE = "builtin_corpus.jsonl"
CORPUS_META_FILE = "builtin_corpus.json"
# Bump whenever the cleaning or selection rules change: it is part of the cache fingerprint.
CORPUS_FORMAT_VERSION = 1

MIN_DOC_CHARS = 200
MAX_NON_ASCII_FRACTION = 0.1
MIN_LETTER_FRACTION = 0.6  # ASCII letters among the non-space characters
MAX_SOURCE_FILE_BYTES = 2_000_000  # bigger .py files are generated tables, not prose
FILES_PER_TASK = 32

# Directory names whose files are tests or test helpers, caches, or another root's packages.
_SKIP_DIRS = frozenset({
    "test", "tests", "testing", "_testing", "idle_test", "__pycache__", "site-packages",
    "dist-packages", "node_modules",
})

_ODD_WHITESPACE = re.compile(r"[\t\r\x0b\x0c\u00a0\u1680\u2000-\u200b\u2028\u2029\u202f\u205f\u3000\ufeff]")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
_INNER_SPACES = re.compile(r"(?<=\S) {2,}")
_MANY_NEWLINES = re.compile(r"\n{3,}")


@dataclasses.dataclass(frozen=True)
class CorpusInfo:
    """Where the built-in corpus is and what it holds."""

    path: Path
    sha256: str
    bytes: int  # UTF-8 bytes of the document texts (without the JSON framing)
    documents: int
    fingerprint: str
    files_scanned: int
    build_seconds: float
    reused: bool


def clean_docstring(raw: str) -> str | None:
    """Return the cleaned docstring, or ``None`` when it is too short or not mostly English text.

    Doctest examples (``>>>`` lines, their ``...`` continuations and their expected output up to
    the next blank line) are dropped, odd whitespace becomes plain spaces, runs of spaces inside a
    line collapse, and paragraph breaks (one blank line) are kept.
    """
    text = inspect.cleandoc(raw)
    text = _CONTROL.sub("", _ODD_WHITESPACE.sub(" ", text))
    kept: list[str] = []
    in_doctest = False
    for line in text.split("\n"):
        stripped = line.strip()
        if stripped.startswith(">>>"):
            in_doctest = True
            continue
        if in_doctest:
            if stripped:
                continue  # continuation or expected output of the example
            in_doctest = False
        if stripped == "..." or stripped.startswith("... "):
            continue
        kept.append(_INNER_SPACES.sub(" ", line.rstrip()))
    text = _MANY_NEWLINES.sub("\n\n", "\n".join(kept)).strip()
    if len(text) < MIN_DOC_CHARS:
        return None
    non_ascii = sum(1 for c in text if ord(c) > 127)
    if non_ascii > MAX_NON_ASCII_FRACTION * len(text):
        return None
    non_space = sum(1 for c in text if not c.isspace())
    letters = sum(1 for c in text if c.isascii() and c.isalpha())
    if letters < MIN_LETTER_FRACTION * max(non_space, 1):
        return None
    return text


def docstrings_of_source(source: bytes | str) -> list[str]:
    """The cleaned docstrings of one Python source (module, classes, functions), in ``ast.walk`` order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []  # Python 2 files, templates, deliberately broken fixtures: not our concern
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            raw = ast.get_docstring(node, clean=False)
            if raw:
                cleaned = clean_docstring(raw)
                if cleaned is not None:
                    docs.append(cleaned)
    return docs


def _docstrings_of_files(paths: list[str]) -> list[list[str]]:
    """Worker task: the docstrings of each file, in the given order."""
    out = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                source = f.read()
        except OSError:
            out.append([])
            continue
        out.append(docstrings_of_source(source))
    return out


def source_roots() -> list[tuple[str, Path]]:
    """The (label, directory) roots walked: the standard library, then each site-packages dir."""
    paths = sysconfig.get_paths()
    roots: list[tuple[str, Path]] = []
    seen: set[str] = set()
    for label, key in (("stdlib", "stdlib"), ("site", "purelib"), ("site", "platlib")):
        p = paths.get(key)
        if not p or not os.path.isdir(p):
            continue
        real = os.path.realpath(p)
        if real in seen:
            continue
        seen.add(real)
        roots.append((label, Path(p)))
    return roots


def _is_test_file(name: str) -> bool:
    return name.startswith("test_") or name.endswith("_test.py") or name == "conftest.py"


def list_source_files(roots: list[tuple[str, Path]]) -> list[tuple[str, str]]:
    """(key, absolute path) of every candidate ``.py`` file, sorted by a hash of the key.

    The key is ``<label>/<path relative to its root>``, so the order does not depend on where the
    interpreter is installed, and hashing it interleaves packages.
    """
    found: dict[str, str] = {}
    for label, root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
            for name in sorted(filenames):
                if not name.endswith(".py") or _is_test_file(name):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    if os.path.getsize(path) > MAX_SOURCE_FILE_BYTES:
                        continue
                except OSError:
                    continue
                key = f"{label}/{os.path.relpath(path, root)}"
                found.setdefault(key, path)
    return sorted(found.items(), key=lambda kv: (hashlib.blake2b(kv[0].encode(), digest_size=8).digest(), kv[0]))


def environment_fingerprint(min_bytes: int) -> str:
    """sha256 of what determines the corpus: Python version, installed distributions, settings."""
    dists = set()
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if name:
            dists.add((re.sub(r"[-_.]+", "-", name).lower(), dist.version or ""))
    desc = {
        "format": CORPUS_FORMAT_VERSION,
        "python": sys.version,
        "implementation": sys.implementation.name,
        "distributions": sorted(dists),
        "min_bytes": int(min_bytes),
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_cached(cache_dir: Path, fingerprint: str) -> CorpusInfo | None:
    meta_path = cache_dir / CORPUS_META_FILE
    data_path = cache_dir / CORPUS_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("fingerprint") != fingerprint or not data_path.is_file():
        return None
    if data_path.stat().st_size != meta.get("file_bytes") or _sha256_file(data_path) != meta.get("sha256"):
        logger.warning("cached corpus %s does not match %s; rebuilding it", data_path, meta_path)
        return None
    return CorpusInfo(path=data_path, sha256=meta["sha256"], bytes=meta["bytes"], documents=meta["documents"],
                      fingerprint=fingerprint, files_scanned=meta["files_scanned"],
                      build_seconds=meta["build_seconds"], reused=True)


def _gather(files: list[tuple[str, str]], min_bytes: int, workers: int, progress: bool) -> tuple[list[str], int, int]:
    """Docstrings of the files, in file order, up to the first file that reaches ``min_bytes``."""
    paths = [p for _, p in files]
    tasks = [paths[i:i + FILES_PER_TASK] for i in range(0, len(paths), FILES_PER_TASK)]
    docs: list[str] = []
    seen: set[bytes] = set()
    total = 0
    scanned = 0
    bar = tqdm(total=len(paths), unit="file", desc="builtin corpus", disable=not progress)

    def consume(results: list[list[str]]) -> bool:
        nonlocal total, scanned
        for file_docs in results:
            scanned += 1
            bar.update(1)
            for text in file_docs:
                key = hashlib.blake2b(" ".join(text.lower().split()).encode(), digest_size=16).digest()
                if key in seen:
                    continue
                seen.add(key)
                docs.append(text)
                total += len(text.encode("utf-8"))
            if total >= min_bytes:
                return True
        bar.set_postfix_str(f"{total / 1e6:.1f} MB")
        return False

    try:
        if workers <= 1:
            for task in tasks:
                if consume(_docstrings_of_files(task)):
                    break
        else:
            # spawn, not fork: the caller may hold threads (torch, tqdm) that fork would copy mid-lock.
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for results in pool.imap(_docstrings_of_files, tasks):
                    if consume(results):
                        break
                pool.terminate()  # stop the workers still parsing files we no longer need
    finally:
        bar.close()
    return docs, total, scanned


def build_builtin_corpus(cache_dir: Path, min_bytes: int, progress: bool = False,
                         workers: int | None = None) -> CorpusInfo:
    """Build (or reuse) ``cache_dir/builtin_corpus.jsonl`` holding at least ``min_bytes`` of text.

    A previous build with the same environment fingerprint (Python version, installed
    distributions, ``min_bytes``) is reused after checking its sha256. ``workers`` defaults to
    ``min(2, cpu count)`` parser processes. Raises :class:`DataError` when this machine does not
    hold enough docstrings.
    """
    if min_bytes <= 0:
        raise DataError(f"data.builtin_min_bytes must be positive, got {min_bytes}; set it to e.g. 6000000.")
    cache_dir = Path(cache_dir)
    fingerprint = environment_fingerprint(min_bytes)
    cached = _load_cached(cache_dir, fingerprint)
    if cached is not None:
        logger.debug("reusing built-in corpus %s (%d documents, %.1f MB)", cached.path, cached.documents,
                    cached.bytes / 1e6)
        return cached

    start = time.perf_counter()
    roots = source_roots()
    files = list_source_files(roots)
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    logger.info("building the built-in corpus from %d Python files under %s", len(files),
                ", ".join(str(r) for _, r in roots))
    docs, total, scanned = _gather(files, min_bytes, workers, progress)
    if total < min_bytes:
        raise DataError(
            f"the built-in corpus needs {min_bytes} bytes of docstrings but this machine only has "
            f"{total} bytes ({len(docs)} documents in {scanned} files under "
            f"{', '.join(str(r) for _, r in roots)}); lower data.builtin_min_bytes to at most {total}, "
            f"install more Python packages, or use data.source: files with your own text.")
    docs.sort(key=lambda t: hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest())

    cache_dir.mkdir(parents=True, exist_ok=True)
    data_path = cache_dir / CORPUS_FILE
    tmp = cache_dir / f".{CORPUS_FILE}.tmp-{os.getpid()}"
    h = hashlib.sha256()
    with open(tmp, "wb") as f:
        for text in docs:
            line = (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8")
            h.update(line)
            f.write(line)
        f.flush()
        os.fsync(f.fileno())
    file_bytes = tmp.stat().st_size
    os.replace(tmp, data_path)
    elapsed = time.perf_counter() - start
    meta = {
        "format": CORPUS_FORMAT_VERSION, "fingerprint": fingerprint, "sha256": h.hexdigest(),
        "bytes": total, "file_bytes": file_bytes, "documents": len(docs), "files_scanned": scanned,
        "files_available": len(files), "min_bytes": min_bytes, "python": sys.version.split()[0],
        "build_seconds": round(elapsed, 3),
    }
    write_json_atomic(cache_dir / CORPUS_META_FILE, meta, sort_keys=False)
    logger.info("built-in corpus: %d documents, %.1f MB from %d files in %.1f s", len(docs), total / 1e6,
                scanned, elapsed)
    return CorpusInfo(path=data_path, sha256=meta["sha256"], bytes=total, documents=len(docs),
                      fingerprint=fingerprint, files_scanned=scanned, build_seconds=elapsed, reused=False)


def iter_corpus(path: Path):
    """Yield the texts of a corpus ``.jsonl`` written by :func:`build_builtin_corpus`."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["text"]
