"""``cahp-deploy handoff``: artifact dir -> Triton model repository, ORT Mobile files or a plain dir."""

from __future__ import annotations

import sys

import click

from cahp_deploy.commands._options import force_option
from cahp_deploy.config import ColumnsConfig


@click.command("handoff")
@click.argument("artifact_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Handoff dir to write.")
@click.option("--target", type=click.Choice(["triton", "triton-text", "ort-mobile", "dir"]), default="dir",
              show_default=True,
              help="triton: model repository (ids in, ONNX Runtime backend) + config.pbtxt + client.py; triton-text: "
                   "model repository that takes raw text (Python backend: tokenizer + ONNX Runtime), served by "
                   "`cahp-deploy serve`, + client.py; ort-mobile: model.ort + reduced-op config; dir: model.onnx + tokenizer.")
@click.option("--variant", type=click.Choice(["fp32", "optimized", "int8", "fp16"]), default=None,
              help="Variant to hand off [default: the manifest's recommended one, else optimized, else fp32].")
@click.option("--name", default=None, help="Model name (Triton) [default: the artifact dir's name].")
@click.option("--trim-vocab", "trim_vocab", default=None,
              help="Keep only the tokens these texts use (a data path, as --data elsewhere); WordPiece only.")
@click.option("--trim-split", default="train", show_default=True, help="Split of --trim-vocab whose texts set the vocabulary.")
@click.option("--heldout-split", default="validation", show_default=True,
              help="Split of --trim-vocab the [UNK] rate, parity and accuracy are measured on.")
@ColumnsConfig.cli()
@click.option("--max-examples", type=int, default=None, help="Measure on the first N held-out rows only [all].")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="Triton instance_group kind.")
@click.option("--max-batch-size", type=int, default=32, show_default=True, help="Triton max_batch_size (0: no batching).")
@click.option("--instances", type=int, default=1, show_default=True, help="Triton model instances.")
@click.option("--max-text-chars", type=int, default=10_000, show_default=True,
              help="triton-text: a longer text gets an error response (the model reads only its max length in tokens).")
@click.option("--dynamic-batching/--no-dynamic-batching", default=True, show_default=True,
              help="triton-text: Triton's dynamic batcher groups concurrent requests.")
@click.option("--max-queue-delay-us", type=int, default=2_000, show_default=True,
              help="triton-text: how long the dynamic batcher waits for more requests (microseconds).")
@click.option("--merge-requests/--no-merge-requests", default=None,
              help="triton-text: run the texts of one dynamic batch as one ONNX batch [default: yes, except for INT8, "
                   "whose per-batch activation scales would make a row's answer depend on its neighbours].")
@click.option("--ort-threads", type=int, default=0, show_default=True,
              help="triton-text: ONNX Runtime intra-op threads per model instance (0: ONNX Runtime's default).")
@click.option("--bench-report", type=click.Path(), default=None,
              help="A `cahp-deploy bench` report (dir or report.json) of this artifact: its latencies and machine go "
                   "into MODEL_CARD.md.")
@force_option
def command(artifact_dir, out, target, variant, name, trim_vocab, trim_split, heldout_split, text_column,
            text_pair_column, label_column, max_examples, device, max_batch_size, instances, max_text_chars,
            dynamic_batching, max_queue_delay_us, merge_requests, ort_threads, bench_report, force) -> None:
    """Turn ARTIFACT_DIR (from `cahp-deploy export`) into what a serving or edge team deploys as is.

    \b
    Always writes MODEL_CARD.md (labels, heads kept, accuracy and its split, versions, hashes,
    reproduce commands) and handoff.json (sha256 of every file); `cahp-deploy verify OUT` re-checks it.
    A failed check (tampered artifact, config vs graph, .ort parity, trimmed-vocab parity) writes nothing.
    """
    from cahp_deploy.handoff import handoff
    from cahp_deploy.handoff.verify import load_record

    path = handoff(artifact_dir, out, target, variant=variant, name=name, trim_vocab=trim_vocab, trim_split=trim_split,
                   heldout_split=heldout_split, text_column=text_column, text_pair_column=text_pair_column,
                   label_column=label_column, max_examples=max_examples, device=device,
                   max_batch_size=max_batch_size, instances=instances, force=force, bench_report=bench_report,
                   max_text_chars=max_text_chars, dynamic_batching=dynamic_batching,
                   max_queue_delay_us=max_queue_delay_us, merge_requests=merge_requests, ort_threads=ort_threads,
                   command=["cahp-deploy", *sys.argv[1:]] if sys.argv[1:2] == ["handoff"] else None)
    rec = load_record(path)
    parts = [f"{rec['target']} from {rec['variant']} ({rec['variant_reason']})"]
    t = rec.get("trim_vocab")
    if t:
        h = t["heldout"]
        parts.append(f"vocab {t['vocab_before']} -> {t['vocab_after']}, model {t['bytes_before'] / 2**20:.1f} -> "
                     f"{t['bytes_after'] / 2**20:.1f} MiB; on {h['split']}: {h['dropped_token_rate']:.2%} of tokens dropped, "
                     f"[UNK] {h['unk_rate_before']:.2%} -> {h['unk_rate_after']:.2%}, {h['rows_covered']}/{h['rows']} rows "
                     f"covered (max|diff| {t['covered_parity']['max_abs_diff']:.1e}), accuracy {t['accuracy']['describe']}")
    if rec.get("triton_text"):
        sm = rec["triton_text"]["text_smoke"]
        parts.append(f"text model vs predict max|prob diff| {sm['vs_predict_max_abs_diff']:.1e}; "
                     f"serve it with `cahp-deploy serve {path}`")
    if rec.get("ort_parity"):
        parts.append(f".ort vs .onnx max|diff| {rec['ort_parity']['max_abs_diff']:.1e}")
    click.echo(f"wrote {path}: " + "; ".join(parts))
