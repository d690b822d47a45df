"""Models that leave home: a package written as a Hugging Face Transformers folder (``hf``) or an ONNX graph
(``onnx``), and a local Transformers folder read back as a package (``init_from: hf:PATH``).

The optional libraries come from extras (``pip install -e ".[hf]"`` / ``".[onnx]"``); ``require`` says which
command installs a missing one instead of failing on an import deep inside.
"""

from __future__ import annotations

import importlib
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
