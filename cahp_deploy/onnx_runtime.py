"""ONNX Runtime in one place: providers, session options, sessions, feeds, logits and the smoke check.

Every stage that runs a graph (export's parity and INT8 search, ``verify``, ``bench``, ``predict``,
``handoff``, ``run``'s promise) opens it here, so a provider name, a thread setting or an error message
is written once. ``onnxruntime`` is imported inside the functions: importing this module stays cheap
(``cahp-deploy --help`` must not load it).

Errors: :func:`session` lets ONNX Runtime's own exceptions through (a graph this package just wrote
that does not load is a bug); :func:`load_session` is for files a user hands in and turns a load
failure into a one-line :class:`CahpError` naming the file and the provider.

ONNX Runtime silently falls back to the CPU when a requested GPU provider cannot start (wrong
onnxruntime package, missing CUDA/cuDNN libraries). :func:`check_provider` catches the first case
before any session, :func:`check_kept_provider` the second after one (``bench`` must not time the CPU
while its report says "cuda").
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cahp_deploy.errors import CahpError

#: ``--provider`` choice -> (ONNX Runtime provider name, device kind inputs are placed on for IO binding)
PROVIDERS: dict[str, tuple[str, str]] = {
    "cpu": ("CPUExecutionProvider", "cpu"),
    "cuda": ("CUDAExecutionProvider", "cuda"),
    "tensorrt": ("TensorrtExecutionProvider", "cuda"),
}
#: ONNX Runtime's names of the integer input types a tokenizer's output can fill
INPUT_DTYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}

# The distributions that ship the `onnxruntime` module; the first installed one is named in errors.
_ORT_DISTRIBUTIONS = ("onnxruntime-gpu", "onnxruntime", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-silicon")

Feed = dict[str, np.ndarray]


# ----------------------------------------------------------------------------- providers


def installed_ort_package() -> str:
    """``"<distribution> <version>"`` of the installed onnxruntime build (they differ in providers)."""
    for dist in _ORT_DISTRIBUTIONS:
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__} (unknown distribution)"


def check_provider(provider: str, choices: Sequence[str] = tuple(PROVIDERS), purpose: str = "") -> str:
    """Validate ``--provider`` against ``choices`` and this onnxruntime build; return the ORT provider name.

    ``purpose`` (e.g. ``"to check the fp16 model"``) is said in the error when the provider is missing.
    """
    import onnxruntime as ort

    if provider not in choices or provider not in PROVIDERS:
        raise CahpError(f"unknown provider {provider!r}; choose one of: {', '.join(choices)}")
    name = PROVIDERS[provider][0]
    available = ort.get_available_providers()
    if name not in available:
        hint = "pip install onnxruntime-gpu (in place of onnxruntime)" if provider != "cpu" else "reinstall onnxruntime"
        why = f" {purpose}" if purpose else ""
        raise CahpError(
            f"--provider {provider} needs {name}{why}, which the installed {installed_ort_package()} does not provide "
            f"(available: {', '.join(available)}); {hint}"
        )
    return name


def device_of(provider: str) -> tuple[str, int]:
    """(device kind, device id) where inputs are placed for IO binding. CUDA_VISIBLE_DEVICES applies."""
    return PROVIDERS[provider][1], 0


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


def check_kept_provider(session, provider: str, path: str | os.PathLike) -> None:
    """Raise when ONNX Runtime dropped the asked provider (it falls back to the CPU silently)."""
    name = PROVIDERS[provider][0]
    used = session.get_providers()
    if name not in used:
        raise CahpError(
            f"{name} was requested but the session for {path} runs on {', '.join(used)}; "
            f"{installed_ort_package()} could not start it (check the CUDA/cuDNN/TensorRT libraries it needs)"
        )


# ----------------------------------------------------------------------------- session options


@dataclass(frozen=True)
class ThreadSettings:
    """How ONNX Runtime may use CPU threads. ``0`` / ``None`` leave ONNX Runtime's default.

    ``bench`` records its settings in the report because they change every number; it turns
    ``allow_spinning`` off: sessions are timed round-robin, and a per-session thread pool that spins
    after its run would steal cores from the next session being timed.
    """

    intra_op_num_threads: int = 0  # 0 = ONNX Runtime's default (one per physical core)
    inter_op_num_threads: int = 0  # 0 = ONNX Runtime's default
    allow_spinning: bool | None = None  # None = ONNX Runtime's default (spin)
    quiet: bool = False  # log errors only

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
    """``bench``'s settings for ``--threads``: one inter-op thread, no spinning, errors-only logging."""
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise CahpError(f"--threads must be a positive integer, got {threads!r}")
    return ThreadSettings(intra_op_num_threads=threads or 0, inter_op_num_threads=1, allow_spinning=False, quiet=True)


def session_options(settings: ThreadSettings = ThreadSettings()):
    """``onnxruntime.SessionOptions`` for ``settings`` (sequential execution, every graph optimization)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if settings.intra_op_num_threads:
        opts.intra_op_num_threads = settings.intra_op_num_threads
    if settings.inter_op_num_threads:
        opts.inter_op_num_threads = settings.inter_op_num_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if settings.allow_spinning is not None:
        spin = "1" if settings.allow_spinning else "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
    if settings.quiet:
        opts.log_severity_level = 3  # errors only: fallback warnings become CahpError in check_kept_provider
    return opts


# ----------------------------------------------------------------------------- sessions


def session(model, provider: str = "cpu", *, threads: int | None = None, settings: ThreadSettings | None = None):
    """An ``InferenceSession`` of ``model`` (a path, serialized bytes or an ``onnx.ModelProto``).

    ``threads`` sets the intra-op threads (``settings`` sets everything). ONNX Runtime's own
    exceptions propagate: use :func:`load_session` for a file the user gave.
    """
    import onnxruntime as ort

    if settings is None:
        settings = ThreadSettings(intra_op_num_threads=threads or 0)
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, session_options(settings), providers=provider_list(provider))


def load_session(path: str | os.PathLike, provider: str = "cpu", *, threads: int | None = None,
                 settings: ThreadSettings | None = None):
    """:func:`session` of a file the user gave: a file ONNX Runtime cannot load is a :class:`CahpError`."""
    try:
        return session(path, provider, threads=threads, settings=settings)
    except Exception as e:  # ORT raises its own types (Fail, InvalidGraph, ...) for files it cannot run
        raise CahpError(f"onnxruntime cannot load {path} on {PROVIDERS[provider][0]}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


# ----------------------------------------------------------------------------- feeds and logits


def input_dtypes(session) -> dict[str, type]:
    """{input name: numpy dtype} of every input the graph declares; token ids and masks only."""
    spec = {}
    for inp in session.get_inputs():
        dtype = INPUT_DTYPES.get(inp.type)
        if dtype is None:
            raise CahpError(f"model input {inp.name!r} has type {inp.type}; only token ids (int64/int32) can be fed")
        spec[inp.name] = dtype
    return spec


def feed(dtypes: Mapping[str, type], fields: Mapping[str, object]) -> Feed:
    """The inputs the graph declares (``dtypes``, from :func:`input_dtypes`), taken from ``fields``
    (tokenizer output: ``input_ids``, ``attention_mask``, ``token_type_ids``, ...) in the graph's
    dtypes; extra fields are dropped (DistilBERT has no ``token_type_ids``), a missing one is an error."""
    missing = [n for n in dtypes if n not in fields]
    if missing:
        raise CahpError(f"the graph declares inputs that cannot be filled from {', '.join(fields)}: {', '.join(missing)}")
    return {n: np.ascontiguousarray(fields[n], dtype=dt) for n, dt in dtypes.items()}


def logits(session, feeds: Iterable[Mapping[str, np.ndarray]]) -> np.ndarray:
    """The first output (float32) of ``session`` on each feed in turn, concatenated; each feed keeps
    only the inputs the graph declares."""
    names = {i.name for i in session.get_inputs()}
    out = [np.asarray(session.run(None, {k: v for k, v in f.items() if k in names})[0], dtype=np.float32) for f in feeds]
    return np.concatenate(out)


def compare(reference: np.ndarray, got: np.ndarray, tie_margin: float = 0.0) -> dict:
    """Max |diff| and argmax agreement; rows whose reference top-2 margin is <= ``tie_margin`` are
    left out of ``argmax_mismatches`` (they are reported in ``near_ties``)."""
    diff = float(np.abs(reference - got).max()) if reference.size else 0.0
    ref_top, got_top = reference.argmax(-1), got.argmax(-1)
    srt = np.sort(reference, axis=-1)
    margin = srt[:, -1] - srt[:, -2] if reference.shape[-1] > 1 else np.full(len(reference), np.inf)
    decided = margin > tie_margin
    return {
        "num_examples": int(len(reference)),
        "max_abs_diff": diff,
        "argmax_agreement": float((ref_top == got_top).mean()) if len(reference) else 1.0,
        "argmax_mismatches": int(((ref_top != got_top) & decided).sum()),
        "near_ties": int((~decided).sum()),
    }


# ----------------------------------------------------------------------------- the smoke check


def smoke_check(path: str | os.PathLike, inputs: Sequence[Mapping[str, list]], expected, atol: float | None,
                tie_margin: float = 0.0, recorded: str = "the logits recorded") -> dict:
    """Run ``path`` (``.onnx`` or ``.ort``) on the CPU on stored ``inputs`` and compare with the stored
    ``expected`` logits: what ``verify`` re-runs for an artifact variant and for a handoff dir.

    Returns :func:`compare`'s figures with ``atol`` and ``passed``. Raises :class:`CahpError` when the
    file does not load or run, returns logits of another shape or non-finite ones, or (``atol`` not
    None) differs by more than ``atol`` or in an argmax beyond ``tie_margin`` from ``recorded``; the
    caller adds where and what to do (the message starts with what went wrong).
    """
    feeds = [{k: np.asarray(v, dtype=np.int64) for k, v in f.items()} for f in inputs]
    ref = np.asarray(expected, dtype=np.float32)
    try:
        got = logits(session(path), feeds)
    except Exception as e:  # ORT's own exception types: the graph does not load or run
        raise CahpError(f"does not run in ONNX Runtime ({_first_line(e)})") from e
    if got.shape != ref.shape or not np.isfinite(got).all():
        raise CahpError(f"returned logits of shape {got.shape} (expected {ref.shape}) or non-finite values")
    res = compare(ref, got, tie_margin=tie_margin)
    if atol is not None and (res["max_abs_diff"] > atol or res["argmax_mismatches"]):
        raise CahpError(f"no longer matches {recorded} (max |diff| {res['max_abs_diff']:.2e} > {atol:g})")
    return {**res, "atol": atol, "passed": True}


__all__ = [
    "Feed", "INPUT_DTYPES", "PROVIDERS", "ThreadSettings", "check_kept_provider", "check_provider", "compare",
    "device_of", "feed", "input_dtypes", "installed_ort_package", "load_session", "logits", "provider_list",
    "session", "session_options", "smoke_check", "thread_settings",
]
