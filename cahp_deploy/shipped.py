"""The shipped choice of a `run`, read where `run` wrote it: ``OUT/confirm.json``.

`run`'s confirm stage chooses which variant to serve and confirms the accuracy promise on rows no
decision saw. It writes that choice to ``OUT/confirm.json`` and nowhere else: the artifacts export made
(``OUT/artifacts/{dense,pruned}``) are never rewritten afterwards, so every hash recorded for them stays
true. ``confirm.json`` names each artifact by its path relative to OUT and the sha256 of its
``manifest.json``; :func:`choice` finds the record next to an artifact dir (two levels up) and applies
it only when that manifest is still the one confirmed (an artifact exported again after the run is no
longer described by it).

``predict`` (its default variant, its promise warning), ``handoff`` (its variant rule, the model card's
promise) and ``bench`` (the report's "recommended" mark) read the choice through :func:`with_choice`.
Artifacts written before this rule carry ``recommended`` / ``promise`` in their manifest; those are still
read when no ``confirm.json`` describes the artifact.

Torch-free and ONNX-free: ``predict`` imports it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cahp_deploy.errors import CahpError
from cahp_deploy.hashing import sha256_file

CONFIRM_FILE = "confirm.json"
MANIFEST_FILE = "manifest.json"
DENSE, PRUNED = "dense", "pruned"
#: where `run` writes the two artifacts, relative to OUT (what confirm.json names: no absolute paths)
DENSE_ARTIFACT_DIR, PRUNED_ARTIFACT_DIR = "artifacts/dense", "artifacts/pruned"
#: the manifest keys the choice supplies (older artifacts carry them in the manifest itself)
CHOICE_KEYS = ("recommended", "recommended_why", "promise")


def artifact_records(out: Path, dense_art: Path, pruned_art: Path) -> dict[str, dict[str, str]]:
    """confirm.json's ``artifacts``: per artifact, its dir relative to ``out`` (the dir of confirm.json;
    `run` writes :data:`DENSE_ARTIFACT_DIR` and :data:`PRUNED_ARTIFACT_DIR`) and its manifest's sha256."""
    return {name: {"path": Path(os.path.relpath(Path(art).resolve(), Path(out).resolve())).as_posix(),
                   "manifest_sha256": sha256_file(Path(art) / MANIFEST_FILE)}
            for name, art in ((DENSE, dense_art), (PRUNED, pruned_art))}


def promise_of(record: dict[str, Any]) -> dict[str, Any]:
    """The promise as :func:`choice` hands it to `predict` and the handoff, from a confirm.json record."""
    shipped = record.get("shipped") or {}
    v = record["dense_int8"] if shipped.get("artifact") == DENSE else (record["variants"] or {}).get(shipped.get("variant"))
    conf = None if v is None else v["confirmation"]
    return {
        "confirmed": record.get("confirmed"),
        "max_drop_points": record.get("max_drop_points"),
        "max_length": record.get("max_length"),
        "shipped": {"artifact": shipped.get("artifact"), "variant": shipped.get("variant")},
        "confirmation": None if conf is None else {
            "drop": conf["drop"], "upper": conf["upper"], "low": conf["low"], "high": conf["high"],
            "rows": conf["n"], "on": record["confirmation_rows"]["how"], "confidence": conf["confidence"]},
    }


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CahpError(f"{path} is not valid JSON ({e}); rerun `cahp-deploy run` with the same --out") from None


def choice(artifact_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``{"recommended", "recommended_why", "promise", "source"}`` for ``artifact_dir`` from the
    confirm.json of the run that made it, or None when no confirm.json describes this very artifact.

    The pruned artifact gets the confirmed recommendation and the promise; the dense one names neither
    (as its manifest never did).
    """
    art = Path(artifact_dir).resolve()
    path = art.parent.parent / CONFIRM_FILE
    if not path.is_file() or not (art / MANIFEST_FILE).is_file():
        return None
    record = _read(path)
    for name, entry in (record.get("artifacts") or {}).items():
        if (path.parent / entry["path"]).resolve() != art:
            continue
        if entry.get("manifest_sha256") != sha256_file(art / MANIFEST_FILE):
            return None  # exported again after the run confirmed it: the record describes another artifact
        pruned = name == PRUNED
        return {"recommended": record.get("recommended") if pruned else None,
                "recommended_why": record.get("why") if pruned else None,
                "promise": promise_of(record) if pruned else None,
                "source": str(path)}
    return None


def with_choice(artifact_dir: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` (a copy) with the shipped choice of :func:`choice` in its :data:`CHOICE_KEYS` and
    ``recommended_source`` naming where it came from; the manifest's own keys when no confirm.json
    describes the artifact (artifacts written before confirm.json was the one record)."""
    got = choice(artifact_dir)
    if got is None:
        source = "the artifact's manifest" if manifest.get("recommended") is not None else None
        return {**manifest, "recommended_source": source}
    return {**manifest, **{k: got[k] for k in CHOICE_KEYS}, "recommended_source": got["source"]}


__all__ = ["CHOICE_KEYS", "CONFIRM_FILE", "DENSE", "DENSE_ARTIFACT_DIR", "PRUNED", "PRUNED_ARTIFACT_DIR",
           "artifact_records", "choice", "promise_of", "with_choice"]
