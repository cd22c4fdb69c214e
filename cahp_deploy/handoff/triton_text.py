"""Triton model repository that serves from raw text: the ``triton-text`` handoff target.

::

    OUT/model_repository/<name>/config.pbtxt        backend "python"; TEXT (TYPE_STRING [1]) in,
                                                    LABEL (TYPE_STRING [1]) + PROBS (TYPE_FP32 [labels]) out
    OUT/model_repository/<name>/labels.txt          id -> label, one a line
    OUT/model_repository/<name>/1/model.py          triton_text_model.py: tokenizer + ONNX Runtime
    OUT/model_repository/<name>/1/model.onnx        the handed-off variant
    OUT/model_repository/<name>/1/tokenizer.json    the artifact's fast tokenizer
    OUT/model_repository/<name>/1/serving.json      what model.py reads (:func:`settings`)
    OUT/client.py                                   example client: text in, labels out (standard library only)

Why one Python-backend model rather than an ensemble (a Python tokenizer feeding the ``onnxruntime``
backend): the Triton that runs here (``nvidia-pytriton``'s) has no ONNX Runtime backend, so an
ensemble could not be served or tested here; one model also has one place that pads and truncates.
The ids-in repository stays the ``triton`` target, for servers with the ORT backend.

The tokenizer settings are resolved here, once, with ``cahp_deploy.predict.load_tokenizer`` (the
manifest's ``max_length`` capped at the model's positions, the pad token), and written down, so the
server tokenizes exactly as ``cahp-deploy predict`` does without importing cahp-deploy.
:func:`check_config` parses config.pbtxt back and checks it against serving.json and the graph.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from cahp_deploy.errors import CahpError
from cahp_deploy.handoff.triton import graph_io, parse_pbtxt
from cahp_deploy.handoff.triton_text_model import LABEL_OUTPUT, PROBS_OUTPUT, SETTINGS_FILE, TEXT_INPUT

BACKEND = "python"
MODEL_FILE = Path(__file__).with_name("triton_text_model.py")
#: longest text (characters) a request may carry; longer ones get an error response. SST-5's longest
#: test row is ~270 characters, and a 512-token model reads ~2-3k characters of English at most.
DEFAULT_MAX_TEXT_CHARS = 10_000
#: how long Triton's dynamic batcher holds a request waiting for others (microseconds)
DEFAULT_QUEUE_DELAY_US = 2_000
#: the text model's probabilities vs ``cahp-deploy predict``'s on the same texts
PARITY_ATOL = 1e-5


def settings(artifact: Path, tokdir: Path, manifest: dict, variant: str, model_path: Path, *, max_batch_size: int,
             max_text_chars: int, merge_requests: bool | None = None, ort_threads: int = 0) -> dict:
    """serving.json: the tokenizer exactly as ``predict`` sets it up, the graph's inputs, labels, limits."""
    from cahp_deploy.predict import load_tokenizer

    if max_text_chars < 1:
        raise CahpError(f"--max-text-chars {max_text_chars} must be >= 1")
    # load_tokenizer reads the manifest's max_length from its dir: hand it the artifact's, on the
    # (maybe trimmed) tokenizer files in tokdir
    max_length = manifest.get("max_length")
    tok = load_tokenizer(tokdir, max_length)
    trunc, pad = tok.truncation, tok.padding
    io = graph_io(model_path)
    num_labels = int(manifest["num_labels"])
    out_dims = io["outputs"][0]["dims"]
    if len(out_dims) != 2 or out_dims[-1] not in (-1, num_labels):
        raise CahpError(f"{model_path}: the first output has dims {out_dims}, not [batch, {num_labels} labels]")
    known = {"input_ids", "attention_mask", "token_type_ids"}
    unknown = [t["name"] for t in io["inputs"] if t["name"] not in known]
    if unknown:
        raise CahpError(f"{model_path} declares inputs the text model cannot fill: {', '.join(unknown)}")
    # predict's label names: the manifest's, else config.json's, else LABEL_i
    config = json.loads((tokdir / "config.json").read_text()) if (tokdir / "config.json").is_file() else {}
    labels = manifest.get("id2label") or config.get("id2label") or {}
    is_int8 = variant == "int8"
    merge = (not is_int8) if merge_requests is None else bool(merge_requests)
    if merge:
        why = "the texts of one dynamic batch run as one ONNX batch" + (
            " (--merge-requests: an INT8 row's answer then depends on the requests batched with it)" if is_int8 else "")
    elif merge_requests is None:
        why = ("INT8 activations are quantized per tensor over the whole batch: each request runs alone so its "
               "answer does not depend on its batch neighbours")
    else:
        why = "each request runs as its own ONNX batch (--no-merge-requests)"
    return {
        "model": "model.onnx", "tokenizer": "tokenizer.json", "variant": variant,
        "max_length": int(trunc["max_length"]), "manifest_max_length": max_length,
        "pad_id": int(pad["pad_id"]), "pad_token": pad["pad_token"],
        "inputs": [t["name"] for t in io["inputs"]],
        "labels": [str(labels.get(str(i), f"LABEL_{i}")) for i in range(num_labels)],
        "max_text_chars": int(max_text_chars), "max_batch_size": int(max_batch_size),
        "merge_requests": merge, "merge_requests_why": why,
        "ort_threads": int(ort_threads),
        "artifact": str(artifact),
    }


def make_config(name: str, num_labels: int, max_batch_size: int, instance_count: int, *,
                dynamic_batching: bool = True, max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US) -> str:
    """config.pbtxt text for the Python backend (CPU instances; the model runs ONNX Runtime on CPU)."""
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise CahpError(f"--max-batch-size {max_batch_size} must be >= 1 for --target triton-text "
                        "(a request carries its texts as a batch)")
    if instance_count < 1:
        raise CahpError(f"--instances {instance_count} must be >= 1")
    if max_queue_delay_us < 0:
        raise CahpError(f"--max-queue-delay-us {max_queue_delay_us} must be >= 0")
    lines = [
        f'name: "{name}"',
        f'backend: "{BACKEND}"',
        f"max_batch_size: {max_batch_size}",
        f'input [\n  {{\n    name: "{TEXT_INPUT}"\n    data_type: TYPE_STRING\n    dims: [ 1 ]\n  }}\n]',
        f'output [\n  {{\n    name: "{LABEL_OUTPUT}"\n    data_type: TYPE_STRING\n    dims: [ 1 ]\n  }},\n'
        f'  {{\n    name: "{PROBS_OUTPUT}"\n    data_type: TYPE_FP32\n    dims: [ {num_labels} ]\n'
        f'    label_filename: "labels.txt"\n  }}\n]',
        f"instance_group [\n  {{\n    count: {instance_count}\n    kind: KIND_CPU\n  }}\n]",
    ]
    if dynamic_batching:
        lines.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}")
    return "\n".join(lines) + "\n"


def check_config(config_text: str, version_dir: Path) -> dict:
    """Parse config.pbtxt back; check it against serving.json and the graph; return the parsed config."""
    cfg = parse_pbtxt(config_text)
    s = json.loads((version_dir / SETTINGS_FILE).read_text())
    if cfg.get("backend") != [BACKEND]:
        raise CahpError(f"config.pbtxt: backend {cfg.get('backend')} is not [{BACKEND!r}]")
    mbs = cfg.get("max_batch_size", [0])[0]
    if mbs != s["max_batch_size"] or mbs < 1:
        raise CahpError(f"config.pbtxt: max_batch_size {mbs} differs from {SETTINGS_FILE}'s {s['max_batch_size']}")
    inputs = {t["name"][0]: t for t in cfg.get("input", [])}
    if set(inputs) != {TEXT_INPUT} or inputs[TEXT_INPUT]["data_type"] != ["TYPE_STRING"] or inputs[TEXT_INPUT].get("dims") != [1]:
        raise CahpError(f"config.pbtxt: inputs must be exactly {TEXT_INPUT} (TYPE_STRING, dims [1]); got {sorted(inputs)}")
    outputs = {t["name"][0]: t for t in cfg.get("output", [])}
    want = {LABEL_OUTPUT: ("TYPE_STRING", [1]), PROBS_OUTPUT: ("TYPE_FP32", [len(s["labels"])])}
    for name, (dtype, dims) in want.items():
        t = outputs.get(name)
        if t is None or t["data_type"] != [dtype] or t.get("dims") != dims:
            raise CahpError(f"config.pbtxt: output {name} must be {dtype} with dims {dims}")
    if set(outputs) != set(want):
        raise CahpError(f"config.pbtxt outputs {sorted(outputs)} are not {sorted(want)}")
    io = graph_io(version_dir / s["model"])
    if [t["name"] for t in io["inputs"]] != s["inputs"]:
        raise CahpError(f"{SETTINGS_FILE} inputs {s['inputs']} differ from the graph's {[t['name'] for t in io['inputs']]}")
    if io["outputs"][0]["dims"][-1] not in (-1, len(s["labels"])):
        raise CahpError(f"{SETTINGS_FILE} has {len(s['labels'])} labels but the graph gives {io['outputs'][0]['dims']}")
    return cfg


def smoke(version_dir: Path, texts: list[str]) -> dict:
    """model.py's own classifier (no server) on ``texts``: what ``verify`` re-runs."""
    from cahp_deploy.handoff.triton_text_model import TextClassifier

    clf = TextClassifier(version_dir, threads=1)
    probs = clf.probabilities(texts)
    return {"texts": texts, "labels": [clf.labels[k] for k in probs.argmax(-1)], "probs": probs.tolist()}


#: texts the smoke run classifies: short, long, punctuation, non-ASCII
SMOKE_TEXTS = ["a gripping, beautifully acted film", "dull.", "Ni l'un ni l'autre : c'était — hélas — "
               "interminable, et pourtant ... " * 3, "ok"]


CLIENT = '''"""Example client for the Triton text model {name}: send text, get labels and probabilities.

    cahp-deploy serve .                      # or any Triton with the Python backend (docs/serving.md)
    python client.py "a gripping, beautifully acted film" "dull."

Standard library only (KServe v2 JSON over HTTP). At most {max_batch_size} texts a request and
{max_text_chars} characters a text; the server truncates at {max_length} tokens.
"""

import json
import sys
import urllib.error
import urllib.request

MODEL = "{name}"


def classify(texts, url="http://localhost:8000"):
    body = {{"inputs": [{{"name": "TEXT", "shape": [len(texts), 1], "datatype": "BYTES", "data": texts}}]}}
    req = urllib.request.Request(f"{{url}}/v2/models/{{MODEL}}/infer", data=json.dumps(body).encode(),
                                 headers={{"Content-Type": "application/json"}})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            out = {{o["name"]: o for o in json.load(r)["outputs"]}}
    except urllib.error.HTTPError as e:  # a bad request: the server says why
        raise SystemExit(f"HTTP {{e.code}}: {{json.load(e).get('error')}}")
    n = out["PROBS"]["shape"][1]
    probs = [out["PROBS"]["data"][i * n:(i + 1) * n] for i in range(len(texts))]
    return list(zip(out["LABEL"]["data"], probs))


if __name__ == "__main__":
    texts = sys.argv[1:] or ["a gripping, beautifully acted film"]
    for text, (label, probs) in zip(texts, classify(texts)):
        print(f"{{label}}\t{{max(probs):.3f}}\t{{text}}")
'''


def write_repository(artifact: Path, tmp: Path, tokdir: Path, staged: Path, name: str, manifest: dict, variant: str, *,
                     max_batch_size: int, instances: int, max_text_chars: int, dynamic_batching: bool,
                     max_queue_delay_us: int, merge_requests: bool | None, ort_threads: int) -> dict:
    """Write ``tmp/model_repository/<name>`` (``staged`` is moved in); return handoff.json's ``triton_text``.

    Checks before returning: config.pbtxt parsed back against serving.json and the graph, and model.py's
    classifier (run here, no server) against ``cahp-deploy predict`` on :data:`SMOKE_TEXTS`: the same
    labels, probabilities within :data:`PARITY_ATOL`.
    """
    from cahp_deploy.predict import predict

    model_dir = tmp / "model_repository" / name
    version = model_dir / "1"
    version.mkdir(parents=True)
    if not (tokdir / "tokenizer.json").is_file():
        raise CahpError(f"{artifact}: no tokenizer.json; --target triton-text needs the fast tokenizer file")
    os.replace(staged, version / "model.onnx")
    shutil.copyfile(tokdir / "tokenizer.json", version / "tokenizer.json")
    shutil.copyfile(MODEL_FILE, version / "model.py")
    s = settings(artifact, tokdir, manifest, variant, version / "model.onnx", max_batch_size=max_batch_size,
                 max_text_chars=max_text_chars, merge_requests=merge_requests, ort_threads=ort_threads)
    (version / SETTINGS_FILE).write_text(json.dumps(s, indent=2) + "\n")
    text = make_config(name, len(s["labels"]), max_batch_size, instances, dynamic_batching=dynamic_batching,
                       max_queue_delay_us=max_queue_delay_us)
    (model_dir / "config.pbtxt").write_text(text)
    (model_dir / "labels.txt").write_text("".join(f"{label}\n" for label in s["labels"]))
    check_config(text, version)
    (tmp / "client.py").write_text(CLIENT.format(name=name, max_batch_size=max_batch_size, max_text_chars=max_text_chars,
                                                 max_length=s["max_length"]))
    got = smoke(version, SMOKE_TEXTS)
    # predict on the very files served: the graph, the (maybe trimmed) tokenizer dir, the manifest's length
    ref_dir = tmp / ".stage-predict"
    ref_dir.mkdir()
    for f in tokdir.iterdir():
        shutil.copyfile(f, ref_dir / f.name)
    shutil.copyfile(version / "model.onnx", ref_dir / "model.onnx")
    (ref_dir / "manifest.json").write_text(json.dumps({"variants": {variant: {"file": "model.onnx"}},
                                                       "id2label": manifest.get("id2label"),
                                                       "max_length": manifest.get("max_length")}))
    ref = predict(ref_dir, SMOKE_TEXTS, variant=variant, batch_size=len(SMOKE_TEXTS), threads=1)
    shutil.rmtree(ref_dir)
    diff = max(abs(p.scores[label] - q) for p, row in zip(ref, got["probs"]) for label, q in zip(s["labels"], row))
    if [p.label for p in ref] != got["labels"] or diff > PARITY_ATOL:
        raise CahpError(f"the text model disagrees with `cahp-deploy predict` on the smoke texts (labels {got['labels']} "
                        f"vs {[p.label for p in ref]}, max |prob diff| {diff:.1e}); nothing was written")
    rel = f"model_repository/{name}"
    return {"config": f"{rel}/config.pbtxt", "model": f"{rel}/1/model.onnx", "version_dir": f"{rel}/1",
            "max_batch_size": max_batch_size, "instances": instances, "dynamic_batching": dynamic_batching,
            "max_queue_delay_us": max_queue_delay_us if dynamic_batching else None,
            "settings": {k: s[k] for k in ("max_length", "pad_id", "pad_token", "inputs", "labels", "max_text_chars",
                                          "merge_requests", "merge_requests_why", "ort_threads")},
            "text_smoke": {**got, "vs_predict_max_abs_diff": diff, "atol": PARITY_ATOL}}


def verify_repository(root: Path, record: dict, run_model: bool) -> dict | None:
    """``verify`` of a triton-text handoff: the config, and (``run_model``) model.py's answers as recorded."""
    t = record["triton_text"]
    check_config((root / t["config"]).read_text(), root / t["version_dir"])
    if not run_model:
        return None
    sm = t["text_smoke"]
    got = smoke(root / t["version_dir"], sm["texts"])
    diff = float(np.abs(np.asarray(got["probs"]) - np.asarray(sm["probs"])).max())
    if got["labels"] != sm["labels"] or diff > sm["atol"]:
        raise CahpError(f"{root}: the text model no longer gives the labels and probabilities recorded at handoff "
                        f"(max |prob diff| {diff:.2e} > {sm['atol']:g}); re-run `cahp-deploy handoff`")
    return {"max_abs_diff": diff, "atol": sm["atol"], "passed": True}
