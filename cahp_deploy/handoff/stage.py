"""The ``handoff`` stage: verified artifact dir -> what a serving or edge team deploys as is.

::

    verify the artifact's hashes ──► choose the variant ──► [--trim-vocab: keep the tokens DATA uses;
        rewrite embeddings + tokenizer; [UNK] rate, covered-row parity <= 1e-5, accuracy on the held-out split]
        ──► target: triton (model repository + config.pbtxt checked against the graph + client.py)
                    triton-text (Python-backend model: text in, labels out; its tokenizer settings are
                                 predict's, and its classifier is run here against predict)
                    ort-mobile (model.ort + reduced-operator config, parity vs the .onnx)
                    dir (model.onnx + tokenizer)
        ──► smoke inputs/logits, MODEL_CARD.md, handoff.json (sha256 of every file)

Variant rule: the ``recommended`` variant of the run that made the artifact (its ``confirm.json``,
:mod:`cahp_deploy.shipped`; an older artifact's manifest) when it names one the artifact has, else
``optimized``, else ``fp32``; ``--variant`` overrides. Everything is written into a temporary sibling
of ``out`` that replaces it only when every check passed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from cahp_deploy import onnx_runtime
from cahp_deploy.atomic import atomic_dir, check_output_path
from cahp_deploy.errors import CahpError
from cahp_deploy.export import parity
from cahp_deploy.export.manifest import VARIANT_FILES, file_records, load_manifest, versions
from cahp_deploy.export.verify import verify as verify_artifact
from cahp_deploy.handoff import model_card, ort_mobile, triton, triton_text, vocab
from cahp_deploy.handoff.verify import HANDOFF_FILE, SCHEMA
from cahp_deploy.hashing import sha256_file
from cahp_deploy.serving_length import of_manifest
from cahp_deploy.shipped import with_choice

log = logging.getLogger(__name__)

CARD_FILE = "MODEL_CARD.md"
TARGETS = ("triton", "triton-text", "ort-mobile", "dir")
#: fallback order when the manifest recommends nothing usable
PREFERENCE = ("optimized", "fp32")
#: covered rows must give the untrimmed logits (the same ids, the same embedding rows)
TRIM_ATOL = 1e-5
#: rows of the held-out split used for the ORT-format parity on real text (on top of random tokens)
ORT_PARITY_ROWS = 256
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                    "merges.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model")


def choose_variant(manifest: dict, variant: str | None = None) -> tuple[str, str]:
    """(variant, why): ``variant`` if given, else the recommendation (``manifest`` as
    :func:`cahp_deploy.shipped.with_choice` returns it), else :data:`PREFERENCE`."""
    have = manifest["variants"]
    if variant is not None:
        if variant not in have:
            raise CahpError(f"--variant {variant!r} is not in this artifact; it has {', '.join(have)}")
        return variant, "chosen with --variant"
    rec = manifest.get("recommended")
    if rec in have:
        return rec, "recommended by " + (manifest.get("recommended_source") or "the artifact's manifest")
    for v in PREFERENCE:
        if v in have:
            return v, f"no recommendation in the manifest; first of {'/'.join(PREFERENCE)} present"
    raise CahpError(f"the artifact has none of {', '.join(PREFERENCE)} (it has {', '.join(have)}); pass --variant")


def _logits_per_row(model_path: Path, tokenizer, data, input_names, max_length: int) -> np.ndarray:
    """Logits row by row (batch 1, no padding: a covered row then gets exactly the same computation)."""
    sess = onnx_runtime.session(model_path, threads=1)
    feeds = []
    for i, text in enumerate(data.texts):
        pair = None if data.pairs is None else data.pairs[i]
        enc = tokenizer(text, pair, truncation=True, max_length=max_length, return_tensors="np")
        feeds.append({k: np.asarray(v, np.int64) for k, v in enc.items() if k in input_names})
    return onnx_runtime.logits(sess, feeds)


def _trim(artifact: Path, src: Path, staged: Path, tokdir: Path, config: dict, manifest: dict, data: str,
          split: str, heldout_split: str, columns: dict, max_examples: int | None) -> dict:
    from cahp_deploy.data import check_labels, load_labelled
    from cahp_deploy.paired import correct, paired_drop

    tok_json = json.loads((artifact / "tokenizer.json").read_text()) if (artifact / "tokenizer.json").is_file() else None
    if tok_json is None:
        raise CahpError(f"{artifact}: no tokenizer.json; --trim-vocab needs the fast tokenizer file")
    vocab.check_wordpiece(tok_json, str(artifact / "tokenizer.json"))
    keep_from = load_labelled(data, split, **columns)
    held = load_labelled(data, heldout_split, **columns).head(max_examples)
    if keep_from.file_hashes and keep_from.file_hashes == held.file_hashes:
        raise CahpError(f"--trim-split {split} and --heldout-split {heldout_split} are the same file; the [UNK] rate "
                        "must be measured on texts the vocabulary was not taken from")
    check_labels(held, int(manifest["num_labels"]))
    orig = vocab.load_fast_tokenizer(artifact)
    keep = vocab.kept_ids(orig, keep_from.texts, keep_from.pairs)
    vocab.trim_tokenizer_dir(artifact, tokdir, keep)
    new_config = vocab.trim_model_config(config, keep)
    (tokdir / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
    emb = vocab.trim_onnx(src, staged, int(config["vocab_size"]), keep)
    new = vocab.load_fast_tokenizer(tokdir)

    before = vocab.unk_stats(orig, held.texts, held.pairs)
    after = vocab.unk_stats(new, held.texts, held.pairs)
    covered, dropped = vocab.coverage(orig, keep, held.texts, held.pairs)
    max_length = of_manifest(manifest, config)
    names = manifest["input_names"]
    ref = _logits_per_row(src, orig, held, names, max_length)
    got = _logits_per_row(staged, new, held, names, max_length)
    diff = float(np.abs(ref[covered] - got[covered]).max()) if covered.any() else 0.0
    if diff > TRIM_ATOL:
        raise CahpError(f"vocabulary trimming changed the logits of fully covered rows by {diff:.2e} (limit {TRIM_ATOL:g}); "
                        "nothing was written")
    drop = paired_drop(correct(ref, held.labels), correct(got, held.labels))
    return {
        "data": str(data), "split": keep_from.split, "rows": len(keep_from), "data_hashes": keep_from.file_hashes,
        "vocab_before": int(config["vocab_size"]), "vocab_after": int(len(keep)), "embedding": emb,
        "bytes_before": src.stat().st_size, "bytes_after": staged.stat().st_size,
        "heldout": {"split": held.split, "rows": len(held), "data_hashes": held.file_hashes,
                    "dropped_token_rate": dropped["dropped_rate"], "dropped_tokens": dropped["dropped_tokens"],
                    "unk_rate_before": before["unk_rate"], "unk_rate_after": after["unk_rate"],
                    "unk_tokens_after": after["unk_tokens"], "tokens": after["tokens"],
                    "rows_with_unk_after": after["rows_with_unk"], "rows_covered": int(covered.sum())},
        "covered_parity": {"rows": int(covered.sum()), "max_abs_diff": diff, "atol": TRIM_ATOL, "passed": True},
        "accuracy": {**drop.to_dict(), "describe": drop.describe(), "on": f"{held.source} [{held.split}]"},
        "_held": held,
    }


def _smoke(model_path: Path, input_names, config: dict) -> dict:
    feeds = parity.random_feeds(input_names, SimpleNamespace(**config), seed=7, shapes=((2, 16),))
    return {"inputs": [{k: v.tolist() for k, v in f.items()} for f in feeds],
            "logits": onnx_runtime.logits(onnx_runtime.session(model_path), feeds).tolist(), "file": model_path.name}


def _reproduce(manifest: dict, artifact: Path) -> list[str]:
    """The prune and export commands, reconstructed from the manifest (the exact options are in its variants)."""
    out = []
    pruning = manifest.get("pruning") or {}
    if pruning.get("source_model"):
        out.append(f"cahp-deploy prune {pruning['source_model']} --selection SELECTION.json --out {manifest.get('source_model')}"
                   f"   # SELECTION.json: sha256 {manifest.get('selection_sha256')}")
    pdata = manifest.get("parity_data") or {}
    export_cmd = f"cahp-deploy export {manifest.get('source_model')} --out {artifact}"
    if pdata.get("data"):
        export_cmd += f" --data {pdata['data']} --split {pdata['split']}"
    return out + [f"{export_cmd}   # reconstructed from manifest.json; its variants record the other options"]


def _copy_tokenizer(artifact: Path, tokdir: Path) -> None:
    for name in _TOKENIZER_FILES + ("config.json",):
        if (artifact / name).is_file():
            shutil.copyfile(artifact / name, tokdir / name)


def _check_serving_options(target: str, name: str, device: str, max_batch_size: int, instances: int,
                           dynamic_batching: bool, max_queue_delay_us: int, max_text_chars: int) -> None:
    """Fail on bad serving options before any work."""
    if target == "triton":
        triton.make_config(name, {"inputs": [], "outputs": []}, max_batch_size, device, instances)
    if target == "triton-text":
        if device != "cpu":
            raise CahpError("--target triton-text runs ONNX Runtime on CPU inside Triton's Python backend; "
                            "drop --device gpu (or use --target triton on a server with the ORT backend)")
        triton_text.make_config(name, 2, max_batch_size, instances, dynamic_batching=dynamic_batching,
                                max_queue_delay_us=max_queue_delay_us)
        if max_text_chars < 1:
            raise CahpError(f"--max-text-chars {max_text_chars} must be >= 1")


def _write_triton(tmp: Path, staged: Path, name: str, manifest: dict, config: dict, device: str, max_batch_size: int,
                  instances: int, trimmed: bool) -> dict:
    """The model repository (config.pbtxt checked against the graph, labels.txt) and client.py; handoff.json's
    ``triton``."""
    model_dir = tmp / "model_repository" / name
    (model_dir / "1").mkdir(parents=True)
    final = model_dir / "1" / "model.onnx"
    os.replace(staged, final)
    io = triton.graph_io(final)
    text = triton.make_config(name, io, max_batch_size, device, instances)
    (model_dir / "config.pbtxt").write_text(text)
    triton.check_config(text, final)
    labels = manifest.get("id2label") or {}
    (model_dir / "labels.txt").write_text(
        "".join(f"{labels.get(str(i), i)}\n" for i in range(int(manifest["num_labels"]))))
    max_length = of_manifest(manifest, config)
    (tmp / "client.py").write_text(triton.client_script(name, io, labels, max_length, trimmed))
    return {"config": f"model_repository/{name}/config.pbtxt", "model": f"model_repository/{name}/1/model.onnx",
            "device": device, "max_batch_size": max_batch_size, "instances": instances, "io": io}


def _write_ort_mobile(tmp: Path, staged: Path, tokdir: Path, names, config: dict, held) -> dict:
    """model.ort (+ its operator config), checked against the .onnx on random tokens and, after trimming,
    on held-out rows; handoff.json's ``ort_parity``."""
    ort_mobile.convert(staged, tmp)
    feeds = parity.random_feeds(names, SimpleNamespace(**config))
    what = "random tokens"
    if held is not None:
        tok = vocab.load_fast_tokenizer(tokdir)
        feeds += parity.data_feeds(tok, held, names, SimpleNamespace(**config), limit=ORT_PARITY_ROWS)[0]
        what = f"random tokens + first {min(ORT_PARITY_ROWS, len(held))} rows of {held.source} [{held.split}]"
    return {**ort_mobile.check_parity(staged, tmp / ort_mobile.ORT_FILE, feeds), "inputs": what}


def handoff(artifact_dir: str | os.PathLike, out: str | os.PathLike, target: str = "dir", *,
            variant: str | None = None, name: str | None = None, trim_vocab: str | None = None,
            trim_split: str = "train", heldout_split: str = "validation", text_column: str | None = None,
            text_pair_column: str | None = None, label_column: str = "label", max_examples: int | None = None,
            device: str = "cpu", max_batch_size: int = 32, instances: int = 1, force: bool = False,
            bench_report: str | os.PathLike | None = None, command: list[str] | None = None,
            max_text_chars: int = triton_text.DEFAULT_MAX_TEXT_CHARS, dynamic_batching: bool = True,
            max_queue_delay_us: int = triton_text.DEFAULT_QUEUE_DELAY_US, merge_requests: bool | None = None,
            ort_threads: int = 0) -> Path:
    """Write the handoff dir for ``target``; return its path. See the module docstring."""
    if target not in TARGETS:
        raise CahpError(f"--target {target!r} is not supported; choose from {', '.join(TARGETS)}")
    if max_examples is not None and max_examples < 1:
        raise CahpError(f"--max-examples {max_examples} must be >= 1")
    artifact = Path(artifact_dir)
    out = check_output_path(out, force)
    if out.resolve() == artifact.resolve():
        raise CahpError("--out must differ from ARTIFACT_DIR")
    manifest = with_choice(artifact, load_manifest(artifact))  # the shipped choice, from the run's confirm.json
    verify_artifact(artifact, smoke=False)  # a tampered artifact is never handed off
    variant, why = choose_variant(manifest, variant)
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "_", artifact.resolve().name)
    _check_serving_options(target, name, device, max_batch_size, instances, dynamic_batching, max_queue_delay_us,
                           max_text_chars)
    bench = None
    if bench_report is not None:
        from cahp_deploy.handoff.bench_report import latency

        bench = latency(bench_report, manifest, variant)
    config = json.loads((artifact / "config.json").read_text())
    src = artifact / VARIANT_FILES[variant]
    columns = dict(text_column=text_column, text_pair_column=text_pair_column, label_column=label_column)

    with atomic_dir(out, force=True) as tmp:
        tokdir = tmp / "tokenizer"
        tokdir.mkdir()
        stage = tmp / ".stage"
        stage.mkdir()
        staged = stage / "model.onnx"
        trim = None
        if trim_vocab is not None:
            trim = _trim(artifact, src, staged, tokdir, config, manifest, trim_vocab, trim_split, heldout_split,
                         columns, max_examples)
            config = json.loads((tokdir / "config.json").read_text())
        else:
            _copy_tokenizer(artifact, tokdir)
            shutil.copyfile(src, staged)
        held = trim.pop("_held") if trim else None
        record: dict = {"schema": SCHEMA, "target": target, "name": name, "variant": variant, "variant_reason": why,
                        "artifact": str(artifact), "artifact_manifest_sha256": sha256_file(artifact / "manifest.json"),
                        "trim_vocab": trim,
                        "ort_parity": None, "triton": None, "triton_text": None, "bench": bench, "versions": versions(),
                        "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        names = manifest["input_names"]
        if target == "triton":
            record["triton"] = _write_triton(tmp, staged, name, manifest, config, device, max_batch_size, instances,
                                             trimmed=trim is not None)
            record["smoke"] = {**_smoke(tmp / record["triton"]["model"], names, config), "file": record["triton"]["model"]}
        elif target == "triton-text":
            record["triton_text"] = triton_text.write_repository(
                artifact, tmp, tokdir, staged, name, manifest, variant, max_batch_size=max_batch_size,
                instances=instances, max_text_chars=max_text_chars, dynamic_batching=dynamic_batching,
                max_queue_delay_us=max_queue_delay_us, merge_requests=merge_requests, ort_threads=ort_threads)
            record["smoke"] = {**_smoke(tmp / record["triton_text"]["model"], names, config),
                               "file": record["triton_text"]["model"]}
        elif target == "ort-mobile":
            record["ort_parity"] = _write_ort_mobile(tmp, staged, tokdir, names, config, held)
            record["smoke"] = _smoke(tmp / ort_mobile.ORT_FILE, names, config)
        else:
            os.replace(staged, tmp / "model.onnx")
            record["smoke"] = _smoke(tmp / "model.onnx", names, config)
        shutil.rmtree(stage)
        cmd = command or ["cahp-deploy", "handoff", str(artifact), "--out", str(out), "--target", target]
        record["commands"] = _reproduce(manifest, artifact) + [" ".join(cmd)]
        record["out_name"] = str(out)
        record["files"] = file_records(tmp)
        (tmp / CARD_FILE).write_text(model_card.render(manifest, record))
        record["files"] = {k: v for k, v in file_records(tmp).items() if k != HANDOFF_FILE}
        (tmp / HANDOFF_FILE).write_text(json.dumps(record, indent=2) + "\n")
    log.info("handoff %s -> %s (%s, %s)", artifact, out, target, variant)
    return out

