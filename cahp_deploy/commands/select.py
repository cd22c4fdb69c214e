"""``cahp-deploy select``: decide which attention heads to keep (CAHP or a baseline)."""

from __future__ import annotations

import click

from cahp_deploy.commands._options import data_options, force_option
from cahp_deploy.methods.config import SelectConfig


@click.command("select")
@click.argument("model")
@data_options(default_split="train")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="selection.json to write; the MSS curve goes beside it as <stem>_mss.png.")
@SelectConfig.cli()
@click.option("--budget-from", type=click.Path(dir_okay=False), default=None,
              help="Budget: as many heads as this selection.json keeps (compare methods at equal budgets).")
@force_option
def command(model: str, data: str, split: str, text_column: str | None, text_pair_column: str | None,
            label_column: str, out: str, budget_from: str | None, force: bool, **options) -> None:
    """Select which attention heads of MODEL to keep, from labelled --data; write --out.

    With CAHP (the default) the number of heads comes from the knee of the MSS curve; no ratio to
    guess. Baselines (gradient, random, ...) keep the budget you give.
    """
    from cahp_deploy.methods.stage import curve_path, select

    config = SelectConfig.from_cli(options, split=split)
    sel = select(model, data, out, text_column=text_column, text_pair_column=text_pair_column,
                 label_column=label_column, budget_from=budget_from, force=force, **config.kwargs())
    if sel is None:  # a data-parallel rank other than 0: rank 0 reports and writes
        return
    knee = f" (k*={sel.knee})" if sel.knee is not None else ""
    per_layer = " ".join(str(len(k)) for k in sel.kept_heads)
    wrote = f"{out} and {curve_path(out)}" if sel.mss_curve else out
    neurons = ""
    if sel.kept_neurons is not None:
        neurons = (f"; {sel.ffn.get('method')}: kept {sel.num_neurons_kept}/{sel.num_neurons_total} FFN neurons, "
                   f"per layer [{' '.join(str(len(k)) for k in sel.kept_neurons)}]")
    click.echo(f"{sel.method}: kept {sel.num_heads_kept}/{sel.num_heads_total} heads{knee}; "
               f"per layer [{per_layer}]{neurons}; wrote {wrote}")
