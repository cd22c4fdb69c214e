"""``cahp-deploy select``: decide which attention heads to keep (CAHP or a baseline)."""

from __future__ import annotations

import click

from cahp_deploy.commands._options import data_options, force_option
from cahp_deploy.methods import REGISTRY


class MaxExamples(click.ParamType):
    """A positive row count, or ``auto`` (read until CAHP's selection is stable)."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int) or value == "auto":
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number of rows nor 'auto'", param, ctx)


@click.command("select")
@click.argument("model")
@data_options(default_split="train")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="selection.json to write; the MSS curve goes beside it as <stem>_mss.png.")
@click.option("--method", type=click.Choice(list(REGISTRY)), default="cahp", show_default=True,
              help="Selection method. " + ", ".join(n for n, (_, b) in REGISTRY.items() if not b)
              + " choose how many heads (a budget, if given, caps them); the others need one.")
@click.option("--degree", type=int, default=6, show_default=True,
              help="CAHP: degree of the polynomial fitted to MSS(k) before the knee search (0: no smoothing).")
@click.option("--pool-size", type=int, default=32, show_default=True,
              help="CAHP: attention maps are resized to POOL_SIZE x POOL_SIZE.")
@click.option("--space", type=click.Choice(["tsne", "full"]), default="tsne", show_default=True,
              help="CAHP: cluster a 2-D t-SNE of the head profiles (the paper) or the profiles themselves.")
@click.option("--representative", type=click.Choice(["salience", "medoid"]), default="salience",
              show_default=True, help="CAHP: keep each cluster's most salient head, or its medoid.")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="fp32", show_default=True,
              help="CAHP: precision of the model's evidence passes. bf16 (auto: where the CPU/GPU has it natively) "
                   "runs them ~2.5x faster but moved the selection on minilm-sst5 (k* 15 vs 14, 10 of 15 heads "
                   "shared); statistics stay float64.")
@click.option("--salience-fraction", type=float, default=0.25, show_default=True,
              help="Leading fraction of the split's examples used for gradient salience.")
@click.option("--max-examples", type=MaxExamples(), default=None,
              help="Use only the first N examples of the split; 'auto' (cahp): stop reading once the selection is stable.")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of every random step.")
@click.option("--heads", type=int, default=None, help="Budget: keep this many heads.")
@click.option("--keep-ratio", type=float, default=None, help="Budget: keep this fraction of the heads.")
@click.option("--budget-from", type=click.Path(dir_okay=False), default=None,
              help="Budget: as many heads as this selection.json keeps (compare methods at equal budgets).")
@click.option("--allow-empty-layers", is_flag=True,
              help="Let a layer lose all its heads (and FFN neurons) (by default each layer keeps its most salient one).")
@click.option("--ffn-method", type=click.Choice(["cahp", "gradient", "random"]), default=None,
              help="Also select FFN neurons with this method [cahp with --method cahp, else gradient].")
@click.option("--ffn-keep-ratio", type=float, default=None, help="FFN budget: keep this fraction of the neurons.")
@click.option("--ffn-neurons", type=int, default=None,
              help="FFN budget: keep this many neurons in all (layers may end up ragged). "
                   "CAHP without a budget keeps each layer's knee.")
@click.option("--batch-size", type=int, default=None,
              help="Examples per forward pass (CAHP signatures; training batch of l0/dsp/pass) [method's default].")
@click.option("--max-length", type=int, default=None, help="Tokens per example at most [method's default].")
@click.option("--steps", type=int, default=None, help="l0/dsp/pass: optimizer steps [300].")
@click.option("--epochs", type=float, default=None, help="l0/dsp/pass: train this many epochs instead of --steps.")
@click.option("--lr", type=float, default=None, help="l0/dsp/pass: learning rate of the gate logits [the paper's].")
@click.option("--time-budget", type=float, default=None,
              help="attattr/l0/dsp/pass: seconds of work at most; the schedule shrinks to fit (0: no limit) [600].")
@click.option("--train-weights", is_flag=True, default=None,
              help="l0/dsp/pass: train a copy of the model weights jointly with the gates (arXiv 2110.03252).")
@click.option("--weights-lr", type=float, default=None, help="l0/dsp/pass with --train-weights: weights' learning rate [2e-5].")
@click.option("--lambda", "lambda_", type=float, default=None,
              help="l0: weight of the expected-L0 penalty; with a budget it is searched to hit it [0.01].")
@click.option("--ig-steps", type=int, default=None, help="attattr: integrated-gradients steps m [20].")
@click.option("--attattr-examples", type=int, default=None, help="attattr: examples attributed [200].")
@force_option
def command(model: str, data: str, split: str, text_column: str | None, text_pair_column: str | None,
            label_column: str, out: str, method: str, degree: int, pool_size: int, space: str,
            representative: str, precision: str, salience_fraction: float, max_examples: int | str | None, seed: int,
            heads: int | None, keep_ratio: float | None, budget_from: str | None,
            allow_empty_layers: bool, force: bool, lambda_: float | None, ffn_method: str | None,
            ffn_keep_ratio: float | None, ffn_neurons: int | None, **method_options) -> None:
    """Select which attention heads of MODEL to keep, from labelled --data; write --out.

    With CAHP (the default) the number of heads comes from the knee of the MSS curve; no ratio to
    guess. Baselines (gradient, random, ...) keep the budget you give.
    """
    from cahp_deploy.methods.stage import curve_path, select

    sel = select(
        model, data, out, method=method, split=split, text_column=text_column,
        text_pair_column=text_pair_column, label_column=label_column, max_examples=max_examples,
        seed=seed, heads=heads, keep_ratio=keep_ratio, budget_from=budget_from,
        options={
            "degree": degree, "pool_size": pool_size, "space": space, "representative": representative,
            "precision": precision,
            "salience_fraction": salience_fraction, "allow_empty_layers": allow_empty_layers,
            "lambda": lambda_, **method_options,
        },
        force=force, ffn_method=ffn_method, ffn_keep_ratio=ffn_keep_ratio, ffn_neurons=ffn_neurons,
    )
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
