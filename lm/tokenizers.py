"""Tokenizers behind one protocol, saved as JSON, plus token shards as numpy memmaps."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from lm.atomic import atomic_dir, atomic_write_bytes
from lm.config import TokenizerConfig

UNK = "\ufffd"


@runtime_checkable
class Tokenizer(Protocol):
    """What the pipeline needs of a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, path: Path) -> None: ...

    def to_json(self) -> str: ...


class CharTokenizer:
    """One id per character of the training text; id 0 is the unknown character (U+FFFD)."""

    kind = "char"

    def __init__(self, chars: Sequence[str]):
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError("CharTokenizer needs distinct single characters")
        self.chars = [UNK] + [c for c in chars if c != UNK]
        self._ids = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        ids = self._ids
        return [ids.get(c, 0) for c in text]

    def encode_array(self, text: str) -> np.ndarray:
        """Vectorised encode for whole corpora: (len(text),) uint16/uint32."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table_size = max(ord(c) for c in self.chars) + 1
        lut = np.zeros(table_size, dtype=np.int64)
        for i, c in enumerate(self.chars):
            lut[ord(c)] = i
        inside = codes < table_size
        out = np.zeros(len(codes), dtype=token_dtype(self.vocab_size))
        out[inside] = lut[codes[inside]]
        return out

    def decode(self, ids: Sequence[int]) -> str:
        chars = self.chars
        return "".join(chars[i] if 0 <= i < len(chars) else UNK for i in ids)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "chars": self.chars}, ensure_ascii=False)

    def save(self, path: Path) -> None:
        atomic_write_bytes(Path(path), self.to_json().encode("utf-8"))


def train_tokenizer(cfg: TokenizerConfig, text: str) -> Tokenizer:
    """Build the tokenizer ``cfg`` describes from the training text."""
    match cfg.kind:
        case "char":
            return CharTokenizer.train(text)


def load_tokenizer(path: Path) -> Tokenizer:
    """Load a tokenizer saved by ``save``; the JSON names its kind."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    match data.get("kind"):
        case "char":
            return CharTokenizer(data["chars"])
        case other:
            raise ValueError(f"{path}: unknown tokenizer kind {other!r}")


def tokenizer_digest(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's saved form."""
    return hashlib.sha256(tok.to_json().encode("utf-8")).hexdigest()


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """uint16 when every id fits, else uint32."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def encode_array(tok: Tokenizer, text: str) -> np.ndarray:
    """Encode a whole split to a flat id array of the smallest fitting dtype."""
    if hasattr(tok, "encode_array"):
        return tok.encode_array(text)
    return np.asarray(tok.encode(text), dtype=token_dtype(tok.vocab_size))


def write_tokens(path: Path, ids: np.ndarray) -> None:
    """Write ids as a raw array file, readable with ``np.memmap`` (see ``open_tokens``)."""
    atomic_write_bytes(Path(path), np.ascontiguousarray(ids).tobytes())


def open_tokens(path: Path, dtype: str) -> np.memmap:
    """Memory-map a token file written by ``write_tokens``."""
    return np.memmap(path, dtype=np.dtype(dtype), mode="r")


TOKENIZE_VERSION = "1"  # bump when tokenization output changes for the same inputs


def tokenize_corpus(train_path: Path, val_path: Path, data_digest: str, cfg: TokenizerConfig, root: Path) -> dict:
    """Train the tokenizer on the training split and write both splits as token files.

    Output ``root/<key>/``: ``tokenizer.json``, ``train.bin``, ``val.bin``, ``manifest.json``. The key
    digests the data digest, the tokenizer config and ``TOKENIZE_VERSION``; an existing complete
    directory is reused. Returns the manifest.
    """
    key = hashlib.sha256(f"{data_digest}|{cfg.digest()}|{TOKENIZE_VERSION}".encode()).hexdigest()
    target = Path(root) / key[:16]
    manifest_path = target / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("key") == key:
            return manifest | {"path": str(target)}
    train_text = Path(train_path).read_text(encoding="utf-8")
    val_text = Path(val_path).read_text(encoding="utf-8")
    tok = train_tokenizer(cfg, train_text)
    train_ids, val_ids = encode_array(tok, train_text), encode_array(tok, val_text)
    manifest = {
        "key": key,
        "data_digest": data_digest,
        "tokenizer_digest": tokenizer_digest(tok),
        "vocab_size": tok.vocab_size,
        "dtype": np.dtype(train_ids.dtype).name,
        "train_tokens": int(train_ids.size),
        "val_tokens": int(val_ids.size),
        "train_chars": len(train_text),
        "val_chars": len(val_text),
        "val_bytes": len(val_text.encode("utf-8")),
    }
    with atomic_dir(target) as tmp:
        tok.save(tmp / "tokenizer.json")
        write_tokens(tmp / "train.bin", train_ids)
        write_tokens(tmp / "val.bin", val_ids)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest | {"path": str(target)}
