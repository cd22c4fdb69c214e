"""``cahp-deploy recover``: a short fine-tune of a pruned model (see :func:`cahp_deploy.recovery.recover`)."""

from __future__ import annotations

import click

from cahp_deploy.commands._options import data_options, force_option


@click.command("recover")
@click.argument("pruned_dir", type=click.Path())
@data_options(default_split="train")
@click.option("--out", required=True, type=click.Path(), help="Directory for the recovered model.")
@click.option("--eval-split", default=None, help="Held-out split measured before and after (e.g. validation).")
@click.option("--epochs", default=3, show_default=True, type=int, help="Epochs (the CAHP reference uses 3).")
@click.option("--lr", default=2e-5, show_default=True, type=float, help="Peak AdamW learning rate.")
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--max-length", default=None, type=int, help="Tokens per example [128, capped at the model's positions].")
@click.option("--distill-from", default=None, type=click.Path(), help="Dense model whose logits to distil from.")
@click.option("--temperature", default=2.0, show_default=True, type=float, help="Distillation temperature T.")
@click.option("--alpha", default=0.5, show_default=True, type=float, help="Weight of the distillation loss vs cross-entropy.")
@click.option("--max-examples", default=None, type=int, help="Train on a seeded random subset of N examples.")
@click.option("--time-budget", default=None, type=float, help="Stop training after this many seconds.")
@click.option("--train-embeddings", is_flag=True, help="Also update the word embeddings (frozen by default).")
@click.option("--qat", is_flag=True, help="Quantization-aware: train under the rounding `export --quantize int8` applies "
                                          "(per-channel int8 weights, per-batch uint8 inputs; straight-through gradients).")
@click.option("--seed", default=42, show_default=True, type=int)
@force_option
def command(pruned_dir, data, split, text_column, text_pair_column, label_column, out, eval_split, epochs,
            lr, batch_size, max_length, distill_from, temperature, alpha, max_examples, time_budget,
            train_embeddings, qat, seed, force):
    """Fine-tune PRUNED_DIR for a few epochs to win back the accuracy lost to pruning."""
    from cahp_deploy.recovery import recover

    record = recover(
        pruned_dir, data, out, split=split, eval_split=eval_split, epochs=epochs, lr=lr,
        batch_size=batch_size, max_length=max_length, distill_from=distill_from,
        temperature=temperature, alpha=alpha, seed=seed, max_examples=max_examples,
        time_budget=time_budget, freeze_embeddings=not train_embeddings, qat=qat, text_column=text_column,
        text_pair_column=text_pair_column, label_column=label_column, force=force,
    )
    from cahp_deploy import distributed

    if not distributed.is_main():  # data-parallel: rank 0 reports
        return
    per_epoch = ", ".join(f"{e['seconds']:.1f} s" for e in record["epochs"])
    click.echo(f"recovered {out}: {len(record['epochs'])} epoch(s) on {record['num_examples']} examples ({per_epoch})")
    if record["accuracy_before"] is not None:
        click.echo(
            f"accuracy on {eval_split}: {100 * record['accuracy_before']:.2f}% -> {100 * record['accuracy_after']:.2f}%"
            + (f" (simulated INT8: {100 * record['accuracy_after_int8']:.2f}%)" if qat else "")
        )
    if record["stopped_early"]:
        click.echo(f"stopped early: the time budget of {time_budget:g} s ran out")
