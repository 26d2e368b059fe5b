"""Token shards on disk (the Megatron indexed-dataset idea) and a memory-mapped reader.

Layout of a shards folder::

    metadata.json            format version, tokenizer identity, dtype, per-split shard lists, inputs
    tokenizer/               the tokenizer's defining files (see Tokenizer.save)
    train/tokens-00000.bin   raw token ids (uint16 below 65535 ids, else uint32), no header
    train/index.npy          int64 [documents + 1]: start offset of each document in the split's
                             concatenated token stream (the last entry is the token count)
    valid/...

Each document's tokens are followed by the EOS id. A document never straddles two shard files
(a shard is closed before a document would overflow ``shard_tokens``; a longer document gets a
shard of its own), but :class:`TokenDataset` reads windows over the concatenation of all shards.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .errors import DataError

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
INDEX_FILE = "index.npy"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "valid")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id below ``vocab_size``."""
    return np.dtype(np.uint16) if vocab_size < 65535 else np.dtype(np.uint32)


def shard_name(i: int) -> str:
    return f"tokens-{i:05d}.bin"


class ShardWriter:
    """Appends documents to ``tokens-NNNNN.bin`` files of at most ``shard_tokens`` tokens each."""

    def __init__(self, split_dir: Path, dtype, shard_tokens: int):
        if shard_tokens <= 0:
            raise DataError(f"data.shard_tokens must be positive, got {shard_tokens}; use e.g. 4000000.")
        self.split_dir = Path(split_dir)
        self.split_dir.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self.shard_tokens = int(shard_tokens)
        self.shards: list[dict] = []
        self._offsets: list[int] = [0]
        self._file = None
        self._hash = None
        self._shard_len = 0
        self._shard_docs = 0

    @property
    def num_documents(self) -> int:
        return len(self._offsets) - 1

    @property
    def num_tokens(self) -> int:
        return self._offsets[-1]

    def _close_shard(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self.shards[-1].update(tokens=self._shard_len, documents=self._shard_docs, sha256=self._hash.hexdigest())
        self._file = None

    def _open_shard(self) -> None:
        name = shard_name(len(self.shards))
        self._file = open(self.split_dir / name, "wb")
        self._hash = hashlib.sha256()
        self._shard_len = 0
        self._shard_docs = 0
        self.shards.append({"file": name, "first_document": self.num_documents})

    def add(self, tokens: np.ndarray) -> None:
        """Append one document (its tokens, EOS included)."""
        n = len(tokens)
        if self._file is not None and self._shard_len > 0 and self._shard_len + n > self.shard_tokens:
            self._close_shard()
        if self._file is None:
            self._open_shard()
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self._shard_len += n
        self._shard_docs += 1
        self._offsets.append(self._offsets[-1] + n)

    def finish(self) -> dict:
        """Close the last shard, write ``index.npy`` and return the split's metadata entry."""
        self._close_shard()
        np.save(self.split_dir / INDEX_FILE, np.asarray(self._offsets, dtype=np.int64))
        return {"tokens": self.num_tokens, "documents": self.num_documents, "shards": self.shards}


def read_metadata(shards_dir) -> dict:
    """Read and sanity-check ``shards_dir/metadata.json``."""
    path = Path(shards_dir) / METADATA_FILE
    if not path.is_file():
        raise DataError(f"{path} does not exist, so {shards_dir} is not a prepared shards folder; run "
                        f"`kforcing-dist prepare-data` first or fix data.shards_dir.")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is unreadable or corrupt ({e}); delete {shards_dir} and re-run "
                        f"`kforcing-dist prepare-data`.") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise DataError(f"{path} has format version {found!r} but this code reads version {FORMAT_VERSION}; "
                        f"delete {shards_dir} and re-run `kforcing-dist prepare-data`.")
    missing = [k for k in ("tokenizer", "vocab_size", "eos_id", "dtype", "splits") if k not in meta]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; it is corrupt: delete {shards_dir} and re-run "
                        f"`kforcing-dist prepare-data`.")
    return meta


def write_metadata(shards_dir, meta: dict) -> None:
    """Write ``metadata.json`` atomically."""
    path = Path(shards_dir) / METADATA_FILE
    tmp = path.with_name(f".{METADATA_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class TokenDataset:
    """The token stream of one split, memory-mapped from its shard files."""

    def __init__(self, shards_dir, split: str):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.shards_dir = Path(shards_dir)
        self.split = split
        self.metadata = read_metadata(self.shards_dir)
        meta_path = self.shards_dir / METADATA_FILE
        info = self.metadata["splits"].get(split)
        if not isinstance(info, dict) or "shards" not in info:
            raise DataError(f"{meta_path} has no '{split}' split; delete {self.shards_dir} and re-run "
                            f"`kforcing-dist prepare-data`.")
        self.dtype = np.dtype(self.metadata["dtype"])
        self._maps: list[np.ndarray] = []
        self._starts: list[int] = []
        total = 0
        for shard in info["shards"]:
            path = self.shards_dir / split / shard["file"]
            expected = int(shard["tokens"]) * self.dtype.itemsize
            try:
                size = path.stat().st_size
            except OSError:
                raise DataError(f"shard file {path} is missing; delete {self.shards_dir} and re-run "
                                f"`kforcing-dist prepare-data`.") from None
            if size != expected:
                raise DataError(f"shard file {path} has {size} bytes but {meta_path} says {expected}; it is "
                                f"truncated or from another run: delete {self.shards_dir} and re-run "
                                f"`kforcing-dist prepare-data`.")
            if expected == 0:
                continue
            self._maps.append(np.memmap(path, dtype=self.dtype, mode="r"))
            self._starts.append(total)
            total += int(shard["tokens"])
        if total != int(info["tokens"]):
            raise DataError(f"{meta_path} says split '{split}' has {info['tokens']} tokens but its shards hold "
                            f"{total}; delete {self.shards_dir} and re-run `kforcing-dist prepare-data`.")
        self._len = total
        self._doc_offsets: np.ndarray | None = None

    def __len__(self) -> int:
        return self._len

    @property
    def vocab_size(self) -> int:
        return int(self.metadata["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.metadata["eos_id"])

    @property
    def num_documents(self) -> int:
        return int(self.metadata["splits"][self.split]["documents"])

    @property
    def document_offsets(self) -> np.ndarray:
        """int64 [documents + 1]: where each document starts in the stream (last entry: ``len``)."""
        if self._doc_offsets is None:
            path = self.shards_dir / self.split / INDEX_FILE
            try:
                offsets = np.load(path)
            except (OSError, ValueError) as e:
                raise DataError(f"index file {path} is missing or corrupt ({e}); delete {self.shards_dir} and "
                                f"re-run `kforcing-dist prepare-data`.") from None
            if offsets.shape != (self.num_documents + 1,) or int(offsets[-1]) != self._len:
                raise DataError(f"index file {path} does not match {self.shards_dir / METADATA_FILE}; delete "
                                f"{self.shards_dir} and re-run `kforcing-dist prepare-data`.")
            self._doc_offsets = offsets
        return self._doc_offsets

    def document(self, i: int) -> np.ndarray:
        """The tokens of document ``i`` (EOS included)."""
        offsets = self.document_offsets
        return self.window(int(offsets[i]), int(offsets[i + 1] - offsets[i]))

    def window(self, start: int, length: int) -> np.ndarray:
        """A copy of tokens ``[start, start + length)`` of the concatenated stream."""
        if start < 0 or length < 0 or start + length > self._len:
            raise IndexError(f"window [{start}, {start + length}) is outside the {self._len} tokens of "
                             f"split '{self.split}'")
        out = np.empty(length, dtype=self.dtype)
        pos = 0
        k = bisect.bisect_right(self._starts, start) - 1
        while pos < length:
            m = self._maps[k]
            local = start + pos - self._starts[k]
            take = min(length - pos, len(m) - local)
            out[pos:pos + take] = m[local:local + take]
            pos += take
            k += 1
        return out

    def verify(self) -> None:
        """Recompute each shard's sha256 against the metadata (slow: reads everything)."""
        for shard in self.metadata["splits"][self.split]["shards"]:
            path = self.shards_dir / self.split / shard["file"]
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            if h.hexdigest() != shard.get("sha256"):
                raise DataError(f"shard file {path} does not match its sha256 in the metadata; delete "
                                f"{self.shards_dir} and re-run `kforcing-dist prepare-data`.")


def check_tokenizer_matches(shards_dir, tokenizer) -> None:
    """Raise :class:`DataError` unless the shards in ``shards_dir`` were made with ``tokenizer``."""
    meta = read_metadata(shards_dir)
    want = meta["tokenizer"]
    fp, vocab = want.get("fingerprint"), int(meta["vocab_size"])
    if fp != tokenizer.fingerprint or vocab != tokenizer.vocab_size:
        raise DataError(
            f"shards in {shards_dir} were made with tokenizer {fp} (vocab {vocab}) but the model's tokenizer is "
            f"{tokenizer.fingerprint} (vocab {tokenizer.vocab_size}); re-run `kforcing-dist prepare-data` with "
            f"this tokenizer or point tokenizer.path at {Path(shards_dir) / TOKENIZER_DIR}.")
