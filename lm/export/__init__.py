"""Models that leave home: a package written as a Hugging Face Transformers folder (``hf``) or an ONNX graph
(``onnx``), and a local Transformers folder read back as a package (``init_from: hf:PATH``).

The optional libraries come from extras (``pip install -e ".[hf]"`` / ``".[onnx]"``); ``require`` says which
command installs a missing one instead of failing on an import deep inside.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

from lm.errors import DataError

EXTRAS = {"transformers": "hf", "onnx": "onnx", "onnxruntime": "onnx", "onnxscript": "onnx"}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (one of ``EXTRAS``) or raise a DataError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = EXTRAS[module]
        raise DataError(
            f"{purpose} needs the `{module}` package, which is not installed ({exc}): "
            f'pip install -e ".[{extra}]" (or pip install "lm-pipelines[{extra}]")'
        ) from None


def shareable(folder: Path) -> None:
    """An export is for other tools and people: the folder and its files get the modes the user's umask gives
    new files (a temporary directory is private by default)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in Path(folder).rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
