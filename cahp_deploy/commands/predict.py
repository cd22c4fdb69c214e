"""`cahp-deploy predict`: label text with an exported artifact (ONNX Runtime + tokenizers only, no torch)."""

from __future__ import annotations

import json

import click


@click.command("predict")
@click.argument("artifact_dir", type=click.Path(file_okay=False, path_type=str))
@click.argument("texts", nargs=-1)
@click.option("--file", "input_file", default=None, help="JSONL inputs: {\"text\": ...} (+ \"text_pair\") per line.")
@click.option("--pair", "text_pair", default=None, help="Second text for a pair task (with one TEXT).")
@click.option("--variant", default=None, help="fp32, optimized, int8 or fp16 [default: optimized, else fp32].")
@click.option("--provider", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--max-length", default=None, type=int, help="Truncate inputs to this many tokens [default: the model's limit].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per input.")
def command(artifact_dir, texts, input_file, text_pair, variant, provider, batch_size, max_length, as_json):
    """Print the label and class scores for TEXTS (or --file) using ARTIFACT_DIR's ONNX graph."""
    from cahp_deploy.errors import CahpError
    from cahp_deploy.predict import predict, read_inputs

    texts = list(texts)
    pairs = None
    if input_file:
        if texts:
            raise CahpError("give either TEXT arguments or --file, not both")
        texts, pairs = read_inputs(input_file)
    elif text_pair is not None:
        if len(texts) != 1:
            raise CahpError("--pair goes with exactly one TEXT")
        pairs = [text_pair]
    results = predict(
        artifact_dir, texts, pairs, variant=variant, batch_size=batch_size, max_length=max_length,
        provider=provider,
    )
    for r in results:
        if as_json:
            click.echo(json.dumps(r.to_dict()))
        else:
            scores = "  ".join(f"{k}={v:.4f}" for k, v in r.scores.items())
            shown = r.text if r.text_pair is None else f"{r.text} || {r.text_pair}"
            click.echo(f"{r.label}\t{scores}\t{shown}")
