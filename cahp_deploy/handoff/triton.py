"""Triton Inference Server model repository for the ``onnxruntime`` backend.

::

    OUT/model_repository/<name>/config.pbtxt     platform onnxruntime_onnx, inputs/outputs from the graph
    OUT/model_repository/<name>/1/model.onnx     the handed-off variant
    OUT/model_repository/<name>/labels.txt       id -> label, one a line (Triton's classification extension)
    OUT/client.py                                tokenizer-side example client (tritonclient.http)

The config is generated from the ONNX graph, never typed by hand: with ``max_batch_size > 0``
Triton wants dims *without* the batch dim, so the graph's first dim must be dynamic and is dropped;
other symbolic dims become -1. :func:`check_config` parses the written text back (:func:`parse_pbtxt`,
a reader for the subset of protobuf text format Triton configs use) and compares names, dtypes and
ranks with the graph; ``verify`` runs it on a handoff dir, so no server is needed to catch a drift.
"""

from __future__ import annotations

import re
from pathlib import Path

from cahp_deploy.errors import CahpError

PLATFORM = "onnxruntime_onnx"
DEVICES = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
#: ONNX TensorProto element type -> Triton data type
ONNX_TO_TRITON = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 5: "TYPE_INT16", 6: "TYPE_INT32",
                  7: "TYPE_INT64", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 16: "TYPE_BF16"}


def graph_io(model_path: Path) -> dict[str, list[dict]]:
    """{"inputs"|"outputs": [{name, dtype (Triton), dims (-1 for symbolic)}]} of an ONNX file, batch dim included."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    init = {t.name for t in model.graph.initializer}

    def describe(values) -> list[dict]:
        out = []
        for v in values:
            if v.name in init:
                continue
            t = v.type.tensor_type
            if t.elem_type not in ONNX_TO_TRITON:
                raise CahpError(f"{model_path}: tensor {v.name} has ONNX type {t.elem_type}, which Triton has no type for")
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            out.append({"name": v.name, "dtype": ONNX_TO_TRITON[t.elem_type], "dims": dims})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def _tensor_block(kind: str, t: dict, batched: bool, label_file: str | None = None) -> str:
    dims = t["dims"][1:] if batched else t["dims"]
    extra = f'\n    label_filename: "{label_file}"' if label_file else ""
    return (f"  {{\n    name: \"{t['name']}\"\n    data_type: {t['dtype']}\n    dims: [ {', '.join(str(d) for d in dims)} ]"
            f"{extra}\n  }}")


def make_config(name: str, io: dict, max_batch_size: int, device: str, instance_count: int,
                max_queue_delay_us: int = 100, label_file: str | None = "labels.txt") -> str:
    """config.pbtxt text for the ``onnxruntime`` backend."""
    if device not in DEVICES:
        raise CahpError(f"--device {device!r} is not supported; choose from {', '.join(DEVICES)}")
    if not isinstance(max_batch_size, int) or max_batch_size < 0:
        raise CahpError(f"--max-batch-size {max_batch_size} must be an integer >= 0 (0 turns off Triton's batching)")
    if instance_count < 1:
        raise CahpError(f"--instances {instance_count} must be >= 1")
    batched = max_batch_size > 0
    if batched:
        for t in io["inputs"] + io["outputs"]:
            if not t["dims"] or t["dims"][0] != -1:
                raise CahpError(f"tensor {t['name']} has no dynamic batch dim ({t['dims']}); use --max-batch-size 0")
    inputs = ",\n".join(_tensor_block("input", t, batched) for t in io["inputs"])
    outputs = ",\n".join(_tensor_block("output", t, batched, label_file if i == 0 else None)
                         for i, t in enumerate(io["outputs"]))
    lines = [
        f'name: "{name}"',
        f'platform: "{PLATFORM}"',
        f"max_batch_size: {max_batch_size}",
        f"input [\n{inputs}\n]",
        f"output [\n{outputs}\n]",
        f"instance_group [\n  {{\n    count: {instance_count}\n    kind: {DEVICES[device]}\n  }}\n]",
    ]
    if batched:
        preferred = sorted({b for b in (max_batch_size // 4, max_batch_size // 2, max_batch_size) if b >= 1})
        lines.append(f"dynamic_batching {{\n  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
                     f"  max_queue_delay_microseconds: {max_queue_delay_us}\n}}")
    return "\n".join(lines) + "\n"


_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([{}\[\]:,])|([^\s{}\[\]:,"#]+))')


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise CahpError(f"config.pbtxt: cannot parse near {text[pos:pos + 30]!r}")
        pos = m.end()
        if m.group(1) is None:
            out.append(next(g for g in m.groups()[1:] if g is not None))
    return out


def parse_pbtxt(text: str) -> dict:
    """Protobuf text format -> {field: [values]} (every field a list; messages are dicts, strings unquoted)."""
    toks = _tokens(text)
    pos = 0

    def scalar(tok: str):
        if tok.startswith('"'):
            return tok[1:-1]
        try:
            return int(tok)
        except ValueError:
            try:
                return float(tok)
            except ValueError:
                return tok

    def value():
        nonlocal pos
        tok = toks[pos]
        if tok == "{":
            pos += 1
            msg = message("}")
            pos += 1
            return msg
        pos += 1
        return scalar(tok)

    def message(end: str | None) -> dict:
        nonlocal pos
        out: dict = {}
        while pos < len(toks) and toks[pos] != end:
            name = toks[pos]
            pos += 1
            if pos < len(toks) and toks[pos] == ":":
                pos += 1
            if pos >= len(toks):
                raise CahpError(f"config.pbtxt: field {name} has no value")
            if toks[pos] == "[":
                pos += 1
                while toks[pos] != "]":
                    out.setdefault(name, []).append(value())
                    if toks[pos] == ",":
                        pos += 1
                pos += 1
                out.setdefault(name, [])
            else:
                out.setdefault(name, []).append(value())
        return out

    try:
        return message(None)
    except IndexError as e:
        raise CahpError("config.pbtxt ends in the middle of a field") from e


def check_config(config_text: str, model_path: Path) -> dict:
    """Parse a config.pbtxt and check it against the ONNX graph; return the parsed config.

    Checks: platform, every graph input/output present with the same dtype and rank (batch dim
    dropped when ``max_batch_size > 0``), fixed dims equal, and no tensor the graph lacks.
    """
    cfg = parse_pbtxt(config_text)
    io = graph_io(model_path)
    if cfg.get("platform") != [PLATFORM]:
        raise CahpError(f"config.pbtxt: platform {cfg.get('platform')} is not [{PLATFORM!r}]")
    batched = cfg.get("max_batch_size", [0])[0] > 0
    for section, key in (("input", "inputs"), ("output", "outputs")):
        declared = {t["name"][0]: t for t in cfg.get(section, [])}
        graph = {t["name"]: t for t in io[key]}
        if set(declared) != set(graph):
            raise CahpError(f"config.pbtxt {section}s {sorted(declared)} differ from the graph's {sorted(graph)}")
        for name, g in graph.items():
            d = declared[name]
            gdims = g["dims"][1:] if batched else g["dims"]
            if d["data_type"][0] != g["dtype"]:
                raise CahpError(f"config.pbtxt {section} {name}: data_type {d['data_type'][0]} but the graph has {g['dtype']}")
            dims = d.get("dims", [])
            if len(dims) != len(gdims):
                raise CahpError(f"config.pbtxt {section} {name}: rank {len(dims)} but the graph has {len(gdims)} ({gdims})")
            for a, b in zip(dims, gdims):
                if b != -1 and a != b:
                    raise CahpError(f"config.pbtxt {section} {name}: dims {dims} do not match the graph's {gdims}")
    return cfg


CLIENT = '''"""Example Triton client for {name}: tokenize here, send ids, read logits.

    pip install tritonclient[http] transformers numpy
    tritonserver --model-repository model_repository     # in the Triton container
    python client.py "a gripping, beautifully acted film"

Tokenizer: ./tokenizer (the exact one the model was exported{trimmed} with); max length {max_length}.
"""

import sys
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient
from transformers import AutoTokenizer

MODEL = "{name}"
INPUTS = {inputs!r}
LABELS = {labels!r}


def main(texts, url="localhost:8000"):
    tok = AutoTokenizer.from_pretrained(Path(__file__).parent / "tokenizer")
    enc = tok(texts, padding=True, truncation=True, max_length={max_length}, return_tensors="np")
    client = httpclient.InferenceServerClient(url)
    feeds = []
    for name in INPUTS:
        arr = np.asarray(enc[name], dtype=np.int64)
        t = httpclient.InferInput(name, list(arr.shape), "INT64")
        t.set_data_from_numpy(arr)
        feeds.append(t)
    out = client.infer(MODEL, feeds, outputs=[httpclient.InferRequestedOutput("{output}")])
    logits = out.as_numpy("{output}")
    for text, row in zip(texts, logits):
        print(f"{{LABELS.get(str(int(row.argmax())), int(row.argmax()))}}\\t{{text}}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["a gripping, beautifully acted film"])
'''


def client_script(name: str, io: dict, id2label: dict, max_length: int, trimmed: bool) -> str:
    return CLIENT.format(name=name, inputs=[t["name"] for t in io["inputs"]], labels=dict(id2label),
                         output=io["outputs"][0]["name"], max_length=max_length,
                         trimmed=" and vocabulary-trimmed" if trimmed else "")
