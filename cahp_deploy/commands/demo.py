"""`cahp-deploy demo`: the whole pipeline offline on the packaged MiniLM and an in-package sample set."""

from __future__ import annotations

import os

import click

from cahp_deploy.commands._options import force_option
from cahp_deploy.commands.run import passive_omp_threads


@click.command("demo")
@click.option("--out", required=True, type=click.Path(path_type=str), help="Directory for the demo run (rerun to resume).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the fine-tune.")
@force_option
def command(out, seed, force):
    """Fine-tune the packaged all-MiniLM-L6-v2 on a small in-package sentiment set, then `run` on it.

    Needs no network and no data of your own; takes a few minutes on 2 CPU cores. It is a
    demonstration: its numbers show how the tool works, not how your model will fare.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on a hub
    passive_omp_threads()
    from cahp_deploy.demo.quickstart import demo
    from cahp_deploy.run.summarize import print_result, summary_console

    result = demo(out, seed=seed, force=force)
    console = summary_console()
    print_result(result, console)
    console.print(
        "[yellow]This was a demonstration on a small in-package sample set.[/yellow]\n"
        "Next: cahp-deploy run YOUR_MODEL --data YOUR_DATA --out OUT  (see README.md)"
    )
