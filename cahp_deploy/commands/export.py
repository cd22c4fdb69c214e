"""``cahp-deploy export``: model dir (dense or pruned) -> parity-checked ONNX artifact dir."""

from __future__ import annotations

import click

from cahp_deploy.commands._options import data_options, force_option
from cahp_deploy.export.config import ExportConfig


@click.command("export")
@click.argument("model_dir", type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Artifact dir to write.")
@ExportConfig.cli()
@data_options(default_split="validation", required=False)
@click.option("--max-examples", type=int, default=None, help="Check parity on the first N rows of --split only [all].")
@force_option
def command(model_dir, out, data, split, text_column, text_pair_column, label_column, max_examples, force,
            **options) -> None:
    """Export MODEL_DIR (a fine-tuned classifier, or a dir from `cahp-deploy prune`) to ONNX in --out.

    \b
    Every variant is checked against the PyTorch model (random inputs, plus --data when given):
    fp32/optimized within 1e-4, FP16 within 1e-2; INT8's paired accuracy drop vs fp32 on --data
    within 0.5 points (90% upper bound; or argmax agreement with --int8-min-agreement).
    A failed check writes nothing. manifest.json records kept heads, hashes and parity figures.

    \b
    INT8 is tuned on rows it is not gated on (--data's train split): every weight MatMul is
    quantized, then the most sensitive ones go back to fp32 until the gate holds there; the
    manifest records which, the INT8 share of MACs, the gate's interval and every search step.
    """
    from cahp_deploy.export import export, load_manifest

    config = ExportConfig.from_cli(options)
    path = export(
        model_dir, out, data=data, split=split, text_column=text_column, text_pair_column=text_pair_column,
        label_column=label_column, max_examples=max_examples, force=force, **config.kwargs(),
    )
    m = load_manifest(path)
    parts = []
    for name, v in m["variants"].items():
        p = v["parity"]
        size = m["files"][v["file"]]["bytes"] / 2**20
        extra = f", fusions={v['choice']}" if name == "optimized" else ""
        if name == "int8":
            g = v["gate"]["result"]
            extra = (f", {v['int8_mac_fraction']:.0%} of MACs INT8 ({len(v['excluded_nodes'])} MatMuls fp32)"
                     + (f", accuracy drop {g['drop']:+.2f} points (upper {g['drop_upper']:+.2f})" if "drop" in g else ""))
            if v.get("speedup_vs_source"):
                extra += ", speed vs fp32 " + "/".join(f"x{x:.2f}" for x in v["speedup_vs_source"].values()) + \
                    " at " + "/".join(v["speedup_vs_source"])
        parts.append(f"{name} {size:.1f}MiB (max|diff| {p['max_abs_diff']:.1e}, agree {p['argmax_agreement']:.1%} on {p['on']}{extra})")
    click.echo(f"wrote {path}: " + "; ".join(parts) + f" [exporter: {m['exporter']['name']}]")
