"""``cahp-deploy demo``: the whole product offline, on the packaged MiniLM and the packaged sample set.

Layout of ``out`` is that of ``run`` plus ``model/``, the fine-tuned demonstration classifier, which is
recorded in the same ``run.json`` as a ``finetune`` stage so a rerun resumes there too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cahp_deploy.demo import data_dir
from cahp_deploy.errors import CahpError
from cahp_deploy.hashing import sha256_dir, sha256_file

#: Demo-sized settings: short sentences, so short sequences; small grids so the whole demo takes
#: a few minutes on 2 cores. The demo takes the path a user should: an accuracy budget, decided on
#: validation (160 rows) and confirmed on test (160 rows, never used by any decision). Train is used
#: for selection, the refit and the fine-tune. 160 rows cannot show less than a few points (a model
#: identical to dense bounds at 2.75 points at 95%), so the toy budget is 5 points.
DEMO_BUDGET = 5.0
DEMO_RUN: dict[str, Any] = dict(
    select_split="train",
    eval_split="validation",
    confirm_split="test",
    max_accuracy_drop=DEMO_BUDGET,
    batch=(1, 32),
    seq=(32,),
    min_seconds=0.5,
)

BANNER = (
    "DEMONSTRATION on a small in-package sample set: {n} short review sentences written for "
    "cahp-deploy (binary sentiment), and the packaged all-MiniLM-L6-v2 encoder fine-tuned on them for "
    "about a minute. The numbers show how the tool works, not how your model will fare: run "
    "`cahp-deploy run YOUR_MODEL --data YOUR_DATA --out OUT` for that."
)


def demo_data_hashes() -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(data_dir().glob("*.jsonl"))}


def demo(out: str | os.PathLike, *, seed: int = 0, force: bool = False, console=None, **run_options) -> dict:
    """Fine-tune the packaged encoder on the packaged set, then ``run`` on it, all into ``out``."""
    from cahp_deploy import distributed
    from cahp_deploy.demo.finetune import EPOCHS, base_encoder_path, finetune
    from cahp_deploy.run.record import RunRecord, check_run_dir
    from cahp_deploy.run.stage import run

    if distributed.launched():
        raise CahpError("demo runs in one process; launch it without torchrun (`run` is data-parallel)")
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    out = Path(out)
    check_run_dir(out, force)
    hashes = demo_data_hashes()
    n = sum(sum(1 for _ in open(data_dir() / name)) for name in hashes)
    console.rule("[bold yellow]cahp-deploy demo")
    console.print(f"[yellow]{BANNER.format(n=n)}[/yellow]")

    base = base_encoder_path()
    record = RunRecord(out, force, say=console.print)
    model_dir = out / "model"
    existed = out.exists()
    try:
        record.stage(
            "finetune",
            {"base_sha256": sha256_dir(base), "data": hashes, "seed": seed, "epochs": EPOCHS},
            model_dir,
            lambda overwrite: finetune(model_dir, seed=seed, force=overwrite),
        )
    except BaseException:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    settings = {**DEMO_RUN, **run_options}
    result = run(model_dir, data_dir(), out, force=force, console=console, **settings)
    result["demo"] = True
    return result


__all__ = ["demo", "DEMO_RUN", "BANNER"]
