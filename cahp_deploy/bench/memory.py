"""Memory a session costs: peak RSS growth on the host, bytes in use on the GPU, size on disk.

RSS is sampled by a background thread rather than read once after the fact, because ONNX Runtime
frees its initializer copies and scratch buffers after the first run: the peak is what a server must
provision for, the value after the run is not. Numbers are per session in one process, so the
allocator may reuse memory freed by an earlier session; they are best compared within one report.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


class PeakRSS:
    """Highest RSS seen while the ``with`` block ran, minus RSS at its start (``growth_bytes``)."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self._proc = psutil.Process(os.getpid())
        self.start_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakRSS:
        self.start_bytes = self._proc.memory_info().rss
        self.peak_bytes = self.start_bytes
        self._thread = threading.Thread(target=self._loop, name="cahp-bench-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    @property
    def growth_bytes(self) -> int:
        return max(0, self.peak_bytes - self.start_bytes)


def _nvidia_smi_used(device_id: int) -> int | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits", f"--id={device_id}"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
        return int(float(out.strip().splitlines()[0])) * 1024 * 1024  # reported in MiB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
        log.warning("nvidia-smi could not report GPU memory: %s", e)
        return None


def _torch_used(device_id: int) -> int | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(device_id)  # driver view: sees ONNX Runtime's arena too
    return int(total - free)


def device_memory_used(device_id: int = 0) -> int | None:
    """Bytes in use on the GPU (all processes), or None when no GPU can be queried.

    nvidia-smi first: it needs no CUDA context in this process. torch.cuda's allocator counters
    would miss memory ONNX Runtime allocates, so only the driver's free/total is used from torch.
    """
    used = _nvidia_smi_used(device_id)
    return used if used is not None else _torch_used(device_id)


@contextlib.contextmanager
def device_memory_growth(device: str, device_id: int = 0) -> Iterator[dict]:
    """Yields a dict filled on exit with ``device_memory_bytes`` (growth; None on CPU or unknown)."""
    result: dict = {"device_memory_bytes": None}
    before = device_memory_used(device_id) if device == "cuda" else None
    yield result
    if before is not None:
        after = device_memory_used(device_id)
        result["device_memory_bytes"] = None if after is None else max(0, after - before)


def model_size_bytes(path: str | os.PathLike) -> int:
    """Bytes of an ONNX file plus its external-data files (``<name>_data`` / ``<name>.data``)."""
    path = Path(path)
    total = path.stat().st_size
    for extra in (path.with_name(path.name + "_data"), path.with_name(path.name + ".data")):
        if extra.exists():
            total += extra.stat().st_size
    return total
