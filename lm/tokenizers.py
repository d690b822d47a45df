"""Tokenizers behind one protocol, saved as JSON: characters, or byte-level BPE and words (HF `tokenizers`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from lm.atomic import atomic_write_bytes
from lm.config import BPETokenizerConfig, TokenizerConfig, WordTokenizerConfig
from lm.textstream import chunk_ends

UNK = "\ufffd"
"""The char tokenizer's unknown character (id 0)."""
WORD_UNK = "<unk>"
"""The word tokenizer's unknown word (id 0)."""
ENCODE_CHARS = 1 << 21
"""Characters encoded at once (≈ 2 M: tens of MB of working memory, whatever the corpus size)."""


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
    unk_id = None  # unknown characters map to id 0, but no out-of-vocabulary rate is reported for them

    def __init__(self, chars: Sequence[str]):
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError("CharTokenizer needs distinct single characters")
        self.chars = [UNK] + [c for c in chars if c != UNK]
        self._ids = {c: i for i, c in enumerate(self.chars)}
        self._lut: np.ndarray | None = None

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        return cls.from_chunks([text])

    @classmethod
    def from_chunks(cls, chunks: Iterable[str]) -> CharTokenizer:
        """Every character of the text ``chunks`` hold, counted block by block (the text is never joined)."""
        seen = np.zeros(1 << 16, dtype=bool)
        rare: set[str] = set()  # beyond the Basic Multilingual Plane
        for text in chunks:
            codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            if codes.size and codes.max() >= seen.size:
                rare.update(chr(c) for c in np.unique(codes[codes >= seen.size]).tolist())
                codes = codes[codes < seen.size]
            seen[codes] = True
        return cls([chr(c) for c in np.flatnonzero(seen).tolist()] + sorted(rare))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        ids = self._ids
        return [ids.get(c, 0) for c in text]

    def encode_array(self, text: str) -> np.ndarray:
        """Vectorised encode for whole corpora: (len(text),) uint16/uint32."""
        lut = self._lookup()
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        inside = codes < lut.size
        if inside.all():
            return lut[codes]
        out = np.zeros(len(codes), dtype=lut.dtype)
        out[inside] = lut[codes[inside]]
        return out

    def encode_chunks(self, chunks: list[str]) -> np.ndarray:
        """The ids of the chunks' text, in order (one flat array)."""
        return self.encode_array("".join(chunks))

    def _lookup(self) -> np.ndarray:
        """Code point → id (unknown characters 0), up to the largest code point of the vocabulary."""
        if self._lut is None:
            self._lut = np.zeros(max(ord(c) for c in self.chars) + 1, dtype=token_dtype(self.vocab_size))
            self._lut[[ord(c) for c in self.chars]] = np.arange(len(self.chars))
        return self._lut

    def decode(self, ids: Sequence[int]) -> str:
        chars = self.chars
        return "".join(chars[i] if 0 <= i < len(chars) else UNK for i in ids)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "chars": self.chars}, ensure_ascii=False)

    def save(self, path: Path) -> None:
        atomic_write_bytes(Path(path), self.to_json().encode("utf-8"))


class HFTokenizer:
    """A tokenizer of HF `tokenizers` (``hf``), saved in HF's own tokenizer.json format; subclasses train one."""

    kind: str
    unk_id: int | None = None
    """The id of the unknown token, where out-of-vocabulary rates are reported (word tokenizers)."""

    def __init__(self, hf):
        self.hf = hf

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def encode_array(self, text: str) -> np.ndarray:
        """Encode in line-aligned chunks, in parallel (line ends are pre-token boundaries)."""
        parts = [self.encode_chunks(batch) for batch in batched(line_chunks(text))]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=token_dtype(self.vocab_size))

    def encode_chunks(self, chunks: list[str]) -> np.ndarray:
        """The ids of the line chunks, in order (one flat array), encoded in parallel threads."""
        ids = [np.asarray(e.ids, dtype=np.int64) for e in self.hf.encode_batch_fast(chunks)]
        flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        return flat.astype(token_dtype(self.vocab_size))

    def decode(self, ids: Sequence[int]) -> str:
        """The file's own decoder joins the tokens (none: single spaces between them)."""
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        return self.hf.to_str()

    def save(self, path: Path) -> None:
        atomic_write_bytes(Path(path), self.to_json().encode("utf-8"))


class BPETokenizer(HFTokenizer):
    """Byte-level BPE from HF `tokenizers`: lossless on any text."""

    kind = "bpe"

    @classmethod
    def train(cls, text: str | Iterable[str], cfg: BPETokenizerConfig) -> BPETokenizer:
        """Train on ``text``: a string, or its line chunks (``line_chunks``, ``lm.textstream.text_chunks``)."""
        import tokenizers
        from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

        hf = tokenizers.Tokenizer(models.BPE())
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
        hf.train_from_iterator(as_chunks(text), trainer=trainer)
        return cls(hf)


class WordTokenizer(HFTokenizer):
    """Word-level (HF `tokenizers` WordLevel): one id per word or run of punctuation (``\\w+|[^\\w\\s]+``) kept
    from the training split, id 0 ``<unk>`` for every other. Lossy by nature: whitespace is not kept (decode
    joins tokens with single spaces, line breaks included), lowercased text stays lowercase and an unknown
    word decodes as ``<unk>``.

    Loads any WordLevel tokenizer.json, ours or not (the char tokenizer exported as one WordLevel token per
    character: its decoder fuses the pieces, so it encodes and decodes exactly as ``CharTokenizer``)."""

    kind = "word"

    @classmethod
    def train(cls, text: str | Iterable[str], cfg: WordTokenizerConfig) -> WordTokenizer:
        """Train on ``text``: a string, or its line chunks (``line_chunks``, ``lm.textstream.text_chunks``)."""
        import tokenizers
        from tokenizers import models, normalizers, pre_tokenizers, trainers

        hf = tokenizers.Tokenizer(models.WordLevel(unk_token=WORD_UNK))
        steps = [normalizers.NFC(), normalizers.Lowercase()] if cfg.lowercase else [normalizers.NFC()]
        hf.normalizer = normalizers.Sequence(steps)
        hf.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+|[^\w\s]+: words, punctuation runs; no spaces
        trainer = trainers.WordLevelTrainer(
            vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=[WORD_UNK], show_progress=False
        )
        hf.train_from_iterator(as_chunks(text), trainer=trainer)
        return cls(hf)

    @property
    def unk_id(self) -> int | None:
        """The id unknown words map to: the model's unknown token (0 for ours; None if a file has none)."""
        return self.hf.token_to_id(self.hf.model.unk_token)

    def oov_rate(self, text: str) -> float:
        """Out-of-vocabulary rate: the fraction of ``text``'s tokens that are the unknown token (0 when none)."""
        return unknown_fraction(self.encode_array(text), self.unk_id)


def unknown_fraction(ids: np.ndarray, unk_id: int | None) -> float:
    """The fraction of ``ids`` equal to ``unk_id`` (0.0 for no ids or no unknown id)."""
    if unk_id is None or not ids.size:
        return 0.0
    return float(np.count_nonzero(np.asarray(ids) == unk_id) / ids.size)


def oov_rates(tok: Tokenizer, splits: dict[str, np.ndarray]) -> dict[str, float]:
    """Per split, a word tokenizer's out-of-vocabulary rate over the split's ids; {} for other tokenizers."""
    if tok.unk_id is None:
        return {}
    return {split: unknown_fraction(ids, tok.unk_id) for split, ids in splits.items()}


def line_chunks(text: str) -> list[str]:
    """``text`` cut into chunks of ``LINES_PER_CHUNK`` ``\\n``-ended lines, as ``lm.textstream.text_chunks`` cuts
    a file: the pieces tokenizers are trained on and encode."""
    data = text.encode("utf-8")
    cuts = [0, *chunk_ends(data, 0)[0].tolist()]
    if cuts[-1] != len(data):
        cuts.append(len(data))
    return [data[a:b].decode("utf-8") for a, b in zip(cuts, cuts[1:], strict=False)]


def as_chunks(text: str | Iterable[str]) -> Iterable[str]:
    """Text as the line chunks tokenizers train on: a string is cut (``line_chunks``), chunks pass through."""
    return line_chunks(text) if isinstance(text, str) else text


def batched(chunks: Iterable[str], chars: int = ENCODE_CHARS) -> Iterator[list[str]]:
    """Consecutive chunks grouped into lists of about ``chars`` characters (the unit encoded at once)."""
    batch, size = [], 0
    for chunk in chunks:
        batch.append(chunk)
        size += len(chunk)
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def train_tokenizer(cfg: TokenizerConfig, text: str | Iterable[str]) -> Tokenizer:
    """Build the tokenizer ``cfg`` describes from the training text (a string, or its line chunks)."""
    match cfg.kind:
        case "char":
            return CharTokenizer.from_chunks("".join(batch) for batch in batched(as_chunks(text)))
        case "bpe":
            return BPETokenizer.train(text, cfg)
        case "word":
            return WordTokenizer.train(text, cfg)
    raise ValueError(f"unknown tokenizer kind {cfg.kind!r}")


HF_MODELS: dict[str, type[HFTokenizer]] = {"BPE": BPETokenizer, "WordLevel": WordTokenizer}
"""An HF tokenizer.json's ``model.type`` → the class that loads it."""


def load_tokenizer(path: Path) -> Tokenizer:
    """Load a tokenizer saved by ``save``: our char JSON, or any HF tokenizer.json of a BPE or WordLevel model."""
    return tokenizer_from_json(Path(path).read_text(encoding="utf-8"), str(path))


def tokenizer_from_json(text: str, path: str = "tokenizer.json") -> Tokenizer:
    """``load_tokenizer`` of a file's text (``path`` names it in the error)."""
    data = json.loads(text)
    if data.get("kind") == "char":
        return CharTokenizer(data["chars"])
    model = data.get("model")
    if isinstance(model, dict) and model.get("type") in HF_MODELS:
        import tokenizers

        return HF_MODELS[model["type"]](tokenizers.Tokenizer.from_str(text))
    raise ValueError(f"{path}: unknown tokenizer kind {data.get('kind') or (model or {}).get('type')!r}")


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
