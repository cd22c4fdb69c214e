"""``cahp-deploy study``: every method at every budget, before and after recovery (see :mod:`cahp_deploy.study.stage`)."""

from __future__ import annotations

import shlex
import sys

import click

from cahp_deploy.commands._options import force_option
from cahp_deploy.config import ColumnsConfig
from cahp_deploy.recovery.config import RecoverConfig

#: the fine-tune's options the study takes, under run's names (--recover-epochs, ...)
_RECOVER_OPTIONS = ("epochs", "lr", "batch_size", "max_examples")

# Kept in step with cahp_deploy.study.stage.DEFAULT_METHODS (not imported: --help must not load torch).
DEFAULT_METHODS = ("cahp", "gradient", "random", "attattr", "l0", "dsp", "pass")


def _ints(text: str, flag: str) -> tuple[int, ...]:
    from cahp_deploy.errors import CahpError

    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise CahpError(f"{flag} must be comma-separated integers, got {text!r}") from None


@click.command("study")
@click.argument("model", type=click.Path())
@click.option("--data", required=True, help="Labelled data (a dir of <split>.jsonl/.csv/.parquet files, ...).")
@click.option("--out", required=True, type=click.Path(), help="Study directory (resumed if it holds only cells/).")
@click.option("--select-split", default="train", show_default=True, help="Split the methods select on (and recovery trains on).")
@click.option("--eval-split", default="validation", show_default=True, help="Held-out split every cell is measured on.")
@click.option("--test-split", default=None, help="Optional second held-out split for the final table (e.g. test).")
@click.option("--budgets", default="0.1,0.25,0.5,0.75", show_default=True, help="Fractions of all heads to keep; CAHP's knee is always added.")
@click.option("--methods", default=",".join(DEFAULT_METHODS), show_default=True, help="Methods to compare (missing ones are skipped with a note).")
@click.option("--random-seeds", default="0,1,2", show_default=True, help="Seeds of the random baseline.")
@click.option("--recover/--no-recover", default=True, show_default=True, help="Fine-tune every pruned model and measure again.")
@RecoverConfig.cli(run=True, only=_RECOVER_OPTIONS)
@click.option("--max-examples", default=None, type=int, help="Select on the first N examples of the selection split.")
@click.option("--eval-max-examples", default=None, type=int, help="Measure on the first N examples of the evaluation split.")
@click.option("--max-length", default=128, show_default=True, type=int)
@click.option("--degrees", default="2,3,4,5,6,7,8", show_default=True, help="Knee polynomial degrees for the sensitivity scan.")
@click.option("--sensitivity-seeds", default="0,1,2,3,4", show_default=True, help="t-SNE / FasterPAM seeds for the sensitivity scan.")
@click.option("--method-option", "method_options", multiple=True, metavar="METHOD.KEY=VALUE",
              help="A method option, e.g. l0.steps=200 or cahp.space=full (repeatable).")
@click.option("--seed", default=42, show_default=True, type=int)
@ColumnsConfig.cli()
@click.option("--axis", type=click.Choice(["heads", "ffn"]), default="heads", show_default=True,
              help="heads: the head-selection methods; ffn: FFN neuron methods (every head kept) at --ffn-ratios.")
@click.option("--ffn-ratios", default="0.25,0.5,0.75", show_default=True, help="--axis ffn: fractions of FFN neurons to keep.")
@click.option("--ffn-methods", default="cahp,gradient,random", show_default=True, help="--axis ffn: neuron methods to compare.")
@click.option("--note", default=None, help="A line shown at the top of study.md (e.g. 'REDUCED run: ...').")
@force_option
def command(model, data, out, select_split, eval_split, test_split, budgets, methods, random_seeds, recover,
            max_examples, eval_max_examples, max_length, degrees, sensitivity_seeds, method_options, seed, text_column,
            text_pair_column, label_column, axis, ffn_ratios, ffn_methods, note, force, **options):
    """Compare every selection method on MODEL at several budgets, before and after recovery."""
    from cahp_deploy.study.stage import StudyConfig, parse_budgets, parse_method_option, study

    fine_tune = RecoverConfig.from_cli(options, run=True, only=_RECOVER_OPTIONS, recover=recover)
    cfg = StudyConfig(
        select_split=select_split, eval_split=eval_split, test_split=test_split, budgets=parse_budgets(budgets),
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
        random_seeds=_ints(random_seeds, "--random-seeds"), seed=seed, max_examples=max_examples,
        eval_max_examples=eval_max_examples, recover=recover, recover_epochs=fine_tune.epochs,
        recover_max_examples=fine_tune.max_examples, recover_lr=fine_tune.lr, recover_batch_size=fine_tune.batch_size,
        max_length=max_length, degrees=_ints(degrees, "--degrees"),
        sensitivity_seeds=_ints(sensitivity_seeds, "--sensitivity-seeds"),
        method_options=parse_method_option(method_options), note=note,
    )
    if axis == "ffn":
        from cahp_deploy.study.ffn_axis import ffn_study

        res = ffn_study(model, data, out, cfg, ratios=parse_budgets(ffn_ratios),
                        methods=tuple(m.strip() for m in ffn_methods.split(",") if m.strip()),
                        columns=dict(text_column=text_column, text_pair_column=text_pair_column,
                                     label_column=label_column))
        click.echo(f"FFN study written to {out}: {len(res['cells'])} cells in {res['seconds'] / 60:.1f} min "
                   f"(see {out}/ffn_study.md)")
        return
    result = study(model, data, out, cfg, text_column=text_column, text_pair_column=text_pair_column,
                   label_column=label_column, force=force,
                   command="cahp-deploy " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    click.echo(f"study written to {out}: {len(result['cells'])} cells in {result['timings']['total'] / 60:.1f} min "
               f"(see {out}/study.md)")
