"""Content hashes used for provenance and for ``run``'s resume checks."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20

# Files that define a model's behaviour; logs, manifests and READMEs do not change what it computes.
_MODEL_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model", ".onnx", ".onnx_data")
_NOT_MODEL = {"training_info.json", "pruning.json", "manifest.json", "selection.json", "recovery.json"}


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able object, independent of key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256_dir(path: str | os.PathLike, model_files_only: bool = True) -> str:
    """One hash over a directory's files (names and contents), sorted, so it is stable."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        if model_files_only and (f.suffix not in _MODEL_SUFFIXES or f.name in _NOT_MODEL):
            continue
        h.update(str(f.relative_to(root)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def sha256_path(path: str | os.PathLike) -> str:
    p = Path(path)
    return sha256_dir(p) if p.is_dir() else sha256_file(p)
