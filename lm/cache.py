"""The one content-addressed stage cache: inputs → key → a verified directory, built once, written whole.

A cached stage names everything its result depends on in an ``inputs`` dict; its key is the sha256 of
that dict as sorted JSON (``inputs_key``). The result is a directory under the stage's ``root`` holding
the stage's files and ``manifest.json``, named one of two ways:

* by key: ``<root>/<key[:16]>`` (tokens, encoded examples);
* by content: ``<root>/<digest[:16]>``, the digest of what was built (``manifest["digest"]``, which the
  build sets), and ``<root>/index/<key>.json`` → ``{"digest", "inputs"}`` points the key at it, so inputs
  that produce the same content share one directory (the corpus, the labelled examples).

A hit is trusted only after the stage's ``verify`` accepts the files on disk; a missing, damaged or
edited entry is rebuilt. Processes that miss at once build once (``build_once``, the key's lock), and a
build is written to a temporary directory that replaces the target in one rename, so a reader never
sees half a result and a failed build leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from lm.atomic import atomic_write_bytes, build_once, replace_dir, staged_dir

MANIFEST = "manifest.json"
INDEX = "index"
DAMAGED = (OSError, ValueError, KeyError, TypeError)  # unreadable, not JSON, or not the expected shape


def inputs_key(inputs: dict) -> str:
    """A stage's cache key: sha256 of its inputs as sorted JSON."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Entry:
    """A stage result on disk: its directory, key, manifest, and whether it was reused."""

    path: Path
    key: str
    manifest: dict
    cached: bool
    inputs: dict | None = None  # None when looked up by key alone (``StageCache.find``)
    digest: str | None = None  # by content: the digest naming the directory; by key: None


@dataclass(frozen=True)
class StageCache:
    """One stage's cache under ``root``.

    ``verify(entry) -> bool``: whether the files at ``entry.path`` are what ``entry.manifest`` (and, by
    content, ``entry.digest``) say; it may raise OSError / ValueError / KeyError on a damaged entry.
    ``by_content``: directories are named after the built content's digest and found through the index.
    """

    root: Path
    verify: Callable[[Entry], bool]
    by_content: bool = False

    def find(self, key: str) -> Entry | None:
        """The intact earlier result for ``key``, else None (never built, gone, damaged or edited)."""
        root = Path(self.root)
        inputs = digest = None
        try:
            if self.by_content:
                index = json.loads((root / INDEX / f"{key}.json").read_text())
                digest, inputs = index["digest"], index.get("inputs")
                path = root / digest[:16]
            else:
                path = root / key[:16]
            manifest = json.loads((path / MANIFEST).read_text())
            if not isinstance(manifest, dict):
                return None
            entry = Entry(path, key, manifest, cached=True, inputs=inputs, digest=digest)
            return entry if self.verify(entry) else None
        except DAMAGED:
            return None

    def get_or_build(self, inputs: dict, build: Callable[[Path], dict]) -> Entry:
        """The intact result for ``inputs``, else ``build``'s, made once under the key's lock.

        ``build(tmp)`` writes the stage's files into the empty directory ``tmp`` and returns the manifest
        (by content: with ``"digest"``); the cache writes ``manifest.json``, puts the directory in place
        in one rename and, by content, writes the index entry. On an exception nothing is left behind.
        """
        key = inputs_key(inputs)

        def found() -> Entry | None:
            hit = self.find(key)
            return None if hit is None else replace(hit, inputs=inputs)

        return build_once(self.root, key, found, lambda: self._build(key, inputs, build))

    def _build(self, key: str, inputs: dict, build: Callable[[Path], dict]) -> Entry:
        root = Path(self.root)
        with staged_dir(root, key[:16]) as tmp:
            manifest = build(tmp)
            digest = manifest["digest"] if self.by_content else None
            path = root / (digest or key)[:16]
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            replace_dir(tmp, path)  # replaces a damaged copy whole
        if self.by_content:
            atomic_write_bytes(root / INDEX / f"{key}.json", json.dumps({"digest": digest, "inputs": inputs}).encode())
        return Entry(path, key, manifest, cached=False, inputs=inputs, digest=digest)
