"""``verify``: is this artifact dir exactly what ``export`` wrote, and does every variant still run right?

Checks, in order (the first failure raises a one-line :class:`CahpError`):

1. ``manifest.json`` is there, of the right schema, with the required keys.
2. every file the manifest lists exists with its recorded size and sha256 ("tampered" names the
   file); no unlisted file that could change behaviour (``*.onnx``, weights, json, vocab) is present.
3. every variant's file is listed, and ``config.json`` is.
4. smoke test (``smoke=True``): each variant runs on the fixed inputs stored in the manifest and
   matches the PyTorch logits recorded at export within its tolerance (fp32/optimized 1e-4,
   fp16 1e-2; int8: outputs finite and of the right shape, agreement reported).

The bench runs this on every artifact before timing anything.
"""

from __future__ import annotations

import os
from pathlib import Path

from cahp_deploy.errors import CahpError
from cahp_deploy.export import parity
from cahp_deploy.export.manifest import MANIFEST_FILE, VARIANT_FILES, load_manifest
from cahp_deploy.hashing import sha256_file
from cahp_deploy.onnx_runtime import smoke_check

# Unlisted files with these suffixes could change what the artifact computes.
_BEHAVIOUR_SUFFIXES = (".onnx", ".onnx_data", ".data", ".json", ".txt", ".model", ".safetensors", ".bin")


def _check_files(root: Path, manifest: dict) -> int:
    files = manifest["files"]
    for name, rec in sorted(files.items()):
        p = root / name
        if not p.is_file():
            raise CahpError(f"{root}: {name} is listed in {MANIFEST_FILE} but missing; re-export the artifact")
        if p.stat().st_size != rec.get("bytes") or sha256_file(p) != rec.get("sha256"):
            raise CahpError(f"{root}: {name} was tampered with (size or sha256 differs from {MANIFEST_FILE}); re-export the artifact")
    for p in sorted(root.rglob("*")):
        name = p.relative_to(root).as_posix()
        if p.is_file() and name != MANIFEST_FILE and name not in files and p.suffix in _BEHAVIOUR_SUFFIXES:
            raise CahpError(f"{root}: {name} is not listed in {MANIFEST_FILE} (added after export?); remove it or re-export")
    for variant, rec in manifest["variants"].items():
        expected = VARIANT_FILES.get(variant)
        if expected is None or rec.get("file") != expected:
            raise CahpError(f"{root}: {MANIFEST_FILE} has an unknown variant entry {variant!r}; re-export the artifact")
        if expected not in files:
            raise CahpError(f"{root}: variant {variant} file {expected} is not hashed in {MANIFEST_FILE}; re-export the artifact")
    if "config.json" not in files:
        raise CahpError(f"{root}: config.json is missing from {MANIFEST_FILE}; re-export the artifact")
    return len(files)


def _smoke(root: Path, manifest: dict) -> dict:
    smoke = manifest.get("smoke")
    if not smoke:
        raise CahpError(f"{root}: {MANIFEST_FILE} has no smoke inputs; re-export the artifact")
    out = {}
    for variant, rec in manifest["variants"].items():
        atol = {"fp32": parity.FP32_ATOL, "optimized": parity.FP32_ATOL, "fp16": parity.FP16_ATOL}.get(variant)
        try:
            out[variant] = smoke_check(root / rec["file"], smoke["inputs"], smoke["logits"], atol,
                                       tie_margin=2 * atol if variant == "fp16" else 0.0,
                                       recorded="the PyTorch logits recorded at export")
        except CahpError as e:
            raise CahpError(f"{root}: variant {variant} {e}; re-export the artifact") from e
    return out


def is_handoff_dir(path: str | os.PathLike) -> bool:
    """A dir written by ``cahp-deploy handoff`` (``handoff.json``, no ``manifest.json``)."""
    return (Path(path) / "handoff.json").is_file() and not (Path(path) / "manifest.json").is_file()


def verify(artifact_dir: str | os.PathLike, smoke: bool = True) -> dict:
    """Re-check an artifact dir; return ``{"artifact", "files_checked", "variants", "smoke"}``."""
    root = Path(artifact_dir)
    if is_handoff_dir(root):  # handoff sits above export: the command (or the caller) picks the check
        raise CahpError(f"{root} is a `cahp-deploy handoff` dir, not an artifact dir; check it with "
                        "`cahp-deploy verify` or cahp_deploy.handoff.verify_handoff")
    manifest = load_manifest(root)
    n = _check_files(root, manifest)
    result = {"artifact": str(root), "files_checked": n, "variants": sorted(manifest["variants"]), "smoke": None}
    if smoke:
        result["smoke"] = _smoke(root, manifest)
    return result
