"""``cahp-deploy bench``: maps its options (:class:`cahp_deploy.bench.config.BenchConfig`) onto :func:`cahp_deploy.bench.bench`."""

from __future__ import annotations

import click

from cahp_deploy.bench.config import BenchConfig
from cahp_deploy.commands._options import data_options, force_option


@click.command("bench")
@click.argument("artifact_dirs", nargs=-1, required=True, metavar="ARTIFACT_DIR [ARTIFACT_DIR ...]")
@click.option("--baseline", required=True, help="Dense artifact dir of the same model; timed in the same run.")
@click.option("--out", required=True, help="Report dir to write (report.json, report.md, PNG plots).")
@BenchConfig.cli()
@data_options(default_split="validation", required=False)
@click.option("--max-examples", type=int, default=None, help="Score accuracy on the first N examples only [default: all].")
@force_option
def command(artifact_dirs, baseline, out, data, split, text_column, text_pair_column, label_column, max_examples, force,
            **options):
    """Time, measure and score ARTIFACT_DIRs against a dense --baseline; write a report dir.

    Every artifact is verified first. Per (batch x seq) cell every session is timed round-robin;
    with --data, accuracy (ONNX Runtime) and real-traffic batches are added.
    """
    from cahp_deploy.bench import bench

    config = BenchConfig.from_cli(options)
    rep = bench(
        list(artifact_dirs), baseline, out, data=data, split=split, text_column=text_column,
        text_pair_column=text_pair_column, label_column=label_column, max_examples=max_examples, force=force,
        **config.kwargs(),
    )
    click.echo(f"wrote {out}/report.md ({len(rep['cells'])} cells, {len(rep['artifacts'])} artifacts)")
