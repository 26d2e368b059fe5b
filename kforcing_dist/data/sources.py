"""Document readers: turn ``data.source`` (builtin, files or hf) into a stream of document texts.

File formats (``source: files``; ``data.paths`` entries may be files, directories or glob
patterns, expanded in sorted order):

* ``.txt``: with ``data.txt_documents: blank_line`` (default) documents are separated by one or
  more blank lines, so a file without blank lines is one document, and lines inside a document
  keep their newlines; with ``line`` every non-blank line is a document.
* ``.jsonl``: one JSON object per line; the document is the ``data.text_field`` string.
* ``.parquet``: the ``data.text_field`` column, read batch by batch with pyarrow.

``.txt`` and ``.jsonl`` must be UTF-8 text: a file with other bytes (binary, another encoding)
is refused with the byte offset of the first bad byte.

``source: hf`` reads ``data.hf_name`` with ``datasets.load_dataset`` (streamed from the hub, or
with ``data.hf_streaming: false`` through the local datasets cache, which works offline), or a
folder written by ``save_to_disk`` (``data.hf_path``, read with ``load_from_disk``).

Empty or whitespace-only documents are skipped everywhere, and ``data.max_documents`` counts the
documents actually yielded.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import DataError

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")


def resolve_paths(paths: list) -> list[Path]:
    """Expand ``data.paths`` (files, directories, globs) into the sorted list of files to read."""
    if not paths:
        raise DataError("data.source is 'files' but data.paths is empty; list your .txt / .jsonl / .parquet "
                        "files (or directories holding them) in data.paths.")
    out: list[Path] = []
    for entry in paths:
        entry = os.path.expanduser(str(entry))
        if glob.has_magic(entry):
            matches = sorted(glob.glob(entry, recursive=True))
            if not matches:
                raise DataError(f"data.paths pattern {entry!r} matches no file; fix the pattern or the path.")
            candidates = [Path(m) for m in matches if os.path.isfile(m)]
        elif os.path.isdir(entry):
            candidates = sorted(p for p in Path(entry).rglob("*") if p.is_file() and p.suffix in SUPPORTED_SUFFIXES)
            if not candidates:
                raise DataError(f"data.paths directory {entry} holds no {'/'.join(SUPPORTED_SUFFIXES)} file; "
                                f"point data.paths at the files themselves.")
        elif os.path.isfile(entry):
            candidates = [Path(entry)]
        else:
            raise DataError(f"data file {entry} does not exist; fix data.paths (relative paths are taken from "
                            f"the current directory {os.getcwd()}).")
        for p in candidates:
            if p.suffix not in SUPPORTED_SUFFIXES:
                raise DataError(f"data file {p} has the unsupported extension {p.suffix!r}; data.paths takes "
                                f"{', '.join(SUPPORTED_SUFFIXES)} files (convert it, or remove it from data.paths).")
            out.append(p)
    return out


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file; DataError for bytes that are not UTF-8 text.

    Read as bytes and decoded line by line, so a binary file passed as text is refused with the
    byte offset of the first bad byte instead of being turned into replacement characters.
    """
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            nul = raw.find(b"\0")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = e.start if nul < 0 else min(e.start, nul)
                raise DataError(_not_text(path, offset + bad)) from None
            if nul >= 0:  # valid UTF-8, but no text file holds NUL bytes: it is binary
                raise DataError(_not_text(path, offset + nul))
            offset += len(raw)
            yield lineno, line


def _not_text(path: Path, offset: int) -> str:
    return (f"data.paths: {path} is not UTF-8 text (byte offset {offset}); it is binary or in another encoding: "
            f"convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove it from data.paths.")


def _iter_txt(path: Path, documents: str = "blank_line") -> Iterator[str]:
    """Documents of a ``.txt`` file: separated by blank lines, or one per line (``documents="line"``)."""
    if documents == "line":
        for _, line in _text_lines(path):
            if line.strip():
                yield line.rstrip("\r\n")
        return
    lines: list[str] = []
    for _, line in _text_lines(path):
        if line.strip():
            lines.append(line.rstrip("\r\n"))
        elif lines:
            yield "\n".join(lines)
            lines = []
    if lines:
        yield "\n".join(lines)


def _text_of(record: Any, field: str, where: str) -> str | None:
    if not isinstance(record, dict):
        raise DataError(f"{where} is a {type(record).__name__}, not a JSON object; each line must be an object "
                        f"with a {field!r} string.")
    if field not in record:
        keys = ", ".join(sorted(map(str, record)))[:200]
        raise DataError(f"{where} has no field {field!r} (it has: {keys}); set data.text_field to the field "
                        f"that holds the text.")
    value = record[field]
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where} field {field!r} is a {type(value).__name__}, not a string; set data.text_field "
                        f"to a text field.")
    return value


def _iter_jsonl(path: Path, field: str) -> Iterator[str]:
    for lineno, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}:{lineno} is not valid JSON ({e}); fix or remove that line.") from None
        text = _text_of(record, field, f"{path}:{lineno}")
        if text is not None:
            yield text


def _iter_parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for damaged files
        raise DataError(f"cannot read the parquet file {path} ({e}); check that it is a complete "
                        f"parquet file.") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(f"parquet file {path} has no column {field!r} (it has: {', '.join(names)}); set "
                        f"data.text_field to the column that holds the text.")
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value is None:
                continue
            if not isinstance(value, str):
                raise DataError(f"parquet file {path} column {field!r} holds {type(value).__name__} values, not "
                                f"strings; set data.text_field to a text column.")
            yield value


def _iter_files(data_cfg) -> Iterator[str]:
    for path in resolve_paths(list(data_cfg.paths)):
        logger.debug("reading %s", path)
        if path.suffix == ".txt":
            yield from _iter_txt(path, data_cfg.txt_documents)
        elif path.suffix == ".jsonl":
            yield from _iter_jsonl(path, data_cfg.text_field)
        else:
            yield from _iter_parquet(path, data_cfg.text_field)


def _hf_label(data_cfg) -> str:
    return f"Hugging Face dataset {data_cfg.hf_path or data_cfg.hf_name!r}"


def _load_hf(data_cfg):
    if data_cfg.hf_name and data_cfg.hf_path:
        raise DataError(f"data.hf_name ({data_cfg.hf_name!r}) and data.hf_path ({data_cfg.hf_path!r}) are both set; "
                        f"set only one: hf_name for a hub/cache dataset, hf_path for a save_to_disk folder.")
    if not data_cfg.hf_name and not data_cfg.hf_path:
        raise DataError("data.source is 'hf' but data.hf_name and data.hf_path are empty; set data.hf_name to a "
                        "Hugging Face dataset name (e.g. lm1b), or data.hf_path to a folder written by datasets' "
                        "save_to_disk, or use data.source: builtin.")
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"data.source 'hf' needs the 'datasets' package ({e}); pip install datasets.") from None
    if data_cfg.hf_path:
        return _load_hf_disk(datasets, data_cfg)
    try:
        return datasets.load_dataset(data_cfg.hf_name, data_cfg.hf_config or None, split=data_cfg.hf_split,
                                     streaming=data_cfg.hf_streaming)
    except Exception as e:  # network, auth, unknown names: all surface as various exception types
        where = ("data.source: hf with hf_streaming: true reads the Hugging Face hub; check your network and "
                 "HF_TOKEN, or on an offline machine set data.hf_streaming: false (local datasets cache, "
                 "HF_DATASETS_OFFLINE=1) or data.hf_path (a save_to_disk folder)" if data_cfg.hf_streaming else
                 "data.hf_streaming: false reads the local datasets cache (HF_HOME), downloading what it lacks; "
                 "offline, load the dataset once on a machine with network into the same cache, or use "
                 "data.hf_path (a save_to_disk folder)")
        raise DataError(
            f"could not open the Hugging Face dataset {data_cfg.hf_name!r} (config {data_cfg.hf_config or None!r}, "
            f"split {data_cfg.hf_split!r}): {type(e).__name__}: {e}. Check the name, config and split; {where}; "
            f"or use data.source: files / builtin.") from None


def _load_hf_disk(datasets, data_cfg):
    """The dataset (or the ``hf_split`` of the dataset dict) saved by ``save_to_disk`` in ``data.hf_path``."""
    path = Path(os.path.expanduser(data_cfg.hf_path))
    if not path.is_dir():
        raise DataError(f"data.hf_path {path} is not a folder; point it at a folder written by datasets' "
                        f"save_to_disk (relative paths are taken from {os.getcwd()}).")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # missing or damaged state files surface as several exception types
        raise DataError(f"data.hf_path {path} is not a dataset folder written by datasets' save_to_disk "
                        f"({type(e).__name__}: {e}); save one with Dataset.save_to_disk, or use "
                        f"data.source: files for raw .jsonl / .parquet files.") from None
    if isinstance(ds, datasets.DatasetDict):
        if data_cfg.hf_split not in ds:
            raise DataError(f"data.hf_path {path} holds the splits {', '.join(ds)} but data.hf_split is "
                            f"{data_cfg.hf_split!r}; set data.hf_split to one of them.")
        ds = ds[data_cfg.hf_split]
    return ds


def _iter_hf(data_cfg) -> Iterator[str]:
    ds = _load_hf(data_cfg)
    where = f"{_hf_label(data_cfg)} record"
    try:
        for i, record in enumerate(ds):
            text = _text_of(record, data_cfg.text_field, f"{where} {i}")
            if text is not None:
                yield text
    except DataError:
        raise
    except Exception as e:
        hint = ("data.source: hf with hf_streaming: true needs access to the Hugging Face hub while reading"
                if data_cfg.hf_streaming and not data_cfg.hf_path else "check the dataset files")
        raise DataError(f"reading the {_hf_label(data_cfg)} failed: {type(e).__name__}: {e}; {hint}.") from None


def iter_documents(data_cfg, cache_dir: Path, progress: bool = False) -> Iterator[str]:
    """Yield the non-empty document texts of ``data_cfg`` (a ``DataConfig``), in a fixed order.

    ``cache_dir`` holds the built-in corpus (built on first use). At most ``data_cfg.max_documents``
    documents are yielded when it is positive.
    """
    if data_cfg.source == "builtin":
        from .corpus import build_builtin_corpus, iter_corpus

        info = build_builtin_corpus(Path(cache_dir), data_cfg.builtin_min_bytes, progress=progress)
        docs = iter_corpus(info.path)
    elif data_cfg.source == "files":
        docs = _iter_files(data_cfg)
    elif data_cfg.source == "hf":
        docs = _iter_hf(data_cfg)
    else:
        raise DataError(f"unknown data.source {data_cfg.source!r}; use one of builtin, files, hf.")
    docs = (d for d in docs if d.strip())
    if data_cfg.max_documents and data_cfg.max_documents > 0:
        docs = itertools.islice(docs, data_cfg.max_documents)
    yield from docs


def describe_source(data_cfg, cache_dir: Path, progress: bool = False) -> dict:
    """What identifies the documents of ``data_cfg``, for cache keys and shard metadata.

    builtin: the corpus sha256; files: each file's path, size and mtime; hf: name, config and
    split (the hub content itself cannot be checked), or for ``hf_path`` the split and each file of
    the saved folder with its size and mtime. ``corpus_sha`` is a sha256 over the rest.
    """
    desc: dict[str, Any] = {"source": data_cfg.source, "max_documents": int(data_cfg.max_documents or 0)}
    if data_cfg.source == "builtin":
        from .corpus import build_builtin_corpus

        info = build_builtin_corpus(Path(cache_dir), data_cfg.builtin_min_bytes, progress=progress)
        desc.update(builtin_sha256=info.sha256, builtin_bytes=info.bytes, builtin_documents=info.documents)
    elif data_cfg.source == "files":
        files = []
        for p in resolve_paths(list(data_cfg.paths)):
            st = p.stat()
            files.append({"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        desc.update(files=files, text_field=data_cfg.text_field)
        if data_cfg.txt_documents != "blank_line":  # only when set, so older shard folders keep their key
            desc.update(txt_documents=data_cfg.txt_documents)
    elif data_cfg.source == "hf" and data_cfg.hf_path:
        root = Path(os.path.expanduser(data_cfg.hf_path))
        files = [{"path": str(p.relative_to(root)), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
                 for p in sorted(root.rglob("*")) if p.is_file()] if root.is_dir() else []
        desc.update(hf_path=str(root.resolve()), hf_split=data_cfg.hf_split, text_field=data_cfg.text_field,
                    files=files)
    elif data_cfg.source == "hf":
        # hf_streaming is left out: streamed or cached, the documents are the same
        desc.update(hf_name=data_cfg.hf_name, hf_config=data_cfg.hf_config, hf_split=data_cfg.hf_split,
                    text_field=data_cfg.text_field)
    else:
        raise DataError(f"unknown data.source {data_cfg.source!r}; use one of builtin, files, hf.")
    desc["corpus_sha"] = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()
    return desc
