"""MODEL_CARD.md: what the receiving team needs to know, only from recorded measurements.

Every number comes from the artifact's ``manifest.json`` (with the promise of the run's
``confirm.json``: :func:`cahp_deploy.shipped.with_choice`) or the handoff record (vocabulary
trimming, ORT parity); a number that was not measured is written as "not measured" with the command
that would measure it. Accuracy intervals: Wilson 90 % interval on the rows the accuracy was
measured on (the manifest records accuracy and row count, so the interval is recomputable).
"""

from __future__ import annotations

import math

from cahp_deploy.paired import DEFAULT_CONFIDENCE


def wilson(acc: float, n: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Two-sided Wilson score interval of a proportion (fractions)."""
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2))
    denom = 1 + z * z / n
    centre = (acc + z * z / (2 * n)) / denom
    half = z * math.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _accuracy_lines(manifest: dict, variant: str) -> list[str]:
    par = manifest["variants"][variant].get("parity", {})
    data = par.get("data")
    pdata = manifest.get("parity_data") or {}
    if not data or data.get("accuracy") is None:
        return ["- Accuracy: not measured at export (no --data). Measure it with "
                "`cahp-deploy export ... --data DATA` or `cahp-deploy bench ... --data DATA`."]
    n = int(data["num_examples"])
    lo, hi = wilson(float(data["accuracy"]), n)
    rows = f"{pdata['rows']}, " if pdata.get("rows") else ""
    return [f"- Accuracy ({variant}): {data['accuracy']:.2%} (90% Wilson CI {lo:.1%} .. {hi:.1%}) on "
            f"`{pdata.get('data')}` split `{pdata.get('split')}`, {rows}{n} rows; PyTorch reference "
            f"{data['reference_accuracy']:.2%} on the same rows."]


def _promise_lines(manifest: dict) -> list[str]:
    """The serving length, and the accuracy promise `run` made, confirmed or NOT (drop = dense minus this
    model, in points: positive is worse)."""
    lines = []
    if manifest.get("max_length"):
        lines.append(f"- Serves inputs of up to {manifest['max_length']} tokens (longer ones are truncated); every "
                     "accuracy figure here was measured at that length.")
    promise = manifest.get("promise")
    if not promise or promise.get("confirmed") is None or not promise.get("confirmation"):
        return lines
    c = promise["confirmation"]
    verdict = "confirmed" if promise["confirmed"] else "NOT confirmed: do not rely on it"
    shipped = promise.get("shipped") or {}
    lines.append(f"- Accuracy promise of the `run` that made this artifact (it shipped the {shipped.get('artifact')} "
                 f"model's `{shipped.get('variant')}` variant): at most {promise['max_drop_points']:g} points lost vs the dense model: {verdict}. "
                 f"Drop on {c['rows']} rows no decision saw ({c['on']}): {c['drop']:+.2f} points, "
                 f"{c['confidence']:.0%} CI {c['low']:+.2f} .. {c['high']:+.2f}, upper bound {c['upper']:+.2f}.")
    return lines


def _pruned_lines(manifest: dict, heads) -> list[str]:
    """Heads kept, parameters and FLOP ceiling, FFN neurons."""
    lines: list[str] = []
    if manifest.get("kept_heads") is None:
        lines.append(f"- Dense: all {manifest.get('num_heads_total')} attention heads kept.")
    else:
        lines.append(f"- Attention heads kept: {manifest.get('num_heads_kept')} of {manifest.get('num_heads_total')} "
                     f"(per layer {heads}).")
    pruning = manifest.get("pruning") or {}
    if pruning.get("params_before"):
        lines.append(f"- Parameters {pruning['params_before']:,} -> {pruning['params_after']:,}; FLOP ceiling speedup "
                     f"x{pruning.get('flop_ceiling_speedup', float('nan')):.2f} (multiply-accumulates, not a timing).")
    for key in sorted(k for k in pruning if "neuron" in k):  # FFN neuron pruning, when the pruning.json has it
        lines.append(f"- {key}: {pruning[key]}.")
    return lines


def _trim_lines(trim: dict | None) -> list[str]:
    """What vocabulary trimming changed and how it was checked."""
    lines: list[str] = []
    if trim:
        cov, acc = trim["heldout"], trim["accuracy"]
        lines += [
            f"- Vocabulary trimmed to the tokens of `{trim['data']}` [{trim['split']}] ({trim['rows']} rows) plus "
            f"special tokens: {trim['vocab_before']} -> {trim['vocab_after']} tokens; model file "
            f"{trim['bytes_before'] / 2**20:.1f} -> {trim['bytes_after'] / 2**20:.1f} MiB.",
            f"- Held-out `{cov['split']}` ({cov['rows']} rows): {cov['dropped_token_rate']:.2%} of its tokens are not in "
            f"the kept vocabulary (would be [UNK] if mapped one to one); the trimmed WordPiece tokenizer re-splits most "
            f"of those words, so its actual [UNK] share is {cov['unk_rate_before']:.2%} -> {cov['unk_rate_after']:.2%}; "
            f"{cov['rows_covered']} rows fully covered (identical ids and logits), the rest tokenized differently.",
            f"- Parity on fully covered rows (trimmed vs untrimmed ONNX): max |logit diff| "
            f"{trim['covered_parity']['max_abs_diff']:.1e} (limit {trim['covered_parity']['atol']:g}).",
            f"- Accuracy on `{cov['split']}`: untrimmed {acc['ref_accuracy']:.2f}% -> trimmed {acc['new_accuracy']:.2f}% "
            f"(change {acc['describe']}).",
        ]
    return lines


def _target_lines(record: dict) -> list[str]:
    """What was checked for the handoff target."""
    lines: list[str] = []
    if record.get("ort_parity"):
        p = record["ort_parity"]
        lines.append(f"- ORT format (`model.ort`) vs the ONNX file: max |logit diff| {p['max_abs_diff']:.1e} "
                     f"(limit {p['atol']:g}) on {p['num_examples']} rows ({p['inputs']}).")
    if record.get("triton"):
        lines.append("- Triton `config.pbtxt` parsed back and checked against the graph (names, dtypes, ranks).")
    if record.get("triton_text"):
        t = record["triton_text"]
        st, sm = t["settings"], t["text_smoke"]
        lines += [
            "- Triton text model (Python backend): `config.pbtxt` parsed back and checked against `serving.json` and "
            "the graph.",
            f"- Text in: truncated at {st['max_length']} tokens, padded with `{st['pad_token']}`; at most "
            f"{st['max_text_chars']} characters and {t['max_batch_size']} texts a request; "
            f"{'one ONNX batch per dynamic batch' if st['merge_requests'] else 'one ONNX batch per request'}.",
            f"- Its classifier vs `cahp-deploy predict` on {len(sm['texts'])} smoke texts: same labels, max |prob diff| "
            f"{sm['vs_predict_max_abs_diff']:.1e} (limit {sm['atol']:g}). Serve it with `cahp-deploy serve HANDOFF_DIR`.",
        ]
    return lines


def _latency_lines(manifest: dict, record: dict) -> list[str]:
    """Bench's figures, else export-time timings, else how to measure."""
    lines: list[str] = []
    timed = manifest["variants"].get("optimized", {}).get("timings_ms")
    if record.get("bench"):
        from cahp_deploy.handoff.bench_report import card_lines

        lines += card_lines(record["bench"])
        if record.get("trim_vocab"):
            lines += ["", "Timed before vocabulary trimming (trimming shrinks only the embedding table, a lookup)."]
    elif timed:
        lines.append(f"- Export-time timings (ms, median, exporting machine): {timed}.")
    else:
        lines.append("- Not measured in this artifact. Measure on the target machine with "
                     "`cahp-deploy bench ARTIFACT_DIR --data DATA` (it records the machine and load).")
    return lines


def render(manifest: dict, record: dict) -> str:
    """The card's Markdown text."""
    variant = record["variant"]
    labels = manifest.get("id2label") or {}
    heads = manifest.get("heads_per_layer")
    lines = [
        f"# Model card: {record['name']}",
        "",
        f"Sequence classifier ({manifest.get('model_type')}, task {manifest.get('task', 'text-classification')}), "
        f"{manifest.get('num_labels')} labels, handed off as target `{record['target']}` from the `{variant}` "
        f"variant ({record['variant_reason']}).",
        "",
        "## Labels",
        "",
        *(f"- {k}: {v}" for k, v in sorted(labels.items(), key=lambda kv: int(kv[0]))),
        "",
        "## What was pruned",
        "",
    ]
    lines += _pruned_lines(manifest, heads)
    lines += ["", "## What was verified", ""]
    par = manifest["variants"][variant].get("parity", {})
    lines.append(f"- {variant} vs PyTorch fp32: max |logit diff| {par.get('max_abs_diff', float('nan')):.1e}, "
                 f"argmax agreement {par.get('argmax_agreement', float('nan')):.2%} on {par.get('on')}.")
    lines += _accuracy_lines(manifest, variant)
    lines += _promise_lines(manifest)
    lines += _trim_lines(record.get("trim_vocab"))
    lines += _target_lines(record)
    lines += ["", "## Latency", ""]
    lines += _latency_lines(manifest, record)
    lines += ["", "## Versions", ""]
    lines += [f"- {k}: {v}" for k, v in sorted((manifest.get("versions") or {}).items())]
    lines += ["", "## Files (sha256)", ""]
    lines += [f"- `{name}`: {rec['bytes']} bytes, `{rec['sha256']}`" for name, rec in sorted(record["files"].items())]
    lines += [
        "", "## Reproduce", "",
        "```",
        f"# source model: {manifest.get('source_model')} (sha256 of dir {manifest.get('source_model_sha256')})",
        *record["commands"],
        f"cahp-deploy verify {record['out_name']}",
        "```",
        "",
    ]
    return "\n".join(lines)
