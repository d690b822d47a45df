"""The tokenize stage: token files per split (numpy memmaps) under a content-addressed, verified cache.

``<root>/<key[:16]>/`` holds ``tokenizer.json``, ``<split>.bin`` (uint16, or uint32 for vocabularies
over 65,536) and ``manifest.json``. The key digests the data digest, the tokenizer config and the
tokenizer code (``lm.cache``, by key).

Each split is cut into shards of about ``DataWorkers.shard_mb`` at line-chunk boundaries
(``lm.textstream.LINES_PER_CHUNK``), so the ids are the same whole or sharded; shards are encoded block by
block by local processes or Dask workers (``lm.parallel``) and joined into ``<split>.bin`` — one sequence,
read as a memmap. The manifest records every shard's token count and sha256: a hit is checked by file sizes
(and the tokenizer's digest); ``verify_tokens`` re-hashes the shards on demand (``lmp plan --verify``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from lm.atomic import atomic_write_bytes
from lm.cache import Entry, StageCache, inputs_key
from lm.config import DataWorkers, TokenizerConfig
from lm.data import set_aside
from lm.errors import DataError
from lm.parallel import run_jobs
from lm.textstream import chunk_ends, copy_range, line_blocks, sha256_file, text_chunks
from lm.tokenizers import (
    CharTokenizer,
    Tokenizer,
    batched,
    line_chunks,
    load_tokenizer,
    token_dtype,
    tokenizer_digest,
    train_tokenizer,
)
from lm.versions import code_digest

SAMPLE_WINDOWS = 64
"""The training sample of a large split: this many evenly spaced windows, cut at line ends."""


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
        "code": code_digest("lm.tokenizers", "lm.shards", "lm.textstream"),
    }


def _cache(root: Path, key: str) -> StageCache:
    def intact(entry: Entry) -> bool:
        """Same key, every token file its recorded size, the tokenizer the one that wrote them (contents are
        re-hashed on demand only: ``verify_tokens``)."""
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


def verify_tokens(root: Path, key: str) -> list[str] | None:
    """Re-hash every shard of the tokens cached under ``key`` against the manifest: what differs (empty when
    intact), or None when nothing usable is cached. Damaged tokens are set aside so the next run rebuilds them."""
    entry = _cache(root, key).find(key)
    if entry is None:
        return None
    manifest, problems = entry.manifest, []
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split, shards in manifest.get("shards", {}).items():  # token files written before shards: sizes only
        start = 0
        for i, shard in enumerate(shards):
            end = start + shard["tokens"]
            if sha256_file(entry.path / f"{split}.bin", start * itemsize, end * itemsize) != shard["sha256"]:
                problems.append(
                    f"{split}.bin shard {i} (tokens {start:,}–{end - 1:,}): sha256 differs from the manifest"
                )
            start = end
    if problems:
        set_aside(entry.path)
    return problems


def tokenize_corpus(
    corpus_dir: Path, data_digest: str, cfg: TokenizerConfig | Tokenizer, root: Path, *, min_tokens: int = 2,
    workers: DataWorkers = DataWorkers(),
) -> dict:  # fmt: skip
    """Train the tokenizer on the training split only (or use ``cfg`` when it is a tokenizer) and write every
    split as a token file, shard by shard as ``workers`` says.

    ``min_tokens``: each split must hold at least this many tokens (a context window + 1).
    Returns the manifest with ``path`` and ``cached``.
    """
    inputs = tokenize_inputs(data_digest, cfg)
    key = inputs_key(inputs)
    entry = _cache(root, key).get_or_build(
        inputs, lambda tmp: _build(Path(corpus_dir), data_digest, cfg, key, tmp, min_tokens, workers)
    )
    return entry.manifest | {"path": str(entry.path), "cached": entry.cached, "inputs": inputs}


def _build(
    corpus_dir: Path, data_digest: str, cfg: TokenizerConfig | Tokenizer, key: str, tmp: Path, min_tokens: int,
    workers: DataWorkers,
) -> dict:  # fmt: skip
    """``tokenize_corpus`` after a cache miss, holding the key's lock: the files into ``tmp``; the manifest."""
    texts = {p.stem: p for p in sorted(corpus_dir.glob("*.txt"))}
    shard_bytes = int(workers.shard_mb * (1 << 20))
    plan = {split: shard_ranges(path, shard_bytes) for split, path in texts.items()}
    # a corpus of one shard (most) is worked on here, at once: starting processes would cost more than they save
    small = sum(map(len, plan.values())) <= len(plan) and sum(p.stat().st_size for p in texts.values()) <= shard_bytes
    spread = {"processes": 1 if small else workers.processes,
              "scheduler_address": None if small else workers.scheduler_address}  # fmt: skip
    if isinstance(cfg, Tokenizer):
        tok, sample = cfg, None
    else:
        if cfg.kind == "char":  # a char vocabulary is a set of characters: the union of the shards', found in parallel
            jobs = [{"text": str(texts["train"]), "start": a, "end": b} for a, b in plan["train"]]
            chunks = ["".join(set().union(*run_jobs(scan_chars, jobs, **spread)))]
            sample = {"bytes": texts["train"].stat().st_size, "of_bytes": texts["train"].stat().st_size, "windows": 1}
        else:
            chunks, sample = training_sample(texts["train"], cfg.train_sample_mb)
        tok = train_tokenizer(cfg, chunks)
    tok.save(tmp / "tokenizer.json")
    jobs = [
        {"tokenizer": str(tmp / "tokenizer.json"), "text": str(texts[split]), "start": start, "end": end,
         "out": str(tmp / f"{split}.{i:05d}.bin")}
        for split, ranges in plan.items() for i, (start, end) in enumerate(ranges)
    ]  # fmt: skip
    results = iter(run_jobs(encode_shard, jobs, **spread))
    shards = {split: [next(results) for _ in ranges] for split, ranges in plan.items()}
    tokens = {s: sum(r["tokens"] for r in rs) for s, rs in shards.items()}
    short = {s: n for s, n in tokens.items() if n < min_tokens}
    if short:
        raise DataError(
            f"after tokenizing ({tok.kind}, vocabulary {tok.vocab_size}), splits too short for the model: "
            f"{short} tokens, each needs at least {min_tokens} (context_length + 1); add data or shorten the context"
        )
    for split, ranges in plan.items():
        _join([tmp / f"{split}.{i:05d}.bin" for i in range(len(ranges))], tmp / f"{split}.bin")
    unknown = {s: sum(r["unknown"] for r in rs) for s, rs in shards.items()}
    return {
        "key": key,
        "data_digest": data_digest,
        "tokenizer": tok.kind,
        "tokenizer_digest": tokenizer_digest(tok),
        "vocab_size": tok.vocab_size,
        "dtype": np.dtype(token_dtype(tok.vocab_size)).name,
        "tokens": tokens,
        "chars": {s: sum(r["chars"] for r in rs) for s, rs in shards.items()},
        "bytes": {s: p.stat().st_size for s, p in texts.items()},
        # a word tokenizer's <unk> share per split ({} for tokenizers without an unknown token)
        "oov_rate": {s: unknown[s] / n if n else 0.0 for s, n in tokens.items()} if tok.unk_id is not None else {},
        "shards": {s: [{"tokens": r["tokens"], "sha256": r["sha256"]} for r in rs] for s, rs in shards.items()},
        "train_sample": sample,
    }


def shard_ranges(path: Path, shard_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges cutting the UTF-8 file into shards of at least ``shard_bytes`` (the last may be shorter),
    each ending at a chunk boundary (``lm.textstream.chunk_ends``): one range when the file is that small."""
    size = Path(path).stat().st_size
    if size <= shard_bytes:
        return [(0, size)]
    ranges, start, offset, lines = [], 0, 0, 0
    for block in line_blocks(path):
        ends, n = chunk_ends(block, lines)
        for end in (offset + ends).tolist():
            if end - start >= shard_bytes and end < size:
                ranges.append((start, end))
                start = end
        lines, offset = lines + n, offset + len(block)
    return [*ranges, (start, size)]


def scan_chars(job: dict, *, alone: bool) -> list[str]:
    """The characters in the bytes ``[start, end)`` of a split file (a char tokenizer's share of its vocabulary)."""
    return CharTokenizer.from_chunks(
        "".join(b) for b in batched(text_chunks(Path(job["text"]), job["start"], job["end"]))
    ).chars


def encode_shard(job: dict, *, alone: bool) -> dict:
    """Encode the bytes ``[start, end)`` of a split file into ``out``, block by block: the token count, the
    sha256 of the tokens' bytes, the characters covered and how many ids are the tokenizer's unknown token.
    ``alone``: this process has the machine to itself, so the tokenizer may use all cores."""
    if not alone:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per job: the jobs are the parallelism
    tok = load_tokenizer(Path(job["tokenizer"]))
    h, tokens, chars, unknown = hashlib.sha256(), 0, 0, 0
    with open(job["out"], "wb") as out:
        for batch in batched(text_chunks(Path(job["text"]), job["start"], job["end"])):
            ids = tok.encode_chunks(batch)
            data = ids.tobytes()
            out.write(data)
            h.update(data)
            tokens, chars = tokens + ids.size, chars + sum(map(len, batch))
            if tok.unk_id is not None:
                unknown += int(np.count_nonzero(ids == tok.unk_id))
    return {"tokens": tokens, "sha256": h.hexdigest(), "chars": chars, "unknown": unknown}


def _join(parts: list[Path], target: Path) -> None:
    """The shard files, in order, as one file (one shard: renamed)."""
    if len(parts) == 1:
        os.replace(parts[0], target)
        return
    with open(target, "wb") as out:
        for part in parts:
            copy_range(part, out)
            part.unlink()


def training_sample(path: Path, sample_mb: int | None) -> tuple[Iterable[str], dict]:
    """The training split as line chunks to train a tokenizer on, and what was used: the whole split when it
    fits ``sample_mb`` (or no limit is set), else ``SAMPLE_WINDOWS`` evenly spaced windows of ``sample_mb`` in
    all, each cut at line ends."""
    size = Path(path).stat().st_size
    if sample_mb is None or size <= sample_mb << 20:
        return text_chunks(path), {"bytes": size, "of_bytes": size, "windows": 1}
    window = (sample_mb << 20) // SAMPLE_WINDOWS
    stride, h, texts, used = size / SAMPLE_WINDOWS, hashlib.sha256(), [], 0
    with open(path, "rb") as f:
        for i in range(SAMPLE_WINDOWS):
            f.seek(int(i * stride))
            data = f.read(window)
            data = data[data.find(b"\n") + 1 if i else 0 : data.rfind(b"\n") + 1]  # whole lines only
            h.update(data)
            texts.append(data.decode("utf-8"))
            used += len(data)
    chunks = (chunk for text in texts for chunk in line_chunks(text))
    return chunks, {"bytes": used, "of_bytes": size, "windows": SAMPLE_WINDOWS, "sha256": h.hexdigest()}


def check_vocabulary(tokens: np.ndarray, vocab_size: int, *, tokenizer_digest: str, model_vocab: int) -> None:
    """Fail fast when token ids do not fit the model's embedding (tokenizer/model mismatch)."""
    top = int(tokens.max()) if tokens.size else -1
    if vocab_size != model_vocab or top >= model_vocab:
        raise DataError(
            f"tokenizer/model vocabulary mismatch: tokenizer {tokenizer_digest[:12]} has {vocab_size} ids "
            f"(largest id in the data: {top}), the model has {model_vocab}; retrain or rebuild with the same tokenizer"
        )
