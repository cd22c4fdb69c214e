"""``cahp-deploy export``: model dir (dense or pruned) -> parity-checked ONNX artifact dir."""

from __future__ import annotations

import click

from cahp_deploy.commands._options import data_options, force_option


@click.command("export")
@click.argument("model_dir", type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Artifact dir to write.")
@click.option("--optimize/--no-optimize", default=True, show_default=True,
              help="Also write model_optimized.onnx (ONNX Runtime fusions, chosen by timing on this machine).")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Also write model_int8.onnx (dynamic INT8 for CPU; the MatMuls it hurts most stay fp32).")
@click.option("--int8-max-accuracy-drop", type=float, default=None,
              help="INT8 gate (the default with --data): the upper confidence bound of INT8's paired accuracy drop "
                   "vs fp32 on --split must be at most this many points; the search tunes to it on other rows [0.5].")
@click.option("--int8-min-agreement", type=float, default=None,
              help="INT8 gate instead: argmax agreement with fp32 at least this (for identical outputs; without "
                   "--data the only gate, on random tokens) [0.90 without --data].")
@click.option("--int8-smooth", type=float, default=None, metavar="ALPHA",
              help="Smooth every MatMul input before INT8 (SmoothQuant-style, an explicit Mul; 0.75 measured best) [off].")
@click.option("--confidence", type=float, default=0.9, show_default=True,
              help="One-sided confidence of the accuracy-drop upper bound the INT8 gate uses.")
@click.option("--per-channel/--per-tensor", "per_channel", default=None,
              help="INT8 weight scales per output channel or per tensor [default: measure both, keep the better].")
@click.option("--int8-tuning-examples", type=int, default=2048, show_default=True,
              help="INT8 tunes on this many random rows of --data's train split (else the first half of --split, "
                   "then the gate is checked on the second half).")
@click.option("--int8-tuning-margin", type=float, default=None,
              help="INT8 search target = gate + margin on the tuning set [default: two standard errors of that estimate].")
@click.option("--fp16", is_flag=True, help="Also write model_fp16.onnx (for CUDA; fp32 inputs/outputs), checked on --provider.")
@click.option("--opset", type=int, default=None, help="ONNX opset [default: 18, Optimum's for every supported architecture].")
@click.option("--exporter", type=click.Choice(["auto", "optimum", "torch"]), default="auto", show_default=True,
              help="ONNX exporter: optimum (the [optimum] extra), torch (torch.onnx), or auto: optimum when it is "
                   "installed and supports the installed transformers, else torch. Same graph contract either way.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Device the artifact is made for (decides the fusions; checks fp16 there).")
@click.option("--no-timing", "no_timing", is_flag=True,
              help="Skip timing the optimization candidates; use the provider's default choice.")
@data_options(default_split="validation", required=False)
@click.option("--max-examples", type=int, default=None, help="Check parity on the first N rows of --split only [all].")
@force_option
def command(model_dir, out, optimize, quantize, int8_max_accuracy_drop, int8_min_agreement, int8_smooth, confidence, per_channel, int8_tuning_examples, int8_tuning_margin,
            fp16, opset, exporter, provider, no_timing, data, split, text_column, text_pair_column, label_column, max_examples,
            force) -> None:
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
    from cahp_deploy.errors import CahpError
    from cahp_deploy.export import export, load_manifest

    if quantize is None and per_channel is not None:
        flag = "--per-channel" if per_channel else "--per-tensor"
        raise CahpError(f"{flag} only applies to quantization; add --quantize int8 or drop {flag}")

    path = export(
        model_dir, out, optimize=optimize, quantize=quantize, per_channel=per_channel, fp16=fp16,
        opset=opset, data=data, split=split, text_column=text_column, text_pair_column=text_pair_column,
        label_column=label_column, force=force, provider=provider, measure=not no_timing,
        int8_max_accuracy_drop=int8_max_accuracy_drop, int8_min_agreement=int8_min_agreement, confidence=confidence,
        int8_tuning_examples=int8_tuning_examples,
        int8_tuning_margin=int8_tuning_margin, max_examples=max_examples, int8_smooth=int8_smooth,
        exporter=exporter,
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
