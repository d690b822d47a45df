"""Hardware speed: the matmul peak that model FLOPs utilisation (MFU) is measured against."""

from __future__ import annotations

import statistics
import time

import torch


def matmul_peak(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5
) -> float:
    """FLOP/s of an n×n matmul in ``dtype`` on ``device`` (median of ``repeats`` after one warm-up)."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    timed()
    return 2 * n**3 / statistics.median(timed() for _ in range(repeats))


def machine_key(device: torch.device | str, dtype: torch.dtype) -> str:
    """What a measured peak depends on: processor, thread count, torch build, device and dtype."""
    device = torch.device(device)
    if device.type == "cuda":
        processor = torch.cuda.get_device_name(device)
    else:
        processor = _cpu_model()
    return f"{processor}|threads={torch.get_num_threads()}|torch={torch.__version__}|{device.type}|{dtype}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
