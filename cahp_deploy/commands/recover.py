"""``cahp-deploy recover``: a short fine-tune of a pruned model (see :func:`cahp_deploy.recovery.recover`)."""

from __future__ import annotations

import click

from cahp_deploy.commands._options import data_options, force_option
from cahp_deploy.recovery.config import RecoverConfig


@click.command("recover")
@click.argument("pruned_dir", type=click.Path())
@data_options(default_split="train")
@click.option("--out", required=True, type=click.Path(), help="Directory for the recovered model.")
@click.option("--eval-split", default=None, help="Held-out split measured before and after (e.g. validation).")
@RecoverConfig.cli()
@click.option("--max-length", default=None, type=int, help="Tokens per example [128, capped at the model's positions].")
@click.option("--seed", default=42, show_default=True, type=int, help="Seed of every random step.")
@force_option
def command(pruned_dir, data, split, text_column, text_pair_column, label_column, out, eval_split, max_length, seed,
            force, **options):
    """Fine-tune PRUNED_DIR for a few epochs to win back the accuracy lost to pruning."""
    from cahp_deploy.recovery import recover

    config = RecoverConfig.from_cli(options)
    record = recover(
        pruned_dir, data, out, split=split, eval_split=eval_split, seed=seed, text_column=text_column,
        text_pair_column=text_pair_column, label_column=label_column, force=force,
        **config.kwargs(max_length=max_length),
    )
    from cahp_deploy import distributed

    if not distributed.is_main():  # data-parallel: rank 0 reports
        return
    per_epoch = ", ".join(f"{e['seconds']:.1f} s" for e in record["epochs"])
    click.echo(f"recovered {out}: {len(record['epochs'])} epoch(s) on {record['num_examples']} examples ({per_epoch})")
    if record["accuracy_before"] is not None:
        click.echo(
            f"accuracy on {eval_split}: {100 * record['accuracy_before']:.2f}% -> {100 * record['accuracy_after']:.2f}%"
            + (f" (simulated INT8: {100 * record['accuracy_after_int8']:.2f}%)" if config.qat else "")
        )
    if record["stopped_early"]:
        click.echo(f"stopped early: the time budget of {config.time_budget:g} s ran out")
