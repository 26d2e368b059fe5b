"""Token shards on disk (the Megatron indexed-dataset idea) and a memory-mapped reader.

Layout of a shards folder::

    metadata.json            format version, tokenizer identity, dtype, per-split shard lists, inputs
    tokenizer/               the tokenizer's defining files (see Tokenizer.save)
    train/tokens-00000.bin   raw token ids (uint16 below 65535 ids, else uint32), no header
    train/index.npy          int64 [documents + 1]: start offset of each document in the split's
                             concatenated token stream (the last entry is the token count)
    valid/...

Integrity: ``metadata.json`` records each shard's size (``tokens``), the sha256 of the whole file
(``sha256``) and the sha256 of a sample of it (``sample_sha256``: ``shard_sample.blocks`` evenly
spaced blocks of ``shard_sample.block_bytes``, the first and the last included; the whole file
when it is smaller). Opening a split (:class:`TokenDataset`) checks every shard's size, its
sample checksum and the token ids of the sample (read cost: about 128 KiB per shard, whatever its
size), so a replaced, truncated or garbage file is refused before training; every window read
is also checked against the vocabulary. :func:`verify_shards` (``kforcing-dist verify-data``)
reads everything: full sha256 and every token id. Folders written before ``shard_sample``
existed are read as before (sizes and sampled ids checked, no sample checksum).

Each document's tokens are followed by the EOS id. A document never straddles two shard files
(a shard is closed before a document would overflow ``shard_tokens``; a longer document gets a
shard of its own), but :class:`TokenDataset` reads windows over the concatenation of all shards.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from ..fsio import write_json_atomic
from .errors import DataError

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
INDEX_FILE = "index.npy"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "valid")
# The sample of a shard checked at every open: 128 KiB, a couple of milliseconds per shard whatever
# its size (measured ~2 ms on 100 MB shards), spread enough that a replaced or garbage file cannot pass.
SHARD_SAMPLE = {"blocks": 8, "block_bytes": 16384}
VERIFY_READ_BYTES = 1 << 22

logger = logging.getLogger(__name__)


def _reprepare(shards_dir) -> str:
    return f"delete {shards_dir} and re-run `kforcing-dist prepare-data`."


def sample_sha256(tokens: np.ndarray, blocks: int, block_bytes: int) -> str:
    """sha256 of ``blocks`` evenly spaced blocks of ``tokens`` (first and last included), or of all
    of them when they are fewer than ``blocks`` blocks."""
    return hashlib.sha256(_sample(tokens, blocks, block_bytes).tobytes()).hexdigest()


def _sample(tokens: np.ndarray, blocks: int, block_bytes: int) -> np.ndarray:
    block = max(1, block_bytes // tokens.dtype.itemsize)
    n = len(tokens)
    if n <= blocks * block:
        return np.asarray(tokens)
    starts = [round(i * (n - block) / (blocks - 1)) for i in range(blocks)]
    return np.concatenate([tokens[s:s + block] for s in starts])


def _first_out_of_vocab(tokens: np.ndarray, vocab_size: int) -> int:
    """Index of the first id >= ``vocab_size`` in ``tokens``, -1 when all are in range."""
    if len(tokens) == 0 or int(tokens.max()) < vocab_size:
        return -1
    return int(np.argmax(tokens >= vocab_size))


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
        self._file = None
        written = np.memmap(self.split_dir / self.shards[-1]["file"], dtype=self.dtype, mode="r")
        self.shards[-1].update(tokens=self._shard_len, documents=self._shard_docs, sha256=self._hash.hexdigest(),
                               sample_sha256=sample_sha256(written, **SHARD_SAMPLE))
        del written

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


def shard_metadata() -> dict:
    """The top-level ``metadata.json`` entries that describe the shards' checksums."""
    return {"shard_sample": dict(SHARD_SAMPLE)}


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
    write_json_atomic(Path(shards_dir) / METADATA_FILE, meta)


class TokenDataset:
    """The token stream of one split, memory-mapped from its shard files."""

    def __init__(self, shards_dir, split: str, check_sample: bool = True):
        """``check_sample=False`` skips the sampled checksum and ids (for :meth:`verify`, which reads all)."""
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
            tokens = np.memmap(path, dtype=self.dtype, mode="r")
            if check_sample:
                self._check_sample(path, shard, tokens)
            self._maps.append(tokens)
            self._starts.append(total)
            total += int(shard["tokens"])
        if total != int(info["tokens"]):
            raise DataError(f"{meta_path} says split '{split}' has {info['tokens']} tokens but its shards hold "
                            f"{total}; delete {self.shards_dir} and re-run `kforcing-dist prepare-data`.")
        self._len = total
        self._doc_offsets: np.ndarray | None = None

    def _check_sample(self, path: Path, shard: dict, tokens: np.ndarray) -> None:
        """The cheap check at open: the sample's checksum (when recorded) and its token ids."""
        params = self.metadata.get("shard_sample") or SHARD_SAMPLE
        sample = _sample(tokens, int(params["blocks"]), int(params["block_bytes"]))
        want = shard.get("sample_sha256")
        if want is not None and self.metadata.get("shard_sample") is not None:
            if hashlib.sha256(sample.tobytes()).hexdigest() != want:
                raise DataError(f"shard file {path} does not match its checksum in {self.shards_dir / METADATA_FILE} "
                                f"(sampled blocks differ): it is damaged or from another run; "
                                f"{_reprepare(self.shards_dir)}")
        bad = _first_out_of_vocab(sample, self.vocab_size)
        if bad >= 0:
            raise DataError(self._out_of_vocab_message(path, int(sample[bad])))

    def _out_of_vocab_message(self, path: Path, token: int) -> str:
        return (f"shard file {path} holds token id {token}, outside the vocabulary of {self.vocab_size} in "
                f"{self.shards_dir / METADATA_FILE}: it is damaged or from another run; {_reprepare(self.shards_dir)}")

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
            chunk = m[local:local + take]
            bad = _first_out_of_vocab(chunk, self.vocab_size)
            if bad >= 0:  # damage the sampled check at open missed: refuse it before the model sees it
                raise DataError(self._out_of_vocab_message(Path(m.filename), int(chunk[bad])))
            out[pos:pos + take] = chunk
            pos += take
            k += 1
        return out

    def verify(self) -> dict:
        """Read every shard: its full sha256 against the metadata and every token id against the
        vocabulary (slow: reads the whole split). Raises :class:`DataError` naming each bad file;
        returns ``{"files", "bytes", "unchecked"}`` (unchecked: files without a recorded sha256)."""
        problems, unchecked, nbytes = [], [], 0
        shards = self.metadata["splits"][self.split]["shards"]
        for shard in shards:
            path = self.shards_dir / self.split / shard["file"]
            h = hashlib.sha256()
            bad_token = None
            with open(path, "rb") as f:
                # blocks are a multiple of the item size, so each one is whole token ids
                for block in iter(lambda: f.read(VERIFY_READ_BYTES), b""):
                    h.update(block)
                    nbytes += len(block)
                    if bad_token is None:
                        ids = np.frombuffer(block, dtype=self.dtype)
                        bad = _first_out_of_vocab(ids, self.vocab_size)
                        bad_token = int(ids[bad]) if bad >= 0 else None
            want, reasons = shard.get("sha256"), []
            if want is None:
                unchecked.append(str(path))
            elif h.hexdigest() != want:
                reasons.append(f"sha256 differs from {METADATA_FILE}")
            if bad_token is not None:
                reasons.append(f"holds token id {bad_token} outside the vocabulary of {self.vocab_size}")
            if reasons:
                problems.append(f"{path} ({', '.join(reasons)})")
        if problems:
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            raise DataError(f"{len(problems)} damaged shard file(s) in {self.shards_dir}: {shown}; they are damaged "
                            f"or from another run: {_reprepare(self.shards_dir)}")
        self.document_offsets  # the index must match the metadata too
        return {"files": len(shards), "bytes": nbytes, "unchecked": unchecked}


def verify_shards(shards_dir) -> dict:
    """Fully verify every split of ``shards_dir`` (see :meth:`TokenDataset.verify`).

    Returns ``{"files", "bytes", "seconds", "unchecked"}``; raises :class:`DataError` on damage.
    """
    start = time.perf_counter()
    total = {"files": 0, "bytes": 0, "unchecked": []}
    for split in SPLITS:
        result = TokenDataset(shards_dir, split, check_sample=False).verify()
        total["files"] += result["files"]
        total["bytes"] += result["bytes"]
        total["unchecked"] += result["unchecked"]
    if total["unchecked"]:
        logger.warning("%d shard file(s) in %s have no recorded sha256 (an older prepare-data): their ids were "
                       "checked, their content could not be; re-run prepare-data into a new folder to add them",
                       len(total["unchecked"]), shards_dir)
    total["seconds"] = time.perf_counter() - start
    return total


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
