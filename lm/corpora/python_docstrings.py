"""Functions of the Python standard library → the first sentence of their docstring (code summarization).

The ``.py`` files of the running interpreter's standard library are read and parsed with `ast`; nothing is
imported or executed (some modules open a browser or print when imported). A function's source is its code
from ``def`` to its end, dedented, without its docstring — nor the docstrings of the functions and classes
nested in it; its target is the docstring's first sentence. Methods and nested functions are functions too.
"""

from __future__ import annotations

import ast
import io
import re
import sys
import sysconfig
import tokenize
import warnings
from collections import Counter
from pathlib import Path

EXCLUDED = frozenset({"test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages"})
TEST_FOLDERS = frozenset({"test", "tests", "idle_test"})
MAX_TARGET_CHARS = 200
MIN_TARGET_WORDS = 3
# A sentence ends at a period, ! or ? followed by whitespace — not the period of "e.g." or "i.e."
_SENTENCE_END = re.compile(r"(?<!e\.g)(?<!i\.e)[.!?](?=\s)")
_FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef
_Owner = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def stdlib() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def python_version() -> str:
    """major.minor.micro of the running interpreter, whose standard library the pairs come from."""
    return ".".join(str(part) for part in sys.version_info[:3])


def modules(root: Path) -> dict[str, list[Path]]:
    """Top-level module or package name → its public ``.py`` files, sorted (no tests, no private ``_*`` files,
    none of ``EXCLUDED``)."""
    out: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        name = entry.stem if entry.suffix == ".py" else entry.name
        if name.startswith("_") or name in EXCLUDED or not name.isidentifier():
            continue
        if entry.is_file() and entry.suffix == ".py":
            out[name] = [entry]
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            files = [
                p
                for p in sorted(entry.rglob("*.py"))
                if not TEST_FOLDERS & set(p.relative_to(entry).parts[:-1])
                and (p.name == "__init__.py" or not p.name.startswith("_"))
            ]
            out[name] = files
    return out


def first_sentence(docstring: str) -> str:
    """The docstring's first paragraph up to the end of its first sentence, on one line."""
    paragraph = " ".join(re.split(r"\n\s*\n", docstring.strip(), maxsplit=1)[0].split())
    end = _SENTENCE_END.search(paragraph)
    return paragraph[: end.end()] if end else paragraph


def _docstring_lines(owner: _Owner) -> range | None:
    """The lines (1-based) of ``owner``'s docstring statement when it stands alone on them; None without one.
    ValueError when another statement shares its lines (it could not be cut out line by line)."""
    body = owner.body
    if ast.get_docstring(owner, clean=False) is None:
        return None
    doc = body[0]
    shares = doc.lineno == owner.lineno or (len(body) > 1 and body[1].lineno <= doc.end_lineno)
    if shares:
        raise ValueError("docstring shares a line")
    return range(doc.lineno, doc.end_lineno + 1)


def function_source(node: _FunctionNode, lines: list[str]) -> str:
    """The function's code without the docstrings of itself and what it nests, dedented, trailing spaces and
    blank-line runs removed. ValueError when a docstring cannot be cut out by lines."""
    cut: set[int] = set()
    for owner in ast.walk(node):
        if isinstance(owner, _Owner) and (span := _docstring_lines(owner)) is not None:
            cut.update(span)
    indent = lines[node.lineno - 1][: node.col_offset]
    kept: list[str] = []
    for number in range(node.lineno, node.end_lineno + 1):
        if number in cut:
            continue
        line = lines[number - 1].rstrip()
        line = line[len(indent) :] if line.startswith(indent) else line.lstrip()
        if line or (kept and kept[-1]):
            kept.append(line)
    return "\n".join(kept).strip("\n")


def _parse(path: Path) -> tuple[ast.Module, list[str]]:
    """The file's syntax tree and its lines; it is decoded as its coding cookie says, never executed."""
    data = path.read_bytes()
    encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    text = data.decode(encoding)
    with warnings.catch_warnings():  # invalid escape sequences in old code: SyntaxWarning, not our business
        warnings.simplefilter("ignore")
        tree = ast.parse(text, filename=str(path))
    return tree, text.splitlines()


def function_pairs(files: list[Path], *, max_source_chars: int, counts: Counter) -> list[tuple[str, str]]:
    """(source, first sentence) of every function with a usable docstring in ``files``; ``counts`` gains what
    was skipped and why."""
    pairs = []
    for path in files:
        try:
            tree, lines = _parse(path)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            counts["unreadable_files"] += 1
            continue
        for node in ast.walk(tree):
            if not isinstance(node, _FunctionNode):
                continue
            docstring = ast.get_docstring(node)
            if not docstring:
                counts["no_docstring"] += 1
                continue
            target = first_sentence(docstring)
            if len(target.split()) < MIN_TARGET_WORDS or len(target) > MAX_TARGET_CHARS:
                counts["unusable_docstring"] += 1
                continue
            try:
                source = function_source(node, lines)
            except ValueError:
                counts["docstring_not_separable"] += 1
                continue
            if "\n" not in source:  # the docstring was the whole body
                counts["no_code"] += 1
            elif len(source) > max_source_chars:
                counts["too_long"] += 1
            else:
                pairs.append((source, target))
    return pairs
