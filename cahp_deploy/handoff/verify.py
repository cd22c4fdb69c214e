"""``verify`` on a handoff dir: hashes, the Triton config against its graph, and the smoke logits.

1. ``handoff.json`` is there; every file it lists exists with its size and sha256; no unlisted file
   that could change behaviour (model, json, vocab, config) is present.
2. triton: ``config.pbtxt`` parses and matches the graph (names, dtypes, ranks); triton-text: it
   matches ``serving.json`` and the graph, and (with smoke) ``model.py``'s classifier, run here
   without a server, gives the labels and probabilities recorded at handoff.
3. smoke (``smoke=True``): the handed-off model (``.onnx`` or ``.ort``) on the stored inputs gives the
   logits recorded at handoff within 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

from cahp_deploy.errors import CahpError
from cahp_deploy.export import parity
from cahp_deploy.hashing import sha256_file
from cahp_deploy.onnx_runtime import smoke_check
from cahp_deploy.schema import check_schema

HANDOFF_FILE = "handoff.json"
SCHEMA = "cahp-deploy/handoff/1"
_BEHAVIOUR_SUFFIXES = (".onnx", ".ort", ".json", ".txt", ".pbtxt", ".config", ".model", ".py")


def load_record(root: Path) -> dict:
    path = root / HANDOFF_FILE
    try:
        rec = json.loads(path.read_text())
    except ValueError as e:
        raise CahpError(f"{path} is not valid JSON ({e}); re-run `cahp-deploy handoff`") from e
    check_schema(rec, SCHEMA, str(path))
    return rec


def verify_handoff(handoff_dir, smoke: bool = True) -> dict:
    """Re-check a handoff dir; return ``{"artifact", "files_checked", "variants", "smoke"}`` like ``verify``."""
    root = Path(handoff_dir)
    rec = load_record(root)
    files = rec.get("files") or {}
    for name, r in sorted(files.items()):
        p = root / name
        if not p.is_file():
            raise CahpError(f"{root}: {name} is listed in {HANDOFF_FILE} but missing; re-run `cahp-deploy handoff`")
        if p.stat().st_size != r.get("bytes") or sha256_file(p) != r.get("sha256"):
            raise CahpError(f"{root}: {name} was tampered with (size or sha256 differs from {HANDOFF_FILE}); "
                            "re-run `cahp-deploy handoff`")
    for p in sorted(root.rglob("*")):
        name = p.relative_to(root).as_posix()
        if p.is_file() and name != HANDOFF_FILE and name not in files and p.suffix in _BEHAVIOUR_SUFFIXES:
            raise CahpError(f"{root}: {name} is not listed in {HANDOFF_FILE} (added after handoff?); remove it")
    if rec.get("triton"):
        from cahp_deploy.handoff.triton import check_config

        t = rec["triton"]
        check_config((root / t["config"]).read_text(), root / t["model"])
    result = {"artifact": str(root), "files_checked": len(files), "variants": [rec.get("variant")], "smoke": None,
              "record": HANDOFF_FILE}
    text_model = None
    if rec.get("triton_text"):
        from cahp_deploy.handoff.triton_text import verify_repository

        text_model = verify_repository(root, rec, run_model=smoke)
    if smoke:
        s = rec["smoke"]
        try:
            res = smoke_check(root / s["file"], s["inputs"], s["logits"], parity.FP32_ATOL,
                              recorded="the logits recorded at handoff")
        except CahpError as e:
            raise CahpError(f"{root}: {s['file']} {e}; re-run `cahp-deploy handoff`") from e
        result["smoke"] = {rec.get("variant"): res}
        if text_model:
            result["smoke"]["text_model"] = text_model
    return result
