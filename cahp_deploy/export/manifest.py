"""manifest.json: what an artifact dir holds and why it can be trusted.

Keys (DESIGN.md, "artifact dir"): ``schema``, ``variants`` ({fp32|optimized|int8|fp16: {file, parity,
...}}), ``files`` ({name: {bytes, sha256}} for every file but the manifest itself), ``kept_heads``
(null when dense), ``num_heads_kept``, ``num_heads_total``, ``pruning`` (pruning.json or null),
``source_model``, ``source_model_sha256``, ``selection_sha256``, ``num_labels``, ``id2label``,
``model_type``, ``opset``, ``exporter`` ({name: optimum|torch, why}), ``input_names``,
``max_position_embeddings``, ``versions``,
``export_seconds``; plus ``task``, ``heads_per_layer``, ``attn_implementation``, ``created`` and
``smoke`` (a few fixed inputs and the PyTorch logits for them, so ``verify`` can re-check every
variant against PyTorch without torch or the source model).
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path

from cahp_deploy import schema
from cahp_deploy.errors import CahpError
from cahp_deploy.hashing import sha256_file

MANIFEST_FILE = "manifest.json"
#: variant -> file name in the artifact dir
VARIANT_FILES: dict[str, str] = {
    "fp32": "model.onnx",
    "optimized": "model_optimized.onnx",
    "int8": "model_int8.onnx",
    "fp16": "model_fp16.onnx",
}
REQUIRED_KEYS = ("variants", "files", "num_labels", "model_type", "opset", "input_names", "versions")
_PACKAGES = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "cahp-deploy")


def versions() -> dict[str, str | None]:
    out = {}
    for p in _PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def file_records(directory: Path) -> dict[str, dict]:
    """{relative name: {bytes, sha256}} of every file under ``directory`` except the manifest."""
    out = {}
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = f.relative_to(directory).as_posix()
        if name == MANIFEST_FILE:
            continue
        out[name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    return out


def write_manifest(directory: Path, manifest: dict) -> Path:
    path = directory / MANIFEST_FILE
    with open(path, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return path


def load_manifest(artifact_dir: str | os.PathLike) -> dict:
    """Read and schema-check ``ARTIFACT_DIR/manifest.json``."""
    path = Path(artifact_dir) / MANIFEST_FILE
    if not Path(artifact_dir).is_dir():
        raise CahpError(f"artifact dir {artifact_dir} does not exist; make one with `cahp-deploy export`")
    if not path.is_file():
        raise CahpError(f"{artifact_dir} is not an artifact dir (no {MANIFEST_FILE}); make one with `cahp-deploy export`")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise CahpError(f"{path} is not valid JSON ({e}); re-export the artifact") from e
    schema.check_schema(manifest, schema.MANIFEST, str(path))
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise CahpError(f"{path} lacks {', '.join(missing)}; re-export the artifact")
    return manifest


def variant_path(artifact_dir: str | os.PathLike, variant: str) -> Path:
    """Path of one variant's ONNX file (whether or not the artifact has it)."""
    if variant not in VARIANT_FILES:
        raise CahpError(f"unknown variant {variant!r}; choose from {', '.join(VARIANT_FILES)}")
    return Path(artifact_dir) / VARIANT_FILES[variant]


def int8_mac_share(manifest: dict, variant: str) -> float | None:
    """Share of the weight-MatMul MACs that run in INT8 in ``variant`` (0 for fp32 graphs, None for fp16)."""
    if variant in ("fp32", "optimized"):
        return 0.0
    info = (manifest.get("variants") or {}).get(variant) or {}
    if variant != "int8" or "fp32_mac_fraction" not in info:
        return None
    return info.get("int8_mac_fraction", round(1.0 - info["fp32_mac_fraction"], 4))
