"""This machine's matmul peak, measured once per machine and precision and cached for every later run.

The cache is a small JSON file in the user's cache directory (``$XDG_CACHE_HOME/lm-pipelines`` or
``~/.cache/lm-pipelines``), keyed by processor, thread count, torch build, device and dtype, so a new
machine, a torch upgrade or another thread count measures again (≈ 0.5 s).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lm.atomic import atomic_write_bytes
from lm.perf import machine_key, matmul_peak


def cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "lm-pipelines" / "matmul-peaks.json"


def peak_flops(device: torch.device | str, dtype: torch.dtype | None) -> float:
    """FLOP/s to compute MFU against: cached, or measured now and cached (fp32 when ``dtype`` is None)."""
    dtype = dtype or torch.float32
    key, path = machine_key(device, dtype), cache_file()
    try:
        peaks = json.loads(path.read_text())
    except (OSError, ValueError):
        peaks = {}
    if not isinstance(peaks, dict) or not isinstance(peaks.get(key), (int, float)):
        peaks = peaks if isinstance(peaks, dict) else {}
        peaks[key] = matmul_peak(device, dtype)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, json.dumps(peaks, indent=2, sort_keys=True).encode())
        except OSError:
            pass  # a read-only home: measure again next time
    return float(peaks[key])
