"""Sources → cleaned documents → train/validation/test split, streamed to disk once under a content digest.

A corpus directory ``<root>/<digest[:16]>`` holds ``train.txt``, ``val.txt`` (``test.txt``) and
``manifest.json``. The ingest cache key digests what the corpus depends on — the source spec, the
source files' contents, the cleaning and split configs and this code — and ``<root>/index/<key>.json``
points at the corpus it produced (``lm.cache``, by content).

Documents stream from the source through cleaning into the split files one at a time: memory holds one
document and a block of text, never the corpus (a `tail` split is written whole first and cut where the
fractions fall). A hit is checked against the manifest's file sizes; ``verify_corpus`` re-hashes the files
against their recorded digests (``lmp plan --verify``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import unicodedata
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from lm import sources
from lm.cache import MANIFEST, Entry, StageCache, inputs_key
from lm.config import CleanConfig, DataConfig, SplitConfig
from lm.corpora.shakespeare import Document
from lm.errors import DataError
from lm.textstream import byte_blocks, copy_range
from lm.versions import code_digest

DOC_SEPARATOR = "\n\n"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Corpus:
    """A materialised, split corpus on disk."""

    path: Path
    digest: str
    documents: int
    chars: dict[str, int]
    cached: bool = False

    def split_path(self, split: str) -> Path:
        return self.path / f"{split}.txt"


# ---------------------------------------------------------------- cleaning


def clean_documents(docs: Iterable[Document], cfg: CleanConfig, counts: dict[str, int]) -> Iterator[Document]:
    """Normalise newlines and Unicode, drop short and duplicate documents, one document at a time; ``counts``
    holds each step's count so far (final once the documents are exhausted)."""
    counts.update(documents_loaded=0, after_dropping_empty=0, after_min_chars=0, after_dedupe=0)
    seen: set[bytes] = set()
    for d in docs:
        counts["documents_loaded"] += 1
        text = d.text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
        if cfg.unicode != "none":
            text = unicodedata.normalize(cfg.unicode, text)
        text = text.strip("\n")
        if not text.strip():
            continue
        counts["after_dropping_empty"] += 1
        if len(text) < cfg.min_chars:
            continue
        counts["after_min_chars"] += 1
        if cfg.dedupe:
            h = hashlib.sha256(text.encode()).digest()
            if h in seen:
                continue
            seen.add(h)
        counts["after_dedupe"] += 1
        yield Document(d.title, d.genre, text)


def clean(docs: list[Document], cfg: CleanConfig) -> tuple[list[Document], dict[str, int]]:
    """``clean_documents`` of a list: the kept documents and the step counts."""
    counts: dict[str, int] = {}
    return list(clean_documents(docs, cfg, counts)), counts


# ---------------------------------------------------------------- splitting, streamed to files


def tail_cut(length: int, fraction: float, rfind_newline: Callable[[int], int]) -> int:
    """Where a text of ``length`` characters is cut so that roughly its last ``fraction`` is the second part:
    just after the last line end before that point (``rfind_newline(end)``: the index of the last ``\\n``
    before ``end``, or -1)."""
    if fraction <= 0:
        return length
    cut = int(length * (1.0 - fraction))
    newline = rfind_newline(cut)
    return newline + 1 if newline > 0 else cut


def split_tail(text: str, fraction: float) -> tuple[str, str]:
    """Split at a line boundary so that roughly the last ``fraction`` of the text is the second part."""
    cut = tail_cut(len(text), fraction, lambda end: text.rfind("\n", 0, end))
    return text[:cut], text[cut:]


def document_split(doc: Document, cfg: SplitConfig) -> str:
    """The split a whole document belongs to: a seeded hash of its content, stable across runs."""
    h = hashlib.sha256(f"{cfg.seed}\0{doc.text}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    if u < cfg.test_fraction:
        return "test"
    return "val" if u < cfg.test_fraction + cfg.val_fraction else "train"


class _TextFile:
    """A UTF-8 file written piece by piece, counting characters and bytes; it remembers where each piece
    starts, so a character position can be found again without reading the file whole."""

    def __init__(self, path: Path, max_chars: int | None = None):
        self.path, self.max_chars = Path(path), max_chars
        self.file = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self.chars = self.bytes = 0
        self.starts: tuple[list[int], list[int]] = ([], [])  # (characters, bytes) before each piece

    def write(self, text: str) -> None:
        """Append ``text`` (cut so the file stays within ``max_chars``)."""
        if self.max_chars is not None:
            text = text[: max(self.max_chars - self.chars, 0)]
        if not text:
            return
        data = text.encode("utf-8")
        self.starts[0].append(self.chars)
        self.starts[1].append(self.bytes)
        self.file.write(data)
        self.chars += len(text)
        self.bytes += len(data)

    def close(self) -> None:
        self.file.close()

    def _piece(self, j: int) -> str:
        end = self.starts[1][j + 1] if j + 1 < len(self.starts[1]) else self.bytes
        with open(self.path, "rb") as f:
            f.seek(self.starts[1][j])
            return f.read(end - self.starts[1][j]).decode("utf-8")

    def rfind_newline(self, end: int) -> int:
        """The character index of the last ``\\n`` before ``end``, or -1 (reads back one piece at a time)."""
        j = bisect_right(self.starts[0], end - 1) - 1
        while j >= 0:
            start = self.starts[0][j]
            i = self._piece(j).rfind("\n", 0, end - start)
            if i >= 0:
                return start + i
            end, j = start, j - 1
        return -1

    def byte_offset(self, char: int) -> int:
        """The byte offset of character ``char`` (``chars`` for the end)."""
        if char >= self.chars:
            return self.bytes
        j = bisect_right(self.starts[0], char) - 1
        return self.starts[1][j] + len(self._piece(j)[: char - self.starts[0][j]].encode("utf-8"))


def write_splits(docs: Iterable[Document], cfg: SplitConfig, max_chars: int | None, out: Path) -> dict[str, int]:
    """Write the train / val / test text the split ``cfg`` describes into ``out/<split>.txt`` (an empty split:
    no file), streaming: `tail` writes the documents joined, then cuts at the fractions; `documents` appends
    each document to the split its hash names. Returns each written split's length in characters."""
    out = Path(out)
    if cfg.kind == "tail":
        whole = _TextFile(out / "train.txt", max_chars)
        for d in docs:
            whole.write((DOC_SEPARATOR if whole.chars else "") + d.text)
        whole.write("\n" if whole.chars else "")
        whole.close()
        test = tail_cut(whole.chars, cfg.test_fraction, whole.rfind_newline)
        val = tail_cut(test, cfg.val_fraction / (1.0 - cfg.test_fraction), whole.rfind_newline)
        cuts = {"train": (0, val), "val": (val, test), "test": (test, whole.chars)}
        offsets = {s: (whole.byte_offset(a), whole.byte_offset(b)) for s, (a, b) in cuts.items()}
        for split in ("val", "test"):
            with open(out / f"{split}.txt", "wb") as f:
                copy_range(whole.path, f, *offsets[split])
        os.truncate(whole.path, offsets["train"][1])
        chars = {s: b - a for s, (a, b) in cuts.items()}
    else:
        files = {s: _TextFile(out / f"{s}.txt") for s in SPLITS}
        total = 0
        for d in docs:
            if max_chars and total >= max_chars:
                continue  # read on: the cleaning counts cover every document, as the manifest says
            file = files[document_split(d, cfg)]
            file.write((DOC_SEPARATOR if file.chars else "") + d.text)
            total += len(d.text)
        for file in files.values():
            file.write("\n" if file.chars else "")
            file.close()
        chars = {s: f.chars for s, f in files.items()}
    for split, n in chars.items():
        if not n:
            (out / f"{split}.txt").unlink(missing_ok=True)
    return {s: n for s, n in chars.items() if n}


def split(docs: list[Document], cfg: SplitConfig, max_chars: int | None) -> dict[str, str]:
    """train / val / test text (test may be empty) for the split ``cfg`` describes (``write_splits``, in memory)."""
    with tempfile.TemporaryDirectory() as tmp:
        write_splits(docs, cfg, max_chars, Path(tmp))
        return {s: _read(Path(tmp) / f"{s}.txt") for s in SPLITS}


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def _digests(blocks: Callable[[str], Iterable[bytes]], sizes: dict[str, int]) -> tuple[str, dict[str, str]]:
    """The corpus digest — sha256 over each split's name, byte length and bytes, in ``SPLITS`` order (and so over
    the split assignment) — and each non-empty split's own sha256, from one read of its ``blocks(split)``."""
    h, each = hashlib.sha256(), {}
    for name in SPLITS:
        h.update(f"{name}:{sizes.get(name, 0)}\n".encode())
        if sizes.get(name):
            own = hashlib.sha256()
            for block in blocks(name):
                h.update(block)
                own.update(block)
            each[name] = own.hexdigest()
    return h.hexdigest(), each


def corpus_digest(texts: dict[str, str]) -> str:
    """The corpus digest of split texts held in memory."""
    data = {s: t.encode("utf-8") for s, t in texts.items()}
    return _digests(lambda s: [data[s]], {s: len(b) for s, b in data.items()})[0]


def file_digests(path: Path, sizes: dict[str, int]) -> tuple[str, dict[str, str]]:
    """The corpus digest and each split's sha256 of the split files under ``path`` (read block by block)."""
    return _digests(lambda split: byte_blocks(Path(path) / f"{split}.txt"), sizes)


# ---------------------------------------------------------------- the ingest stage, cached


def ingest_inputs(cfg: DataConfig, base_dir: Path, *, root: Path | None = None) -> dict:
    """Everything the corpus depends on, as JSON: the cache key is its digest; `lmp plan` diffs it. ``root``: the
    corpus cache, where source-file digests are remembered by ``stat`` signature (None: every file is read)."""
    memo = None if root is None else Path(root) / "cache" / "source-digests.json"
    return {
        "source": cfg.model_dump(mode="json", exclude={"clean", "split", "max_chars"}),
        "source_files": sources.fingerprint(cfg, Path(base_dir), memo=memo),
        "clean": cfg.clean.model_dump(mode="json"),
        "split": cfg.split.model_dump(mode="json"),
        "max_chars": cfg.max_chars,
        "code": code_digest("lm.data", "lm.sources", "lm.textstream", "lm.corpora.shakespeare"),
    }


def _intact(entry: Entry) -> bool:
    """The corpus files are where the manifest says, at its sizes (a truncated, extended or missing file: rebuild).
    Contents are re-hashed on demand only (``verify_corpus``): a hit costs a few ``stat`` calls at any size."""
    path, manifest = entry.path, entry.manifest
    sizes = {s: path.joinpath(f"{s}.txt").stat().st_size for s in manifest["chars"]}
    return isinstance(manifest["documents"], int) and sizes == manifest["bytes"]


def verify_corpus(root: Path, key: str) -> list[str] | None:
    """Re-hash the corpus cached under ``key`` against its manifest: what differs (empty when intact), or None
    when nothing usable is cached. A damaged corpus is set aside (its manifest renamed ``manifest.json.damaged``)
    so the next run rebuilds it."""
    entry = _cache(root).find(key)
    if entry is None:
        return None
    manifest = entry.manifest
    digest, each = file_digests(entry.path, manifest["bytes"])
    recorded = manifest.get("sha256", {})  # corpora written before per-file digests have the corpus digest only
    problems = [f"{s}.txt: sha256 {each[s][:12]}… differs from the recorded {recorded[s][:12]}…"
                for s in each if s in recorded and recorded[s] != each[s]]  # fmt: skip
    if digest != entry.digest and not problems:
        problems.append(f"the corpus digest {digest[:12]}… differs from the recorded {entry.digest[:12]}…")
    if problems:
        set_aside(entry.path)
    return problems


def set_aside(path: Path) -> None:
    """Mark a cached result damaged: its manifest renamed, so lookups miss and the next build replaces it whole."""
    manifest = Path(path) / MANIFEST
    manifest.rename(manifest.with_name(MANIFEST + ".damaged"))


def _cache(root: Path) -> StageCache:
    return StageCache(Path(root), _intact, by_content=True)


def _corpus(entry: Entry) -> Corpus:
    m = entry.manifest
    return Corpus(entry.path, entry.digest, m["documents"], m["chars"], cached=entry.cached)


def cached_corpus(root: Path, key: str) -> Corpus | None:
    """The corpus an earlier ingest with this key produced, if it is still intact on disk."""
    entry = _cache(root).find(key)
    return None if entry is None else _corpus(entry)


def build_corpus(cfg: DataConfig, root: Path, *, base_dir: Path, min_chars: int = 2) -> tuple[Corpus, dict]:
    """Load, clean and split into ``root/<digest>``, or reuse the cached result. Returns (corpus, report).

    ``min_chars``: every non-empty split must exceed this (a context window + 1), else DataError.
    """
    root = Path(root)
    inputs = ingest_inputs(cfg, base_dir, root=root)
    key = inputs_key(inputs)
    entry = _cache(root).get_or_build(
        inputs, lambda tmp: _build(cfg, root, key, tmp, base_dir=base_dir, min_chars=min_chars)
    )
    report = {"cached": entry.cached, "key": key}
    if not entry.cached:
        report |= {k: entry.manifest[k] for k in ("counts", "skipped", "replaced_chars")}
    return _corpus(entry), report | {"inputs": inputs}


def _build(cfg: DataConfig, root: Path, key: str, tmp: Path, *, base_dir: Path, min_chars: int) -> dict:
    """``build_corpus`` after a cache miss, holding the key's lock: the split texts into ``tmp``; the manifest."""
    report, counts, titles, genres = sources.LoadReport(), {}, [], []
    name = sources.describe(cfg)
    docs = clean_documents(sources.iter_documents(cfg, Path(base_dir), root / "cache", report), cfg.clean, counts)

    def noted(docs: Iterable[Document]) -> Iterator[Document]:
        for d in docs:
            titles.append(d.title)
            genres.append(d.genre)
            yield d

    chars = write_splits(noted(docs), cfg.split, cfg.max_chars, tmp)
    if not counts["documents_loaded"]:
        raise DataError(f"data source {name} produced no documents ({len(report.skipped)} files skipped)")
    if not titles:
        raise DataError(f"data source {name}: every document was filtered out by cleaning ({counts})")
    _check_sizes(name, chars, cfg.split, min_chars, len(titles))
    sizes = {s: (tmp / f"{s}.txt").stat().st_size for s in chars}
    digest, each = file_digests(tmp, sizes)
    return {
        "digest": digest,
        "source": name,
        "documents": len(titles),
        "chars": chars,
        "bytes": sizes,
        "sha256": each,
        "titles": titles,
        "genres": genres,
        "cached": False,
        "key": key,
        "counts": counts,
        "skipped": report.skipped,
        "replaced_chars": report.replaced_chars,
    }


def _check_sizes(name: str, chars: dict[str, int], cfg: SplitConfig, min_chars: int, documents: int) -> None:
    wanted = ["train", "val"] + (["test"] if cfg.test_fraction > 0 else [])
    short = {s: chars.get(s, 0) for s in wanted if chars.get(s, 0) < min_chars}
    if short:
        sizes = ", ".join(f"{s}: {n} characters" for s, n in short.items())
        raise DataError(
            f"data source {name}: {documents} documents, {sum(chars.values())} characters; split "
            f"too short ({sizes}), each needs more than {min_chars - 1} (one context window + 1). Add data, "
            "raise the split fractions or max_chars, or shorten model.context_length"
        )


def summary(corpus: Corpus, report: dict) -> dict:
    """JSON-serialisable result of the ingest stage."""
    return asdict(corpus) | {"path": str(corpus.path)} | report
