"""Text in bounded memory: files read block by block, decoded incrementally, cut at line ends.

The data stages never hold a corpus whole. ``Decoder`` turns a byte stream into text the way decoding the
whole at once would (BOM, strict errors with byte offsets, counted replacements, NUL handling);
``line_blocks`` and ``chunk_ends`` cut UTF-8 files at ``\\n`` bytes — a UTF-8 ``\\n`` byte is always a whole
character, so the pieces decode on their own — and ``sha256_file`` digests a file without reading it whole.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lm.errors import DataError

BLOCK = 8 << 20
"""Bytes read at a time (8 MiB): the unit of memory the data stages hold per stream."""
LINES_PER_CHUNK = 256
"""HF tokenizers encode text in chunks of this many ``\\n``-ended lines (line ends are pre-token boundaries);
shards start at chunk boundaries, so a split encodes to the same ids whole or sharded."""
# Longest first: the UTF-32-LE BOM begins with the UTF-16-LE one.
BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_REPLACED = threading.local()


def _count_replacement(e: UnicodeDecodeError) -> tuple[str, int]:
    """The ``replace`` error handler, counting: one U+FFFD per undecodable sequence."""
    _REPLACED.count += 1
    return "\ufffd", e.end


codecs.register_error("lm-replace-counted", _count_replacement)


class SourceError(DataError):
    """A source cannot be read as configured; the message names the input and what to do."""


def encoding(data: bytes) -> tuple[str, int]:
    """The codec a byte-order mark names and the mark's length; UTF-8 (no mark) otherwise."""
    for bom, codec in BOMS:
        if data.startswith(bom):
            return codec, len(bom)
    return "utf-8", 0


class Decoder:
    """Bytes → text block by block, as decoding the whole would: the codec its BOM names (UTF-8 when none;
    the BOM dropped), NUL characters included.

    ``strict`` raises naming the byte offset of the first undecodable byte or NUL; ``replace`` puts U+FFFD in
    their place and counts them in ``replaced``.
    """

    def __init__(self, name: str, errors: str):
        self.name, self.errors = name, errors
        self.codec: str | None = None
        self.bom = 0
        self._head = b""  # bytes held until the BOM can be told
        self._decoder = None
        self._consumed = 0  # bytes after the BOM handed to the decoder
        self.replaced = 0

    def feed(self, data: bytes, final: bool = False) -> str:
        if self._decoder is None:
            self._head += data
            if len(self._head) < 4 and not final:
                return ""
            self.codec, self.bom = encoding(self._head)
            handler = "strict" if self.errors == "strict" else "lm-replace-counted"
            self._decoder = codecs.getincrementaldecoder(self.codec)(handler)
            data, self._head = self._head[self.bom :], b""
        pending = self._decoder.getstate()[0]
        done = self._consumed - len(pending)  # bytes whose text was already returned
        _REPLACED.count = 0
        try:
            text = self._decoder.decode(data, final)
        except UnicodeDecodeError as e:  # its offsets count from the pending bytes
            raise SourceError(
                f"{self.name}: invalid {self.codec.upper()} at byte offset {self.bom + done + e.start} "
                f"({(pending + data)[e.start : e.start + 4]!r}); convert the file to UTF-8 or set "
                "data.encoding_errors: replace"
            ) from None
        self._consumed += len(data)
        self.replaced += _REPLACED.count
        if "\x00" in text:
            if self.errors == "strict":
                at = self.bom + done + len(text[: text.index("\x00")].encode(self.codec))
                raise SourceError(
                    f"{self.name}: NUL byte at byte offset {at} (binary data in a text file?); remove it or set "
                    "data.encoding_errors: replace"
                )
            self.replaced += text.count("\x00")
            text = text.replace("\x00", "\ufffd")
        return text


def decode(data: bytes, name: str, errors: str) -> tuple[str, int]:
    """Decode whole bytes as ``Decoder`` does: (text, replaced count)."""
    decoder = Decoder(name, errors)
    return decoder.feed(data, final=True), decoder.replaced


def blocks(stream, size: int = BLOCK) -> Iterator[bytes]:
    """A binary stream's bytes, ``size`` at a time."""
    while block := stream.read(size):
        yield block


def byte_blocks(path: Path, start: int = 0, end: int | None = None, size: int = BLOCK) -> Iterator[bytes]:
    """``path``'s bytes ``[start, end)`` (to the end of the file by default), ``size`` at a time."""
    with open(path, "rb") as f:
        f.seek(start)
        left = None if end is None else end - start
        while left is None or left > 0:
            block = f.read(size if left is None else min(size, left))
            if not block:
                break
            if left is not None:
                left -= len(block)
            yield block


def sha256_file(path: Path, start: int = 0, end: int | None = None) -> str:
    """sha256 of ``path``'s bytes ``[start, end)`` (the whole file by default), read block by block."""
    h = hashlib.sha256()
    for block in byte_blocks(path, start, end):
        h.update(block)
    return h.hexdigest()


def copy_range(path: Path, out, start: int = 0, end: int | None = None) -> None:
    """Append ``path``'s bytes ``[start, end)`` to the open binary file ``out``: by the kernel where it can (Linux
    ``copy_file_range``: no trip through this process's memory), else block by block."""
    out.flush()
    if not hasattr(os, "copy_file_range"):
        for block in byte_blocks(path, start, end):
            out.write(block)
        return
    with open(path, "rb") as f:
        left = (os.fstat(f.fileno()).st_size if end is None else end) - start
        while left > 0 and (done := os.copy_file_range(f.fileno(), out.fileno(), left, start)):
            start, left = start + done, left - done


def line_blocks(path: Path, start: int = 0, end: int | None = None, size: int = BLOCK) -> Iterator[bytes]:
    """The UTF-8 file's bytes ``[start, end)`` in pieces of about ``size`` that end at a ``\\n`` (the last
    piece: wherever the range ends), so each decodes on its own."""
    with open(path, "rb") as f:
        f.seek(start)
        left = (Path(path).stat().st_size if end is None else end) - start
        carry = b""
        while left > 0:
            block = f.read(min(size, left))
            if not block:
                break
            left -= len(block)
            block = carry + block
            cut = block.rfind(b"\n") + 1 if left > 0 else len(block)
            if cut == 0:  # no line end in this block: read on
                carry = block
                continue
            carry = block[cut:]
            yield block[:cut]
        if carry:
            yield carry


def chunk_ends(block: bytes, lines_before: int, lines_per_chunk: int = LINES_PER_CHUNK) -> tuple[np.ndarray, int]:
    """Offsets in ``block`` just past every ``\\n`` that closes a chunk of ``lines_per_chunk`` lines, counting
    lines from the start of the file (``lines_before`` of them precede ``block``); and the lines in ``block``."""
    newlines = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
    numbers = lines_before + 1 + np.arange(newlines.size)
    return newlines[numbers % lines_per_chunk == 0] + 1, int(newlines.size)


def text_chunks(path: Path, start: int = 0, end: int | None = None) -> Iterator[str]:
    """The UTF-8 file's text ``[start, end)`` (``start`` at a chunk boundary: 0 or a shard's start) in chunks of
    ``LINES_PER_CHUNK`` lines — the pieces HF tokenizers encode — read block by block."""
    carry, lines_before = b"", 0
    for block in line_blocks(path, start, end):
        ends, lines = chunk_ends(block, lines_before)
        lines_before += lines
        at = 0
        for cut in ends.tolist():
            yield (carry + block[at:cut]).decode("utf-8")
            carry, at = b"", cut
        carry += block[at:]
    if carry:
        yield carry.decode("utf-8")
