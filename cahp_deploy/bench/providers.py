"""Execution providers: which ONNX Runtime backend runs the model, and on which device.

ONNX Runtime silently falls back to the CPU when a requested GPU provider cannot start (wrong
onnxruntime package, missing CUDA/cuDNN libraries). A benchmark that quietly timed the CPU while the
report says "cuda" is worse than none, so both cases are turned into one-line :class:`CahpError` s:
before the session (provider not installed) and after it (session did not keep the provider).
"""

from __future__ import annotations

import importlib.metadata
import os
import time
from dataclasses import dataclass

from cahp_deploy.errors import CahpError

#: --provider choice -> (ONNX Runtime provider name, device kind used for IO binding)
PROVIDERS: dict[str, tuple[str, str]] = {
    "cpu": ("CPUExecutionProvider", "cpu"),
    "cuda": ("CUDAExecutionProvider", "cuda"),
    "tensorrt": ("TensorrtExecutionProvider", "cuda"),
}

# The distributions that ship the `onnxruntime` module; the first installed one is named in errors.
_ORT_DISTRIBUTIONS = ("onnxruntime-gpu", "onnxruntime", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-silicon")


def installed_ort_package() -> str:
    """``"<distribution> <version>"`` of the installed onnxruntime build (they differ in providers)."""
    for dist in _ORT_DISTRIBUTIONS:
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__} (unknown distribution)"


def check_provider(provider: str) -> str:
    """Validate ``--provider`` and that this onnxruntime build has it; return the ORT provider name."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise CahpError(f"unknown provider {provider!r}; choose one of: {', '.join(PROVIDERS)}")
    name = PROVIDERS[provider][0]
    available = ort.get_available_providers()
    if name not in available:
        hint = "pip install onnxruntime-gpu (in place of onnxruntime)" if provider != "cpu" else "reinstall onnxruntime"
        raise CahpError(
            f"--provider {provider} needs {name}, which the installed {installed_ort_package()} does not provide "
            f"(available: {', '.join(available)}); {hint}"
        )
    return name


def device_of(provider: str) -> tuple[str, int]:
    """(device kind, device id) where inputs are placed for IO binding. CUDA_VISIBLE_DEVICES applies."""
    return PROVIDERS[provider][1], 0


@dataclass(frozen=True)
class ThreadSettings:
    """How ONNX Runtime may use CPU threads; recorded in the report because it changes every number.

    ``allow_spinning`` is off: sessions are timed round-robin, and a per-session thread pool that
    spins after its run would steal cores from the next session being timed.
    """

    intra_op_num_threads: int = 0  # 0 = ONNX Runtime's default (one per physical core)
    inter_op_num_threads: int = 1
    allow_spinning: bool = False

    def to_dict(self) -> dict:
        return {
            "intra_op_num_threads": self.intra_op_num_threads,
            "intra_op_num_threads_meaning": "onnxruntime default (physical cores)" if self.intra_op_num_threads == 0 else "fixed",
            "inter_op_num_threads": self.inter_op_num_threads,
            "allow_spinning": self.allow_spinning,
            "execution_mode": "sequential",
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        }


def thread_settings(threads: int | None) -> ThreadSettings:
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise CahpError(f"--threads must be a positive integer, got {threads!r}")
    return ThreadSettings(intra_op_num_threads=threads or 0)


def session_options(settings: ThreadSettings):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = settings.intra_op_num_threads
    opts.inter_op_num_threads = settings.inter_op_num_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    spin = "1" if settings.allow_spinning else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
    opts.log_severity_level = 3  # errors only: fallback warnings are turned into CahpError below
    return opts


def provider_list(provider: str) -> list:
    """The providers argument of ``InferenceSession``: the asked one first, CPU for unsupported ops."""
    name = PROVIDERS[provider][0]
    _, device_id = device_of(provider)
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "tensorrt":
        return [
            (name, {"device_id": device_id}),
            ("CUDAExecutionProvider", {"device_id": device_id}),
            "CPUExecutionProvider",
        ]
    return [(name, {"device_id": device_id}), "CPUExecutionProvider"]


def create_session(path: str | os.PathLike, provider: str, settings: ThreadSettings):
    """Return ``(session, seconds to create it)``; fail if ONNX Runtime dropped the asked provider."""
    import onnxruntime as ort

    name = PROVIDERS[provider][0]
    start = time.perf_counter()
    try:
        session = ort.InferenceSession(str(path), sess_options=session_options(settings), providers=provider_list(provider))
    except Exception as e:  # ORT raises its own types (Fail, InvalidGraph, ...) for files it cannot run
        raise CahpError(f"onnxruntime cannot load {path} on {name}: {str(e).splitlines()[0]}") from e
    seconds = time.perf_counter() - start
    used = session.get_providers()
    if name not in used:
        raise CahpError(
            f"{name} was requested but the session for {path} runs on {', '.join(used)}; "
            f"{installed_ort_package()} could not start it (check the CUDA/cuDNN/TensorRT libraries it needs)"
        )
    return session, seconds
