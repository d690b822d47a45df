"""Tokenizers behind one protocol, saved as JSON: characters, or byte-level BPE (HF `tokenizers`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from lm.atomic import atomic_write_bytes
from lm.config import BPETokenizerConfig, TokenizerConfig

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


class BPETokenizer:
    """Byte-level BPE from HF `tokenizers`: lossless on any text; saved in HF's own tokenizer.json format."""

    kind = "bpe"

    def __init__(self, hf):
        self.hf = hf

    @classmethod
    def train(cls, text: str, cfg: BPETokenizerConfig) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

        hf = HFTokenizer(models.BPE())
        if cfg.normalization != "none":
            hf.normalizer = getattr(normalizers, cfg.normalization)()
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_frequency,
            special_tokens=list(cfg.special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(_line_chunks(text), trainer=trainer)
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def encode_array(self, text: str) -> np.ndarray:
        """Encode in line-aligned chunks, in parallel (line ends are pre-token boundaries)."""
        chunks = list(_line_chunks(text))
        ids = [np.asarray(e.ids, dtype=np.int64) for e in self.hf.encode_batch(chunks)]
        flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        return flat.astype(token_dtype(self.vocab_size))

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        return self.hf.to_str()

    def save(self, path: Path) -> None:
        atomic_write_bytes(Path(path), self.to_json().encode("utf-8"))


def _line_chunks(text: str, lines_per_chunk: int = 256):
    lines = text.splitlines(keepends=True)
    for i in range(0, len(lines), lines_per_chunk):
        yield "".join(lines[i : i + lines_per_chunk])


def train_tokenizer(cfg: TokenizerConfig, text: str) -> Tokenizer:
    """Build the tokenizer ``cfg`` describes from the training text."""
    match cfg.kind:
        case "char":
            return CharTokenizer.train(text)
        case "bpe":
            return BPETokenizer.train(text, cfg)
    raise ValueError(f"unknown tokenizer kind {cfg.kind!r}")


def load_tokenizer(path: Path) -> Tokenizer:
    """Load a tokenizer saved by ``save``: our char JSON, or an HF tokenizer.json."""
    text = Path(path).read_text(encoding="utf-8")
    data = json.loads(text)
    if data.get("kind") == "char":
        return CharTokenizer(data["chars"])
    if isinstance(data.get("model"), dict) and data["model"].get("type") == "BPE":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(text))
    raise ValueError(f"{path}: unknown tokenizer kind {data.get('kind') or data.get('model', {}).get('type')!r}")


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
