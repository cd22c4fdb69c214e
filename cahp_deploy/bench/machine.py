"""A description of the machine a report was measured on: numbers mean nothing without it."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import psutil


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo on Linux, sysctl on macOS, platform otherwise)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def describe(provider: str, threads: dict, load_average_start: list[float] | None = None) -> dict:
    """CPU, cores, memory, OS, Python, onnxruntime build and providers, thread settings, load.

    ``load_average_start`` is read before timing began (a busy machine explains noisy numbers).
    """
    import onnxruntime as ort

    from cahp_deploy import __version__
    from cahp_deploy.onnx_runtime import installed_ort_package

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "cpu_model": cpu_model(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "cores_usable": affinity,
        "memory_bytes": psutil.virtual_memory().total,
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnxruntime_package": installed_ort_package(),
        "available_providers": list(ort.get_available_providers()),
        "provider": provider,
        "gpus": gpu_names() if provider != "cpu" else [],
        "threads": threads,
        "load_average_start": load_average_start,
        "load_average_end": load_average(),
        "cahp_deploy": __version__,
    }
