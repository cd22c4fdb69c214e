"""``OUT/run.json``: what every stage saw and made, and the names of what the stages write in ``OUT``.

A rerun skips a stage whose output still has the recorded hash and whose inputs hash as recorded
(:meth:`RunRecord.stage`); ``force`` redoes all.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cahp_deploy import schema
from cahp_deploy.atomic import atomic_file
from cahp_deploy.errors import CahpError
from cahp_deploy.hashing import sha256_dir, sha256_file, sha256_json
from cahp_deploy.run.promise import DENSE_ARTIFACT_DIR, PRUNED_ARTIFACT_DIR

RUN_FILE = "run.json"
SELECTION_FILE = "selection.json"
PRUNED_DIR = "pruned"
REFIT_DIR = "refit"
RECOVERED_DIR = "recovered"
SEARCH_DIR = "search"
SUMMARY_FILE = "summary.md"
DENSE_ARTIFACT = DENSE_ARTIFACT_DIR
PRUNED_ARTIFACT = PRUNED_ARTIFACT_DIR
REPORT_DIR = "report"


def output_sha256(path: Path) -> str | None:
    """Hash of everything a stage wrote (every file, not only model files), or None if absent."""
    if path.is_dir():
        return sha256_dir(path, model_files_only=False)
    if path.is_file():
        return sha256_file(path)
    return None


def model_sha256(model: str | os.PathLike) -> str:
    """Content hash of a local model dir; a hub id is identified by its name (nothing downloaded)."""
    p = Path(model)
    return sha256_dir(p) if p.is_dir() else sha256_json({"hub_id": str(model)})


class RunRecord:
    """``OUT/run.json``: what every stage saw and made; decides which stages a rerun may skip."""

    def __init__(self, out: Path, force: bool, say: Callable[[str], None] = lambda s: None):
        self.out = out
        self.force = force
        self.say = say
        self.path = out / RUN_FILE
        self.data: dict[str, Any] = {"schema": schema.RUN, "stages": {}}
        if self.path.is_file():
            # Kept even with force (which only stops skipping), so stages a caller ran before `run`
            # (the demo's fine-tune) stay on record.
            try:
                with open(self.path) as f:
                    loaded = json.load(f)
                schema.check_schema(loaded, schema.RUN, str(self.path))
            except (json.JSONDecodeError, CahpError) as e:
                if not force:
                    raise CahpError(f"{self.path} is not a readable run record ({e}); pass --force to start over") from None
            else:
                self.data = loaded
                self.data.setdefault("stages", {})

    @property
    def stages(self) -> dict[str, dict]:
        return self.data["stages"]

    def save(self) -> None:
        with atomic_file(self.path, force=True) as tmp:
            with open(tmp, "w") as f:
                json.dump(self.data, f, indent=2)
                f.write("\n")

    def output_hash(self, name: str) -> str:
        return self.stages[name]["output_sha256"]

    def stage(self, name: str, inputs: dict[str, Any], output: Path, work: Callable[[bool], Any]) -> bool:
        """Run ``work(overwrite)`` unless ``output`` is still what this stage made from these inputs.

        Returns True when the stage ran. ``work`` must write ``output`` atomically; ``overwrite`` is
        True when a stale output of an earlier run is there to be replaced.
        """
        inputs_sha = sha256_json(inputs)
        prev = self.stages.get(name)
        if (
            not self.force
            and prev is not None
            and prev.get("inputs_sha256") == inputs_sha
            and prev.get("output_sha256") is not None
            and output_sha256(output) == prev["output_sha256"]
        ):
            prev["status"] = "skipped"
            self.save()
            self.say(f"[dim]{name}: up to date ({output.relative_to(self.out)}), skipped[/dim]")
            return False
        self.say(f"[bold]{name}[/bold] -> {output.relative_to(self.out)}")
        start = time.perf_counter()
        work(self.force or output.exists())
        seconds = time.perf_counter() - start
        self.stages[name] = {
            "status": "done",
            "inputs": inputs,
            "inputs_sha256": inputs_sha,
            "output": str(output.relative_to(self.out)),
            "output_sha256": output_sha256(output),
            "seconds": round(seconds, 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.save()
        return True


def check_run_dir(out: Path, force: bool) -> None:
    """``out`` must be new, empty, or a run dir of ours (then a rerun resumes there)."""
    if out.exists() and not out.is_dir():
        raise CahpError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / RUN_FILE).is_file() and not force:
        raise CahpError(
            f"output {out} already exists and is not a cahp-deploy run dir (no {RUN_FILE}); "
            "pass --force to write into it or choose another --out"
        )


__all__ = ["RUN_FILE", "RunRecord", "check_run_dir", "model_sha256", "output_sha256"]
