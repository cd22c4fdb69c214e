"""`cahp-deploy run`: select -> prune -> export (dense and pruned) -> bench, resumable, in one OUT dir.

Its options are the stage commands' (:class:`cahp_deploy.run.config.RunConfig` composes their configs).
"""

from __future__ import annotations

import click

from cahp_deploy.commands._options import force_option
from cahp_deploy.run.config import RunConfig


def passive_omp_threads() -> None:
    """Idle OpenMP threads sleep instead of spinning (unless the user set OMP_WAIT_POLICY).

    Measured on a shared 2-core machine (load ~11): a MiniLM training step took 8.1 s with torch's
    default spinning threads and 0.74 s with passive ones; one thread took 0.71 s. Spinning threads
    fight every other process for the cores. Must be set before torch is imported.
    """
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@click.command("run")
@click.argument("model")
@click.option("--data", required=True, help="Labelled data: a dir of <split>.jsonl/.csv/.parquet files, a save_to_disk dir, or a hub id.")
@click.option("--out", required=True, type=click.Path(path_type=str), help="Run directory (rerun with the same --out to resume).")
@RunConfig.cli
@force_option
def command(model, data, out, force, **options):
    """Select heads of MODEL, prune them, recover, export dense and pruned to ONNX, benchmark both.

    \b
    OUT/summary.md            the answer in words: heads kept, accuracy change, speedup, size
    OUT/selection.json        which heads were kept, and why
    OUT/pruned/               the pruned Hugging Face model
    OUT/recovered/            the same after recovery (the model that is exported)
    OUT/search/               with --max-accuracy-drop: every candidate tried, the trade-off plot
    OUT/artifacts/{dense,pruned}/   ONNX artifacts (fp32, optimized, int8) + manifest.json
    OUT/report/               report.md, report.json, plots
    OUT/run.json              what each stage saw and made; a rerun skips stages still up to date

    Exit status 3: everything was written, but the accuracy promise was NOT confirmed on the rows no
    decision saw (nothing is recommended; see summary.md); 2: bad input, nothing written.
    """
    passive_omp_threads()
    from cahp_deploy.run.stage import run
    from cahp_deploy.run.summarize import print_result

    result = run(model, data, out, RunConfig.from_options(**options), force=force)
    if result is not None:  # None: a rank other than 0 of a launched run, which reports nothing
        print_result(result)
        exit_if_not_confirmed(result)


def exit_if_not_confirmed(result: dict) -> None:
    """A promise the unseen rows did not back stops a CI pipeline: one line on stderr, exit 3."""
    import sys

    from cahp_deploy.run.promise import EXIT_NOT_CONFIRMED

    confirm = (result.get("summary") or {}).get("confirm") or {}
    if confirm.get("confirmed") is False:
        click.echo(f"error: the accuracy promise ({confirm.get('max_drop_points'):g} points) was NOT confirmed on rows no "
                   f"decision saw; everything is written to {result['out']}, nothing is recommended", err=True)
        sys.exit(EXIT_NOT_CONFIRMED)
