"""Code versions for cache keys: a digest of the source files that produce a stage's output.

Editing the code that builds a corpus or tokenizes it invalidates those caches; editing anything
else does not.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path


@functools.cache
def code_digest(*modules: str) -> str:
    """sha256 over the source of the named modules (e.g. ``"lm.data"``), in the given order."""
    h = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(name)
        h.update(name.encode() + b"\0" + Path(spec.origin).read_bytes())
    return h.hexdigest()[:16]
