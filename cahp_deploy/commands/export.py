"""``cahp-deploy export``: model dir (dense or pruned) -> parity-checked ONNX artifact dir."""

from __future__ import annotations

import click

from cahp_deploy.commands._options import data_options, force_option


@click.command("export")
@click.argument("model_dir", type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Artifact dir to write.")
@click.option("--optimize/--no-optimize", default=True, show_default=True,
              help="Also write model_optimized.onnx (ONNX Runtime fusions, chosen by timing on this machine).")
@click.option("--quantize", type=click.Choice(["int8"]), default=None, help="Also write model_int8.onnx (dynamic INT8, CPU).")
@click.option("--int8-min-agreement", type=float, default=0.99, show_default=True,
              help="INT8 gate: argmax agreement with PyTorch fp32 on --data (recorded in the manifest).")
@click.option("--per-channel", is_flag=True, help="Per-channel INT8 weight scales (with --quantize int8).")
@click.option("--fp16", is_flag=True, help="Also write model_fp16.onnx (for CUDA; fp32 inputs/outputs), checked on --provider.")
@click.option("--opset", type=int, default=None, help="ONNX opset [default: Optimum's for the architecture].")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Device the artifact is made for (decides the fusions; checks fp16 there).")
@click.option("--no-timing", "no_timing", is_flag=True,
              help="Skip timing the optimization candidates; use the provider's default choice.")
@data_options(default_split="validation", required=False)
@force_option
def command(model_dir, out, optimize, quantize, int8_min_agreement, per_channel, fp16, opset, provider, no_timing,
            data, split, text_column, text_pair_column, label_column, force) -> None:
    """Export MODEL_DIR (a fine-tuned classifier, or a dir from `cahp-deploy prune`) to ONNX in --out.

    \b
    Every variant is checked against the PyTorch model (random inputs, plus --data when given):
    fp32/optimized within 1e-4, INT8 argmax agreement >= 99% on --data, FP16 within 1e-2.
    A failed check writes nothing. manifest.json records kept heads, hashes and parity figures.
    """
    from cahp_deploy.exporters import export, load_manifest

    path = export(
        model_dir, out, optimize=optimize, quantize=quantize, per_channel=per_channel, fp16=fp16,
        opset=opset, data=data, split=split, text_column=text_column, text_pair_column=text_pair_column,
        label_column=label_column, force=force, provider=provider, measure=not no_timing,
        int8_min_agreement=int8_min_agreement,
    )
    m = load_manifest(path)
    parts = []
    for name, v in m["variants"].items():
        p = v["parity"]
        size = m["files"][v["file"]]["bytes"] / 2**20
        extra = f", fusions={v['choice']}" if name == "optimized" else ""
        parts.append(f"{name} {size:.1f}MiB (max|diff| {p['max_abs_diff']:.1e}, agree {p['argmax_agreement']:.1%} on {p['on']}{extra})")
    click.echo(f"wrote {path}: " + "; ".join(parts))
