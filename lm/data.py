"""Sources → cleaned documents → train/validation split, written once under a content digest.

A corpus directory holds ``train.txt``, ``val.txt`` and ``manifest.json``; its name is the digest of
its contents, so the same documents and split always land in the same place.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from lm.atomic import atomic_dir
from lm.config import DataConfig
from lm.corpora.shakespeare import Document, load_plays

DOC_SEPARATOR = "\n\n"


class DataError(ValueError):
    """Bad or insufficient input data; the message names the source and the counts."""


@dataclass(frozen=True)
class Corpus:
    """A materialised, split corpus on disk."""

    path: Path
    digest: str
    documents: int
    train_chars: int
    val_chars: int

    @property
    def train_path(self) -> Path:
        return self.path / "train.txt"

    @property
    def val_path(self) -> Path:
        return self.path / "val.txt"


def load_documents(cfg: DataConfig) -> list[Document]:
    """The cleaned documents a data config selects, in a deterministic order."""
    match cfg.source:
        case "builtin":
            docs = load_plays(plays=cfg.plays, stage_directions=cfg.stage_directions)
    return [d for d in docs if d.text.strip()]


def split_tail(text: str, val_fraction: float) -> tuple[str, str]:
    """Split at a line boundary so that roughly the last ``val_fraction`` of the text is validation."""
    cut = int(len(text) * (1.0 - val_fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    return text[:cut], text[cut:]


def corpus_digest(train: str, val: str) -> str:
    """sha256 over the cleaned text and its split assignment."""
    h = hashlib.sha256()
    for name, part in (("train", train), ("val", val)):
        data = part.encode("utf-8")
        h.update(f"{name}:{len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()


def build_corpus(cfg: DataConfig, root: Path, *, min_val_chars: int = 0) -> Corpus:
    """Load, clean and split the documents of ``cfg`` into ``root/<digest>``; reuse it if present.

    ``min_val_chars`` is the smallest usable validation split (at least one context window + 1).
    """
    docs = load_documents(cfg)
    if not docs:
        raise DataError(f"data source {cfg.source!r} (plays={cfg.plays}) produced no documents")
    text = DOC_SEPARATOR.join(d.text.strip("\n") for d in docs) + "\n"
    if cfg.max_chars is not None:
        text = text[: cfg.max_chars]
    train, val = split_tail(text, cfg.val_fraction)
    if len(val) < min_val_chars or not train:
        raise DataError(
            f"data source {cfg.source!r}: {len(docs)} documents, {len(text)} characters give a "
            f"validation split of {len(val)} characters, fewer than the {min_val_chars} needed "
            "(one context window + 1); raise max_chars or val_fraction, or shorten context_length"
        )
    digest = corpus_digest(train, val)
    target = root / digest[:16]
    corpus = Corpus(target, digest, len(docs), len(train), len(val))
    if _manifest_matches(target, digest):
        return corpus
    manifest = asdict(corpus) | {
        "path": None,
        "source": cfg.source,
        "titles": [d.title for d in docs],
        "train_bytes": len(train.encode()),
        "val_bytes": len(val.encode()),
    }
    with atomic_dir(target) as tmp:
        (tmp / "train.txt").write_text(train, encoding="utf-8")
        (tmp / "val.txt").write_text(val, encoding="utf-8")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return corpus


def _manifest_matches(path: Path, digest: str) -> bool:
    try:
        return json.loads((path / "manifest.json").read_text())["digest"] == digest
    except (OSError, ValueError, KeyError):
        return False


def read_manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


_WS = re.compile(r"[ \t]+\n")


def normalise_newlines(text: str) -> str:
    """CRLF/CR → LF and no trailing spaces."""
    return _WS.sub("\n", text.replace("\r\n", "\n").replace("\r", "\n"))
