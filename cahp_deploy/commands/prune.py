"""``cahp-deploy prune``: physically remove the heads a selection drops."""

from __future__ import annotations

import json

import click

from cahp_deploy.commands._options import force_option


@click.command("prune")
@click.argument("model")
@click.option("--selection", "selection", required=True, type=click.Path(dir_okay=False),
              help="selection.json written by `cahp-deploy select` for this MODEL.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Pruned model dir to write (a complete Hugging Face model dir + pruning.json).")
@force_option
def command(model: str, selection: str, out: str, force: bool) -> None:
    """Remove the heads SELECTION drops from MODEL (a dense classifier dir) and save it to --out.

    Layers may keep any number of heads, zero included. Reload the result with
    `cahp_deploy.load_pruned(OUT)`; when every layer keeps a head, plain
    `AutoModelForSequenceClassification.from_pretrained(OUT)` works too (transformers 4.x).
    """
    from cahp_deploy.pruning import prune

    path = prune(model, selection, out, force=force)
    rec = json.loads((path / "pruning.json").read_text())
    macs = rec["macs_seq128"]
    neurons = "" if rec.get("num_neurons_kept") is None else \
        f", {rec['num_neurons_kept']}/{rec['num_neurons_total']} FFN neurons"
    click.echo(
        f"kept {rec['num_heads_kept']}/{rec['num_heads_total']} heads{neurons}; "
        f"parameters {rec['params_before']:,} -> {rec['params_after']:,} "
        f"(-{1 - rec['params_after'] / rec['params_before']:.1%}); "
        f"MACs/sequence@128 {macs['total_before'] / 1e9:.3f}G -> {macs['total_after'] / 1e9:.3f}G "
        f"(ceiling x{rec['flop_ceiling_speedup']:.2f}); wrote {path}"
    )
