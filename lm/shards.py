"""The tokenize stage: token files per split (numpy memmaps) under a content-addressed, verified cache.

``<root>/<key[:16]>/`` holds ``tokenizer.json``, ``<split>.bin`` (uint16, or uint32 for vocabularies
over 65,536) and ``manifest.json``. The key digests the data digest, the tokenizer config and the
tokenizer code (``lm.cache``, by key); a hit is checked (file sizes, tokenizer digest) before it is trusted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lm.atomic import atomic_write_bytes
from lm.cache import Entry, StageCache, inputs_key
from lm.config import TokenizerConfig
from lm.errors import DataError
from lm.tokenizers import Tokenizer, encode_array, load_tokenizer, oov_rates, tokenizer_digest, train_tokenizer
from lm.versions import code_digest


def write_tokens(path: Path, ids: np.ndarray) -> None:
    """Write ids as a raw array file, readable with ``np.memmap`` (see ``open_tokens``)."""
    atomic_write_bytes(Path(path), np.ascontiguousarray(ids).tobytes())


def open_tokens(path: Path, dtype: str) -> np.memmap:
    """Memory-map a token file written by ``write_tokens``."""
    return np.memmap(path, dtype=np.dtype(dtype), mode="r")


def tokenize_inputs(data_digest: str, cfg: TokenizerConfig | Tokenizer) -> dict:
    """What the token files depend on; its digest is the cache key and `lmp plan` diffs it. ``cfg``: the
    tokenizer to train, or a trained one to use as it is (an initialising model's: named by its digest)."""
    given = isinstance(cfg, Tokenizer)
    return {
        "data_digest": data_digest,
        "tokenizer": {"given": tokenizer_digest(cfg), "kind": cfg.kind} if given else cfg.model_dump(mode="json"),
        "code": code_digest("lm.tokenizers", "lm.shards"),
    }


def _cache(root: Path, key: str) -> StageCache:
    def intact(entry: Entry) -> bool:
        """Same key, every token file its recorded size, the tokenizer the one that wrote them."""
        manifest, path = entry.manifest, entry.path
        if manifest["key"] != key:
            return False
        itemsize = np.dtype(manifest["dtype"]).itemsize
        if any((path / f"{split}.bin").stat().st_size != n * itemsize for split, n in manifest["tokens"].items()):
            return False
        return tokenizer_digest(load_tokenizer(path / "tokenizer.json")) == manifest["tokenizer_digest"]

    return StageCache(Path(root), intact)


def cached_tokens(root: Path, key: str) -> dict | None:
    """The manifest of an intact earlier result for ``key``, else None."""
    entry = _cache(root, key).find(key)
    return None if entry is None else entry.manifest | {"path": str(entry.path), "cached": True}


def tokenize_corpus(
    corpus_dir: Path, data_digest: str, cfg: TokenizerConfig | Tokenizer, root: Path, *, min_tokens: int = 2
) -> dict:
    """Train the tokenizer on the training split only (or use ``cfg`` when it is a tokenizer) and write every
    split as a token file.

    ``min_tokens``: each split must hold at least this many tokens (a context window + 1).
    Returns the manifest with ``path`` and ``cached``.
    """
    inputs = tokenize_inputs(data_digest, cfg)
    key = inputs_key(inputs)
    entry = _cache(root, key).get_or_build(
        inputs, lambda tmp: _build(corpus_dir, data_digest, cfg, key, tmp, min_tokens)
    )
    return entry.manifest | {"path": str(entry.path), "cached": entry.cached, "inputs": inputs}


def _build(
    corpus_dir: Path, data_digest: str, cfg: TokenizerConfig | Tokenizer, key: str, tmp: Path, min_tokens: int
) -> dict:
    """``tokenize_corpus`` after a cache miss, holding the key's lock: the files into ``tmp``; the manifest."""
    texts = {p.stem: p.read_text(encoding="utf-8") for p in sorted(Path(corpus_dir).glob("*.txt"))}
    tok = cfg if isinstance(cfg, Tokenizer) else train_tokenizer(cfg, texts["train"])
    ids = {split: encode_array(tok, text) for split, text in texts.items()}
    short = {s: a.size for s, a in ids.items() if a.size < min_tokens}
    if short:
        raise DataError(
            f"after tokenizing ({cfg.kind}, vocabulary {tok.vocab_size}), splits too short for the model: "
            f"{short} tokens, each needs at least {min_tokens} (context_length + 1); add data or shorten the context"
        )
    tok.save(tmp / "tokenizer.json")
    for split, arr in ids.items():
        write_tokens(tmp / f"{split}.bin", arr)
    return {
        "key": key,
        "data_digest": data_digest,
        "tokenizer": tok.kind,
        "tokenizer_digest": tokenizer_digest(tok),
        "vocab_size": tok.vocab_size,
        "dtype": np.dtype(next(iter(ids.values())).dtype).name,
        "tokens": {s: int(a.size) for s, a in ids.items()},
        "chars": {s: len(t) for s, t in texts.items()},
        "bytes": {s: len(t.encode("utf-8")) for s, t in texts.items()},
        "oov_rate": oov_rates(tok, ids),  # a word tokenizer's <unk> share per split ({} for others)
    }


def check_vocabulary(tokens: np.ndarray, vocab_size: int, *, tokenizer_digest: str, model_vocab: int) -> None:
    """Fail fast when token ids do not fit the model's embedding (tokenizer/model mismatch)."""
    top = int(tokens.max()) if tokens.size else -1
    if vocab_size != model_vocab or top >= model_vocab:
        raise DataError(
            f"tokenizer/model vocabulary mismatch: tokenizer {tokenizer_digest[:12]} has {vocab_size} ids "
            f"(largest id in the data: {top}), the model has {model_vocab}; retrain or rebuild with the same tokenizer"
        )
