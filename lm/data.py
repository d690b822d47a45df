"""Sources → cleaned documents → train/validation/test split, written once under a content digest.

A corpus directory ``<root>/<digest[:16]>`` holds ``train.txt``, ``val.txt`` (``test.txt``) and
``manifest.json``. The ingest cache key digests what the corpus depends on — the source spec, the
source files' contents, the cleaning and split configs and this code — and ``<root>/index/<key>.json``
points at the corpus it produced (``lm.cache``, by content). A hit is re-verified against the files on disk
(their digest) before it is trusted.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path

from lm import sources
from lm.cache import Entry, StageCache, inputs_key
from lm.config import CleanConfig, DataConfig, SplitConfig
from lm.corpora.shakespeare import Document
from lm.errors import DataError
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


# ---------------------------------------------------------------- cleaning and splitting


def clean(docs: list[Document], cfg: CleanConfig) -> tuple[list[Document], dict[str, int]]:
    """Normalise newlines and Unicode, drop short and duplicate documents; returns the step counts."""
    counts = {"documents_loaded": len(docs)}
    out = []
    for d in docs:
        text = d.text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
        if cfg.unicode != "none":
            text = unicodedata.normalize(cfg.unicode, text)
        out.append(Document(d.title, d.genre, text.strip("\n")))
    out = [d for d in out if d.text.strip()]
    counts["after_dropping_empty"] = len(out)
    out = [d for d in out if len(d.text) >= cfg.min_chars]
    counts["after_min_chars"] = len(out)
    if cfg.dedupe:
        seen: set[str] = set()
        unique = []
        for d in out:
            h = hashlib.sha256(d.text.encode()).hexdigest()
            if h not in seen:
                seen.add(h)
                unique.append(d)
        out = unique
    counts["after_dedupe"] = len(out)
    return out, counts


def split_tail(text: str, fraction: float) -> tuple[str, str]:
    """Split at a line boundary so that roughly the last ``fraction`` of the text is the second part."""
    if fraction <= 0:
        return text, ""
    cut = int(len(text) * (1.0 - fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    return text[:cut], text[cut:]


def document_split(doc: Document, cfg: SplitConfig) -> str:
    """The split a whole document belongs to: a seeded hash of its content, stable across runs."""
    h = hashlib.sha256(f"{cfg.seed}\0{doc.text}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    if u < cfg.test_fraction:
        return "test"
    return "val" if u < cfg.test_fraction + cfg.val_fraction else "train"


def split(docs: list[Document], cfg: SplitConfig, max_chars: int | None) -> dict[str, str]:
    """train / val / test text (test may be empty) for the split ``cfg`` describes."""
    if cfg.kind == "tail":
        text = DOC_SEPARATOR.join(d.text for d in docs) + "\n"
        text = text[:max_chars] if max_chars else text
        rest, test = split_tail(text, cfg.test_fraction)
        train, val = split_tail(rest, cfg.val_fraction / (1.0 - cfg.test_fraction))
        return {"train": train, "val": val, "test": test}
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    total = 0
    for d in docs:
        if max_chars and total >= max_chars:
            break
        parts[document_split(d, cfg)].append(d.text)
        total += len(d.text)
    return {s: (DOC_SEPARATOR.join(p) + "\n" if p else "") for s, p in parts.items()}


def corpus_digest(texts: dict[str, str]) -> str:
    """sha256 over the cleaned text of every split (and so over the split assignment)."""
    h = hashlib.sha256()
    for name in SPLITS:
        data = texts.get(name, "").encode("utf-8")
        h.update(f"{name}:{len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()


# ---------------------------------------------------------------- the ingest stage, cached


def ingest_inputs(cfg: DataConfig, base_dir: Path) -> dict:
    """Everything the corpus depends on, as JSON: the cache key is its digest; `lmp plan` diffs it."""
    return {
        "source": cfg.model_dump(mode="json", exclude={"clean", "split", "max_chars"}),
        "source_files": sources.fingerprint(cfg, Path(base_dir)),
        "clean": cfg.clean.model_dump(mode="json"),
        "split": cfg.split.model_dump(mode="json"),
        "max_chars": cfg.max_chars,
        "code": code_digest("lm.data", "lm.sources", "lm.corpora.shakespeare"),
    }


def _intact(entry: Entry) -> bool:
    """The corpus files still digest to what the index recorded (edited or truncated: rebuild, never trust)."""
    path, manifest = entry.path, entry.manifest
    texts = {s: path.joinpath(f"{s}.txt").read_text(encoding="utf-8") for s in manifest["chars"]}
    return isinstance(manifest["documents"], int) and corpus_digest(texts) == entry.digest


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
    inputs = ingest_inputs(cfg, base_dir)
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
    docs, load_report = sources.load(cfg, Path(base_dir), root / "cache")
    name = sources.describe(cfg)
    if not docs:
        raise DataError(f"data source {name} produced no documents ({len(load_report.skipped)} files skipped)")
    docs, counts = clean(docs, cfg.clean)
    if not docs:
        raise DataError(f"data source {name}: every document was filtered out by cleaning ({counts})")
    texts = split(docs, cfg.split, cfg.max_chars)
    _check_sizes(name, texts, cfg.split, min_chars, len(docs))
    for s, text in texts.items():
        if text:
            (tmp / f"{s}.txt").write_text(text, encoding="utf-8")
    return {
        "digest": corpus_digest(texts),
        "source": name,
        "documents": len(docs),
        "chars": {s: len(t) for s, t in texts.items() if t},
        "bytes": {s: len(t.encode()) for s, t in texts.items() if t},
        "titles": [d.title for d in docs],
        "genres": [d.genre for d in docs],
        "cached": False,
        "key": key,
        "counts": counts,
        "skipped": load_report.skipped,
        "replaced_chars": load_report.replaced_chars,
    }


def _check_sizes(name: str, texts: dict[str, str], cfg: SplitConfig, min_chars: int, documents: int) -> None:
    wanted = ["train", "val"] + (["test"] if cfg.test_fraction > 0 else [])
    short = {s: len(texts[s]) for s in wanted if len(texts[s]) < min_chars}
    if short:
        sizes = ", ".join(f"{s}: {n} characters" for s, n in short.items())
        raise DataError(
            f"data source {name}: {documents} documents, {sum(map(len, texts.values()))} characters; split "
            f"too short ({sizes}), each needs more than {min_chars - 1} (one context window + 1). Add data, "
            "raise the split fractions or max_chars, or shorten model.context_length"
        )


def summary(corpus: Corpus, report: dict) -> dict:
    """JSON-serialisable result of the ingest stage."""
    return asdict(corpus) | {"path": str(corpus.path)} | report
