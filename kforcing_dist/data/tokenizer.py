"""Tokenizers behind one small interface: a trained/loaded SentencePiece model or a local HF tokenizer.

A tokenizer is identified by its :attr:`Tokenizer.fingerprint`, the sha256 of the files that
define it; token shards and checkpoints record it so a model is never fed ids from another
vocabulary. :meth:`Tokenizer.save` copies those files into a folder that :func:`load_tokenizer`
reads back.

SentencePiece models are trained with identity normalisation, no whitespace folding and byte
fallback, so ``decode(encode(text)) == text`` for any text (newlines become byte pieces).
"""

from __future__ import annotations

import abc
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ..fsio import write_bytes_atomic, write_json_atomic
from .errors import DataError

logger = logging.getLogger(__name__)

SPM_FILE = "tokenizer.model"
SPM_TRAIN_INFO = "tokenizer_train.json"
HF_FILE = "tokenizer.json"
HF_EXTRA_FILES = ("tokenizer_config.json", "special_tokens_map.json")
# Bump when the training options below change: it is part of the reuse key.
SPM_TRAIN_VERSION = 1
DEFAULT_NUM_THREADS = 2  # fixed, not the machine's core count: the thread count changes the model
_MAX_LINE_CHARS = 8192  # SentencePiece silently skips sentences longer than max_sentence_length
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")


def _sha256_named(files: list[tuple[str, bytes]]) -> str:
    if len(files) == 1:
        return hashlib.sha256(files[0][1]).hexdigest()
    h = hashlib.sha256()
    for name, data in files:  # name and length framing: two files cannot blur into one
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


class Tokenizer(abc.ABC):
    """What the pipeline and the trainer need from a tokenizer."""

    kind: str = ""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (subclasses use their library's batch path)."""
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def decode(self, ids) -> str:
        """Text of ``ids``."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (every id is below it)."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int:
        """The id appended after each document."""

    @property
    @abc.abstractmethod
    def bos_id(self) -> int | None:
        """The beginning-of-sequence id, if the tokenizer has one."""

    @abc.abstractmethod
    def defining_files(self) -> list[tuple[str, bytes]]:
        """(file name, bytes) of the files that define this tokenizer."""

    @property
    def fingerprint(self) -> str:
        """sha256 hex of the defining file bytes (with name framing when there are several)."""
        return _sha256_named(self.defining_files())

    def save(self, directory) -> None:
        """Write the defining files into ``directory`` (created if needed); :func:`load_tokenizer` reads it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in self.defining_files():
            write_bytes_atomic(directory / name, data)

    def describe(self) -> dict:
        """The identity recorded in shard metadata and checkpoints."""
        return {"kind": self.kind, "fingerprint": self.fingerprint, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "bos_id": self.bos_id}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:12]})"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (``tokenizer.model``), held in memory so it pickles to worker processes."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, source: str = "<memory>"):
        import sentencepiece as spm

        self._proto = bytes(model_proto)
        self._source = source
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._proto)
        except Exception as e:
            raise DataError(f"{source} is not a valid SentencePiece model ({e}); point tokenizer.path at a "
                            f"SentencePiece .model file or leave it empty to train one.") from None
        if self._sp.eos_id() < 0:
            raise DataError(f"the SentencePiece model {source} has no EOS piece; use a model trained with an "
                            f"eos_id, or leave tokenizer.path empty to train one.")

    @classmethod
    def from_file(cls, path) -> SentencePieceTokenizer:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read the SentencePiece model {path} ({e}); fix tokenizer.path.") from None
        return cls(data, source=str(path))

    def __getstate__(self):
        return {"proto": self._proto, "source": self._source}

    def __setstate__(self, state):
        self.__init__(state["proto"], state["source"])

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One C++ call for the batch; a single thread because parallelism is the caller's processes.
        return self._sp.encode(list(texts), out_type=int, num_threads=1)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int | None:
        b = self._sp.bos_id()
        return b if b >= 0 else None

    def defining_files(self) -> list[tuple[str, bytes]]:
        return [(SPM_FILE, self._proto)]


def _token_content(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class HFTokenizer(Tokenizer):
    """A local Hugging Face tokenizer folder (``tokenizer.json``, optional ``tokenizer_config.json`` and
    ``special_tokens_map.json``), run with the ``tokenizers`` library."""

    kind = "hf"

    def __init__(self, files: dict[str, bytes], source: str = "<memory>"):
        try:
            from tokenizers import Tokenizer as _HFTok
        except ImportError as e:
            raise DataError(f"tokenizer.kind 'hf' needs the 'tokenizers' package ({e}); "
                            f"pip install tokenizers.") from None
        if HF_FILE not in files:
            raise DataError(f"{source} has no {HF_FILE}; tokenizer.path must be a Hugging Face tokenizer folder "
                            f"holding {HF_FILE} (save one with tokenizer.save_pretrained).")
        self._files = {k: bytes(v) for k, v in files.items() if k == HF_FILE or k in HF_EXTRA_FILES}
        self._source = source
        try:
            self._tok = _HFTok.from_str(self._files[HF_FILE].decode("utf-8"))
        except Exception as e:
            raise DataError(f"{source}/{HF_FILE} cannot be loaded by the tokenizers library ({e}); check that "
                            f"it is a complete tokenizer.json.") from None
        self._eos = self._special_id("eos_token", _EOS_NAMES)
        if self._eos is None:
            raise DataError(f"the Hugging Face tokenizer in {source} names no EOS token; add \"eos_token\" to its "
                            f"tokenizer_config.json or special_tokens_map.json.")
        self._bos = self._special_id("bos_token", ("<s>", "<|begin_of_text|>", "<bos>"))

    def _special_id(self, key: str, fallbacks: tuple[str, ...]) -> int | None:
        for name in HF_EXTRA_FILES:
            if name not in self._files:
                continue
            try:
                cfg = json.loads(self._files[name])
            except ValueError:
                raise DataError(f"{self._source}/{name} is not valid JSON; fix or remove it.") from None
            content = _token_content(cfg.get(key)) if isinstance(cfg, dict) else None
            if content is not None:
                tid = self._tok.token_to_id(content)
                if tid is None:
                    raise DataError(f"{self._source}/{name} names {key} {content!r}, which is not in the "
                                    f"vocabulary of its {HF_FILE}; fix the {key} entry.")
                return tid
        for content in fallbacks:
            tid = self._tok.token_to_id(content)
            if tid is not None:
                return tid
        return None

    @classmethod
    def from_dir(cls, path) -> HFTokenizer:
        path = Path(path)
        folder = path.parent if path.is_file() else path
        files = {}
        for name in (HF_FILE, *HF_EXTRA_FILES):
            p = folder / name
            if p.is_file():
                files[name] = p.read_bytes()
        return cls(files, source=str(folder))

    def __getstate__(self):
        return {"files": self._files, "source": self._source}

    def __setstate__(self, state):
        self.__init__(state["files"], state["source"])

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def bos_id(self) -> int | None:
        return self._bos

    def defining_files(self) -> list[tuple[str, bytes]]:
        return [(name, self._files[name]) for name in (HF_FILE, *HF_EXTRA_FILES) if name in self._files]


def load_tokenizer(path, kind: str | None = None) -> Tokenizer:
    """Load a tokenizer from a saved folder, a SentencePiece ``.model`` file or an HF ``tokenizer.json``.

    A folder holding ``tokenizer.json`` is read as Hugging Face unless ``kind`` is ``sentencepiece``
    and it also holds ``tokenizer.model``.
    """
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise DataError(f"tokenizer path {path} does not exist; fix tokenizer.path or leave it empty to train a "
                        f"SentencePiece model on the corpus.")
    if path.is_file():
        if path.name.endswith(".json"):
            return HFTokenizer.from_dir(path)
        return SentencePieceTokenizer.from_file(path)
    has_hf = (path / HF_FILE).is_file()
    has_spm = (path / SPM_FILE).is_file()
    if has_spm and (kind == "sentencepiece" or not has_hf):
        return SentencePieceTokenizer.from_file(path / SPM_FILE)
    if has_hf:
        return HFTokenizer.from_dir(path)
    raise DataError(f"tokenizer folder {path} holds neither {HF_FILE} nor {SPM_FILE}; point tokenizer.path at a "
                    f"Hugging Face tokenizer folder or a SentencePiece .model file.")


def _training_lines(docs: Iterable[str]):
    for doc in docs:
        for line in doc.split("\n"):
            if not line.strip():
                continue
            for i in range(0, len(line), _MAX_LINE_CHARS):
                yield line[i:i + _MAX_LINE_CHARS]


def train_sentencepiece(docs: list[str], vocab_size: int, model_type: str = "unigram", seed: int = 0,
                        num_threads: int = DEFAULT_NUM_THREADS) -> SentencePieceTokenizer:
    """Train a SentencePiece model on ``docs`` (fed line by line) and return it (not saved)."""
    import sentencepiece as spm

    if vocab_size < 300:
        raise DataError(f"tokenizer.vocab_size {vocab_size} is too small: byte fallback alone needs 259 ids; "
                        f"use at least 300 (e.g. 4096).")
    # SentencePiece samples sentences and seeds its EM with a process-wide generator; fixing it here
    # is what makes two trainings on the same text byte-identical.
    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(docs), model_writer=buf,
            vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            character_coverage=0.9995, split_digits=True,
            input_sentence_size=2_000_000, shuffle_input_sentence=True,
            max_sentence_length=4 * _MAX_LINE_CHARS, num_threads=num_threads, minloglevel=2,
        )
    except RuntimeError as e:
        hint = ("raise tokenizer.vocab_size above the number of distinct characters it names"
                if "smaller than required_chars" in str(e) else
                "with little text lower tokenizer.vocab_size, or give it more text "
                "(tokenizer.train_max_bytes, more documents)")
        raise DataError(f"SentencePiece training failed: {e}. Fix: {hint}.") from None
    return SentencePieceTokenizer(buf.getvalue(), source=f"<trained vocab {vocab_size}>")


def collect_training_text(documents: Iterable[str], max_bytes: int) -> tuple[list[str], str, int]:
    """The first documents up to ``max_bytes`` UTF-8 bytes, their sha256 and their byte count."""
    docs: list[str] = []
    h = hashlib.sha256()
    total = 0
    for doc in documents:
        if total >= max_bytes:
            break
        data = doc.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
        docs.append(doc)
        total += len(data)
    return docs, h.hexdigest(), total


def build_or_load_tokenizer(tok_cfg, documents_factory: Callable[[], Iterable[str]], work_dir,
                            seed: int = 0, num_threads: int = DEFAULT_NUM_THREADS) -> Tokenizer:
    """The tokenizer of ``tok_cfg`` (a ``TokenizerConfig``).

    With ``tok_cfg.path`` set it is loaded from there. Otherwise a SentencePiece model of
    ``tok_cfg.vocab_size`` is trained on the first ``tok_cfg.train_max_bytes`` of
    ``documents_factory()`` and saved in ``work_dir``; a model already there that was trained on the
    same text (sha256) with the same settings is reused instead.
    """
    if tok_cfg.path:
        return load_tokenizer(tok_cfg.path, kind=tok_cfg.kind)
    if tok_cfg.kind != "sentencepiece":
        raise DataError(f"tokenizer.kind {tok_cfg.kind!r} needs tokenizer.path (a local Hugging Face tokenizer "
                        f"folder); set it, or use tokenizer.kind: sentencepiece to train one on the corpus.")
    if tok_cfg.model_type not in ("unigram", "bpe"):
        raise DataError(f"tokenizer.model_type {tok_cfg.model_type!r} is not supported; use unigram or bpe.")
    if tok_cfg.train_max_bytes <= 0:
        raise DataError(f"tokenizer.train_max_bytes must be positive, got {tok_cfg.train_max_bytes}; "
                        f"use e.g. 20000000.")
    import sentencepiece as spm

    docs, text_sha, nbytes = collect_training_text(documents_factory(), tok_cfg.train_max_bytes)
    if not docs:
        raise DataError("there are no documents to train the tokenizer on; check data.source and its inputs.")
    settings = {"version": SPM_TRAIN_VERSION, "sentencepiece": spm.__version__, "text_sha256": text_sha,
                "vocab_size": tok_cfg.vocab_size, "model_type": tok_cfg.model_type,
                "train_max_bytes": tok_cfg.train_max_bytes, "seed": seed, "num_threads": num_threads}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    work_dir = Path(work_dir)
    model_path = work_dir / SPM_FILE
    info_path = work_dir / SPM_TRAIN_INFO
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        info = None
    if info and info.get("key") == key and model_path.is_file():
        tok = SentencePieceTokenizer.from_file(model_path)
        if tok.fingerprint == info.get("fingerprint"):
            logger.info("reusing the SentencePiece tokenizer in %s", work_dir)
            return tok
        logger.warning("%s does not match %s; retraining", model_path, info_path)
    start = time.perf_counter()
    logger.info("training a %s SentencePiece tokenizer (vocab %d) on %d documents, %.1f MB",
                tok_cfg.model_type, tok_cfg.vocab_size, len(docs), nbytes / 1e6)
    tok = train_sentencepiece(docs, tok_cfg.vocab_size, tok_cfg.model_type, seed=seed, num_threads=num_threads)
    elapsed = time.perf_counter() - start
    logger.info("trained the tokenizer in %.1f s", elapsed)
    # Remove the old record first: a crash between the two writes must not pair a new model with it.
    info_path.unlink(missing_ok=True)
    tok.save(work_dir)
    record = {"key": key, "fingerprint": tok.fingerprint, "settings": settings, "documents": len(docs),
              "bytes": nbytes, "train_seconds": round(elapsed, 3)}
    write_json_atomic(info_path, record, sort_keys=False)
    return SentencePieceTokenizer.from_file(model_path)
