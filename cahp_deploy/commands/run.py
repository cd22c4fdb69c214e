"""`cahp-deploy run`: select -> prune -> export (dense and pruned) -> bench, resumable, in one OUT dir."""

from __future__ import annotations

import click

from cahp_deploy.commands._options import force_option


def passive_omp_threads() -> None:
    """Idle OpenMP threads sleep instead of spinning (unless the user set OMP_WAIT_POLICY).

    Measured on a shared 2-core machine (load ~11): a MiniLM training step took 8.1 s with torch's
    default spinning threads and 0.74 s with passive ones; one thread took 0.71 s. Spinning threads
    fight every other process for the cores. Must be set before torch is imported.
    """
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def int_list(ctx, param, value: str | None) -> tuple[int, ...] | None:
    """Parse "1,8,32" into (1, 8, 32); a one-line usage error otherwise."""
    if value is None:
        return None
    try:
        items = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 1,8,32") from None
    if not items or min(items) < 1:
        raise click.BadParameter(f"{value!r}: give positive integers, e.g. 1,8,32")
    return items


#: `run`'s options for the select stage, in --help order
_SELECT_OPTIONS = [
    click.option("--method", default="cahp", show_default=True, help="Selection method (see `cahp-deploy select --help`)."),
    click.option("--select-split", default="train", show_default=True, help="Split the heads are selected on."),
    click.option("--eval-split", default="validation", show_default=True, help="Split accuracy is measured on (never the selection split)."),
    click.option("--text-column", default=None, help="Text column [default: text, or premise/hypothesis when present]."),
    click.option("--text-pair-column", default=None, help="Second text column for pair tasks."),
    click.option("--label-column", default="label", show_default=True, help="Integer label column."),
    click.option("--seed", default=42, show_default=True, type=int, help="Seed of every random step."),
    click.option("--degree", default=None, type=int, help="CAHP: degree of the polynomial the knee is found on [select's default]."),
    click.option("--pool-size", default=None, type=int, help="CAHP: attention maps are resized to B x B [select's default]."),
    click.option("--space", default=None, type=click.Choice(["tsne", "full"]), help="CAHP: cluster t-SNE embeddings or the full profiles."),
    click.option("--heads", default=None, type=int, help="Heads to keep (baselines; CAHP picks its own at the knee)."),
    click.option("--keep-ratio", default=None, type=float, help="Fraction of heads to keep (baselines)."),
    click.option("--max-examples", default=None, type=int, help="Use at most N selection examples."),
    click.option("--ffn-method", default=None, type=click.Choice(["cahp", "gradient", "random"]),
                 help="Also prune FFN neurons with this method [cahp with --method cahp, else gradient]."),
    click.option("--ffn-keep-ratio", default=None, type=float,
                 help="Fraction of FFN neurons to keep; with --max-accuracy-drop, the least any rung keeps (the "
                      "knee's): the share falls with the head count, from every neuron at every head."),
    click.option("--ffn-neurons", default=None, type=int, help="FFN neurons to keep in all (CAHP without a budget: each layer's knee)."),
]

#: the refit and the recovery fine-tune
_RECOVER_OPTIONS = [
    click.option("--reconstruct/--no-reconstruct", default=True,
                 help="Refit each pruned layer's output projections against the dense model by least squares "
                      "(no training, no labels), before any fine-tune [on]."),
    click.option("--reconstruct-rows", default=None, type=int,
                 help="Calibration rows of the selection split the refit reads [2000]."),
    click.option("--recover/--no-recover", default=None,
                 help="Fine-tune after pruning (and the refit) [on, except under --max-accuracy-drop with the "
                      "refit: measured, fine-tuning on gold labels moves pruned models away from dense]."),
    click.option("--recover-epochs", default=3, show_default=True, type=int, help="Recovery epochs (the CAHP reference uses 3)."),
    click.option("--recover-lr", default=None, type=float, help="Recovery learning rate [recover's default, 2e-5]."),
    click.option("--recover-max-examples", default=None, type=int, help="Recover on a seeded random subset of N rows."),
    click.option("--recover-split", default=None, help="Split recovery trains on [the selection split]."),
    click.option("--distill", is_flag=True, help="Recovery also distils from the dense MODEL (KL on its logits)."),
    click.option("--qat/--no-qat", default=None,
                 help="Recovery is quantization-aware: it trains under the rounding of the INT8 export "
                      "[on when INT8 is exported: the pruned INT8 graph then keeps every MatMul INT8; ~2x recovery time]."),
]

#: the accuracy budget: its ladder, distillation, the promise's rows, the length
_BUDGET_OPTIONS = [
    click.option("--max-accuracy-drop", default=None, type=float,
                 help="Accuracy budget in points: test a ladder of head counts from every head down to CAHP's "
                      "knee, in order, while the upper confidence bound of each candidate's paired drop vs dense, "
                      "on --eval-split's decision rows, is within P (the first rung is dense itself); ship the "
                      "fastest measured artifact that keeps it, dense INT8 included, confirmed on rows no decision saw."),
    click.option("--search-step", default=None, type=int,
                 help="With --max-accuracy-drop: heads between the ladder's rungs [about a twelfth of the heads]."),
    click.option("--ladder", default="macs", show_default=True, type=click.Choice(["macs", "heads"]),
                 help="With --max-accuracy-drop: 'macs', the progressive ladder: each rung removes a further ~5% "
                      "of the dense MACs from heads and FFN neurons together, nested, the cheaper move per rung "
                      "measured on calibration rows; 'heads' tests CAHP head counts (FFN share falling with them)."),
    click.option("--mac-step", default=None, type=float,
                 help="With --ladder macs: share of the dense MACs between rungs [0.05]."),
    click.option("--distill-data", default=None,
                 help="With --max-accuracy-drop: unlabelled in-domain text (a dataset dir or file; only the text "
                      "columns are read) each rung is distilled towards dense on after the refit (logits and every "
                      "layer's hidden states), kept only where it raises agreement with dense on a held-out part "
                      "of it. Rows found in the evaluation or confirmation splits are dropped."),
    click.option("--distill-split", default="train", show_default=True, help="Split of --distill-data to read."),
    click.option("--distill-max-examples", default=20000, show_default=True, type=int,
                 help="At most this many --distill-data rows train each rung (a seeded sample)."),
    click.option("--confirm-split", default=None,
                 help="Split that confirms the shipped artifact on rows no decision saw [a held-out part of --eval-split]."),
    click.option("--confirm-fraction", default=None, type=float,
                 help="With --max-accuracy-drop and no --confirm-split: share of --eval-split held out to confirm on "
                      "[0.38 at 90%: the decision and confirmation bounds equally wide]."),
    click.option("--confidence", default=None, type=float,
                 help="One minus the run's error rate [0.9]: the search and the shipping choice each decide at "
                      "half the error rate, the confirmation at this confidence."),
    click.option("--max-length", default=None, type=int,
                 help="The one max length (tokens) every stage scores at and the artifact serves [the longest "
                      "row of the data, capped at the model's positions]."),
]

#: export and bench
_EXPORT_BENCH_OPTIONS = [
    click.option("--quantize", default="int8", show_default=True, type=click.Choice(["int8", "none"]), help="Also export an INT8 variant."),
    click.option("--per-channel/--per-tensor", "per_channel", default=None, help="INT8 weight scales [measure both, keep the better]."),
    click.option("--int8-max-accuracy-drop", default=None, type=float,
                 help="Export's INT8 gate: upper bound of INT8's paired accuracy drop vs its fp32 graph, in points "
                      "[0.5; the budget itself under --max-accuracy-drop, gated on the selection split]."),
    click.option("--int8-min-agreement", default=None, type=float,
                 help="Export's INT8 gate instead: argmax agreement with fp32 at least this."),
    click.option("--fp16", is_flag=True, help="Also export an FP16 variant (for CUDA; checked on --provider)."),
    click.option("--opset", default=None, type=int, help="ONNX opset [export's default]."),
    click.option("--no-timing", "timing", flag_value=False, default=True, help="Export: skip timing the optimization candidates."),
    click.option("--provider", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda", "tensorrt"]), help="Where bench runs."),
    click.option("--batch", default=None, callback=int_list, help="Bench batch sizes, e.g. 1,32 [bench's default]."),
    click.option("--seq", default=None, callback=int_list, help="Bench sequence lengths, e.g. 128 [bench's default]."),
    click.option("--variant", "variants", multiple=True, type=click.Choice(["fp32", "optimized", "int8", "fp16"]), help="Bench these variants (repeatable) [optimized and int8]."),
    click.option("--min-seconds", default=None, type=float, help="Bench: minimum timed seconds per cell [bench's default]."),
    click.option("--min-reps", default=None, type=int, help="Bench: minimum timed repetitions per cell [bench's default]."),
    click.option("--warmup", default=None, type=int, help="Bench: untimed runs per cell [bench's default]."),
    click.option("--no-traffic", "traffic", flag_value=False, default=True, help="Bench: skip real-traffic mode."),
    click.option("--threads", default=None, type=int, help="Bench: ONNX Runtime intra-op threads [one per core]."),
    click.option("--eval-max-examples", default=None, type=int, help="Measure accuracy (recovery, budget, bench) on the first N rows of --eval-split."),
]


def run_options(f):
    """The options of `run` (also used by `demo` for the ones a user may want to change)."""
    for opt in reversed(_SELECT_OPTIONS + _RECOVER_OPTIONS + _BUDGET_OPTIONS + _EXPORT_BENCH_OPTIONS):
        f = opt(f)
    return f


@click.command("run")
@click.argument("model")
@click.option("--data", required=True, help="Labelled data: a dir of <split>.jsonl/.csv/.parquet files, a save_to_disk dir, or a hub id.")
@click.option("--out", required=True, type=click.Path(path_type=str), help="Run directory (rerun with the same --out to resume).")
@run_options
@force_option
def command(model, data, out, quantize, **options):
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

    result = run(model, data, out, quantize=None if quantize == "none" else quantize, **options)
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
