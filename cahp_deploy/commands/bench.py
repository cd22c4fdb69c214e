"""``cahp-deploy bench``: maps its options onto :func:`cahp_deploy.bench.bench`."""

from __future__ import annotations

import click

from cahp_deploy.bench.stage import DEFAULT_MIN_REPS, DEFAULT_MIN_SECONDS, DEFAULT_TRAFFIC_SEQUENCES, DEFAULT_WARMUP
from cahp_deploy.commands._options import data_options, force_option
from cahp_deploy.errors import CahpError

_VARIANTS = ("fp32", "optimized", "int8", "fp16")


def _int_list(option: str, text: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32); an empty string is an empty grid, which bench() rejects."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return tuple(int(p) for p in parts)
    except ValueError as e:
        raise CahpError(f"{option} takes comma-separated integers like 1,8,32, got {text!r}") from e


@click.command("bench")
@click.argument("artifact_dirs", nargs=-1, required=True, metavar="ARTIFACT_DIR [ARTIFACT_DIR ...]")
@click.option("--baseline", required=True, help="Dense artifact dir of the same model; timed in the same run.")
@click.option("--out", required=True, help="Report dir to write (report.json, report.md, PNG plots).")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True, help="ONNX Runtime execution provider.")
@click.option("--variant", "variants", multiple=True, type=click.Choice(_VARIANTS), help="Variant to time (repeatable) [default: every variant found; fp16 only off-CPU].")
@click.option("--batch", default="1,8,32", show_default=True, help="Batch sizes of the fixed grid.")
@click.option("--seq", default="32,128,512", show_default=True, help="Sequence lengths of the fixed grid.")
@data_options(default_split="validation", required=False)
@click.option("--max-examples", type=int, default=None, help="Score accuracy on the first N examples only [default: all].")
@click.option("--no-traffic", is_flag=True, help="Skip real-traffic mode (batches drawn from --data).")
@click.option("--traffic-sequences", type=int, default=DEFAULT_TRAFFIC_SEQUENCES, show_default=True, help="Real traffic: sequences drawn from --data per batch size.")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads [default: one per physical core].")
@click.option("--min-seconds", type=float, default=DEFAULT_MIN_SECONDS, show_default=True, help="Timed seconds per session per cell, at least.")
@click.option("--min-reps", type=int, default=DEFAULT_MIN_REPS, show_default=True, help="Timed repetitions per session per cell, at least.")
@click.option("--warmup", type=int, default=DEFAULT_WARMUP, show_default=True, help="Untimed runs per session per cell.")
@force_option
def command(artifact_dirs, baseline, out, provider, variants, batch, seq, data, split, text_column, text_pair_column,
            label_column, max_examples, no_traffic, traffic_sequences, threads, min_seconds, min_reps, warmup, force):
    """Time, measure and score ARTIFACT_DIRs against a dense --baseline; write a report dir.

    Every artifact is verified first. Per (batch x seq) cell every session is timed round-robin;
    with --data, accuracy (ONNX Runtime) and real-traffic batches are added.
    """
    from cahp_deploy.bench import bench

    rep = bench(
        list(artifact_dirs), baseline, out,
        provider=provider, variants=list(variants) or None,
        batches=_int_list("--batch", batch), seqs=_int_list("--seq", seq),
        data=data, split=split, text_column=text_column, text_pair_column=text_pair_column, label_column=label_column,
        max_examples=max_examples, traffic=not no_traffic, traffic_sequences=traffic_sequences, threads=threads,
        min_seconds=min_seconds, min_reps=min_reps, warmup=warmup, force=force,
    )
    click.echo(f"wrote {out}/report.md ({len(rep['cells'])} cells, {len(rep['artifacts'])} artifacts)")
