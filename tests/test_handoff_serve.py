"""handoff --target triton-text and `serve`: a real Triton server on a tiny handoff, talked to over HTTP.

The server tests need the `serve` extra (nvidia-pytriton's tritonserver binary); without it they skip
with the reason. CI lane 1 installs it.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import cli
from cahp_deploy.errors import CahpError
from cahp_deploy.handoff import handoff, verify_handoff
from cahp_deploy.handoff import triton_text
from cahp_deploy.predict import load_tokenizer, predict

HAVE_TRITON = importlib.util.find_spec("pytriton") is not None
needs_server = pytest.mark.skipif(not HAVE_TRITON, reason="the `serve` extra (nvidia-pytriton, the tritonserver binary) "
                                                          "is not installed: pip install 'cahp-deploy[serve]'")
MAX_BATCH = 4
MAX_CHARS = 500
TEXTS = ["a gripping, beautifully acted film", "dull.", "ok", "not bad at all, though far too long",
         "une comédie légère — ni bonne ni mauvaise", "the plot " * 40, "?", "Worst. Movie. Ever!!!"]


@pytest.fixture(scope="module")
def artifact(tiny_models, tmp_path_factory) -> Path:
    from cahp_deploy.export import export

    return export(tiny_models["bert"], tmp_path_factory.mktemp("serve") / "art", measure=False)


@pytest.fixture(scope="module")
def text_handoff(artifact, tmp_path_factory) -> Path:
    return handoff(artifact, tmp_path_factory.mktemp("serve") / "h", "triton-text", name="tiny",
                   max_batch_size=MAX_BATCH, max_text_chars=MAX_CHARS, max_queue_delay_us=5_000)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _version(h: Path) -> Path:
    return h / "model_repository" / "tiny" / "1"


# ---------------------------------------------------------------------------------------- no server needed
def test_text_handoff_writes_a_checked_repository(text_handoff, artifact):
    rec = json.loads((text_handoff / "handoff.json").read_text())
    assert rec["target"] == "triton-text" and rec["triton_text"]["dynamic_batching"] is True
    cfg = triton_text.check_config((text_handoff / rec["triton_text"]["config"]).read_text(), _version(text_handoff))
    assert cfg["backend"] == ["python"] and cfg["max_batch_size"] == [MAX_BATCH]
    assert cfg["dynamic_batching"][0]["max_queue_delay_microseconds"] == [5000]
    s = json.loads((_version(text_handoff) / "serving.json").read_text())
    tok = load_tokenizer(artifact)  # what predict truncates and pads with
    assert s["max_length"] == tok.truncation["max_length"] and s["pad_id"] == tok.padding["pad_id"]
    assert s["merge_requests"] is True and s["labels"] == ["LABEL_0", "LABEL_1", "LABEL_2"]
    assert rec["triton_text"]["text_smoke"]["vs_predict_max_abs_diff"] <= 1e-5
    for f in ("model.py", "model.onnx", "tokenizer.json", "serving.json"):
        assert (_version(text_handoff) / f).is_file()
    compile((_version(text_handoff) / "model.py").read_text(), "model.py", "exec")
    res = verify_handoff(text_handoff)
    assert res["smoke"]["text_model"]["passed"]
    assert "Triton text model" in (text_handoff / "MODEL_CARD.md").read_text()


def test_text_handoff_with_a_trimmed_vocabulary(artifact, tiny_data, tmp_path):
    """--trim-vocab: the served tokenizer is the trimmed one, and the text model still agrees with predict on it."""
    h = handoff(artifact, tmp_path / "h", "triton-text", name="tiny", trim_vocab=str(tiny_data))
    rec = json.loads((h / "handoff.json").read_text())
    served = json.loads((_version(h) / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(served) == rec["trim_vocab"]["vocab_after"] < rec["trim_vocab"]["vocab_before"]
    assert rec["triton_text"]["text_smoke"]["vs_predict_max_abs_diff"] <= 1e-5
    assert verify_handoff(h)["smoke"]["text_model"]["passed"]


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.replace('backend: "python"', 'backend: "onnxruntime"'), "backend"),
    (lambda t: t.replace("TYPE_STRING\n    dims: [ 1 ]\n  }\n]\noutput", "TYPE_INT64\n    dims: [ 1 ]\n  }\n]\noutput"), "inputs must be"),
    (lambda t: t.replace("dims: [ 3 ]", "dims: [ 4 ]"), "PROBS"),
    (lambda t: t.replace(f"max_batch_size: {MAX_BATCH}", "max_batch_size: 64"), "max_batch_size"),
])
def test_check_config_catches_each_drift(text_handoff, edit, match):
    text = (text_handoff / "model_repository" / "tiny" / "config.pbtxt").read_text()
    assert edit(text) != text
    with pytest.raises(CahpError, match=match):
        triton_text.check_config(edit(text), _version(text_handoff))


def test_text_model_equals_predict_in_process(text_handoff, artifact):
    """model.py's classifier (no server), one request per text and all merged, vs predict (batch 32)."""
    from cahp_deploy.handoff.triton_text_model import TextClassifier

    clf = TextClassifier(_version(text_handoff), threads=1)
    ref = predict(artifact, TEXTS, threads=1)
    for probs in (np.concatenate(clf.run([[t] for t in TEXTS])), clf.probabilities(TEXTS)):
        assert [clf.labels[k] for k in probs.argmax(-1)] == [p.label for p in ref]
        assert np.abs(probs - np.array([[p.scores[lab] for lab in clf.labels] for p in ref])).max() <= 1e-5
    long = clf.tokenizer.encode(TEXTS[5] * 20)
    assert len(long.ids) == clf.settings["max_length"]  # truncated at the artifact's length


@pytest.mark.parametrize("raw, match", [
    ([b""], "empty"), ([b"   "], "empty"), ([b"x" * (MAX_CHARS + 1)], "characters"),
    ([b"ok", b"\xff\xfe"], r"TEXT\[1\] is not valid UTF-8"), ([], "no text"),
])
def test_text_model_rejects_bad_texts(text_handoff, raw, match):
    from cahp_deploy.handoff.triton_text_model import RequestError, TextClassifier

    clf = TextClassifier(_version(text_handoff), threads=1)
    with pytest.raises(RequestError, match=match):
        clf.check(np.array(raw, dtype=object))


def test_int8_runs_each_request_alone_by_default(artifact):
    s = triton_text.settings(artifact, artifact, {"num_labels": 3}, "int8", artifact / "model.onnx", max_batch_size=4,
                             max_text_chars=10)
    assert s["merge_requests"] is False and "per tensor" in s["merge_requests_why"]
    forced = triton_text.settings(artifact, artifact, {"num_labels": 3}, "optimized", artifact / "model.onnx",
                                  max_batch_size=4, max_text_chars=10, merge_requests=False)
    assert forced["merge_requests"] is False and "--no-merge-requests" in forced["merge_requests_why"]


@pytest.mark.parametrize("kw, match", [
    ({"device": "gpu"}, "on CPU"), ({"max_batch_size": 0}, "max-batch-size"), ({"max_text_chars": 0}, "max-text-chars"),
    ({"max_queue_delay_us": -1}, "max-queue-delay-us"),
])
def test_handoff_rejects_bad_text_options(artifact, tmp_path, kw, match):
    with pytest.raises(CahpError, match=match):
        handoff(artifact, tmp_path / "h", "triton-text", **kw)
    assert not (tmp_path / "h").exists()


def test_serve_refuses_what_it_cannot_serve(artifact, tmp_path):
    code, _, err = cli("serve", tmp_path / "nope")
    assert code == 2 and err.startswith("error: handoff dir") and "does not exist" in err and len(err.splitlines()) == 1
    code, _, err = cli("serve", artifact)
    assert code == 2 and "not a handoff dir" in err and len(err.splitlines()) == 1
    ids_in = handoff(artifact, tmp_path / "ids", "triton", name="tiny")
    code, _, err = cli("serve", ids_in)
    assert code == 2 and "--target triton" in err and "ONNX Runtime backend" in err


def test_serve_without_the_extra_says_how_to_install(text_handoff, monkeypatch):
    from cahp_deploy.handoff import serve

    real = importlib.util.find_spec
    monkeypatch.setattr(serve.importlib.util, "find_spec", lambda name, *a: None if name == "pytriton" else real(name, *a))
    code, _, err = cli("serve", text_handoff)
    assert code == 2 and "nvidia-pytriton package is not installed" in err and "cahp-deploy[serve]" in err
    assert len(err.splitlines()) == 1


# ---------------------------------------------------------------------------------------- a real server
def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _infer(server, texts: list[str]) -> tuple[int, dict]:
    body = {"inputs": [{"name": "TEXT", "shape": [len(texts), 1], "datatype": "BYTES", "data": texts}]}
    return _post(f"{server.url}/v2/models/tiny/infer", json.dumps(body).encode())


def _binary_infer(server, raw: list[bytes]) -> tuple[int, dict]:
    """BYTES sent as Triton's binary tensor extension: the only way to send bytes that are not UTF-8."""
    data = b"".join(struct.pack("<I", len(b)) + b for b in raw)
    header = json.dumps({"inputs": [{"name": "TEXT", "shape": [len(raw), 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(data)}}]}).encode()
    return _post(f"{server.url}/v2/models/tiny/infer", header + data,
                 {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"})


@pytest.fixture(scope="module")
def server(text_handoff, tmp_path_factory):
    if not HAVE_TRITON:
        pytest.skip("the `serve` extra (nvidia-pytriton) is not installed: pip install 'cahp-deploy[serve]'")
    from cahp_deploy.handoff.serve import TritonServer

    log = tmp_path_factory.mktemp("serve-log") / "triton.log"
    with TritonServer(text_handoff, *_free_ports(3), log_path=log) as s:
        yield s


@needs_server
def test_server_answers_as_predict(server, artifact):
    """Concurrent single-text and batched requests (the dynamic batcher merges them) vs predict."""
    ref = {p.text: p for p in predict(artifact, TEXTS, threads=1)}
    requests = [[t] for t in TEXTS] + [TEXTS[i:i + 3] for i in range(0, len(TEXTS), 3)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda texts: (texts, _infer(server, texts)), requests))
    for texts, (status, body) in answers:
        assert status == 200, body
        out = {o["name"]: o for o in body["outputs"]}
        assert out["LABEL"]["shape"] == [len(texts), 1] and out["PROBS"]["shape"] == [len(texts), 3]
        probs = np.asarray(out["PROBS"]["data"]).reshape(len(texts), 3)
        for text, label, row in zip(texts, out["LABEL"]["data"], probs):
            assert label == ref[text].label
            assert np.abs(row - [ref[text].scores[f"LABEL_{j}"] for j in range(3)]).max() <= 1e-5


#: what -> (request, HTTP status). Triton itself answers a body that is not JSON with 500; every other
#: bad request is the client's to fix (400), whether Triton or the model rejects it
BAD_REQUESTS = {
    "empty text": (lambda s: _infer(s, [""]), 400),
    "text over max_text_chars": (lambda s: _infer(s, ["x" * 100_000]), 400),
    "wrong input name": (lambda s: _post(f"{s.url}/v2/models/tiny/infer", json.dumps(
        {"inputs": [{"name": "TEXTS", "shape": [1, 1], "datatype": "BYTES", "data": ["a"]}]}).encode()), 400),
    "wrong datatype": (lambda s: _post(f"{s.url}/v2/models/tiny/infer", json.dumps(
        {"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "INT64", "data": [3]}]}).encode()), 400),
    "invalid UTF-8": (lambda s: _binary_infer(s, [b"fine", b"\xc3\x28 broken"]), 400),
    "batch over max_batch_size": (lambda s: _infer(s, ["a"] * (MAX_BATCH + 1)), 400),
    "no inputs": (lambda s: _post(f"{s.url}/v2/models/tiny/infer", b'{"inputs": []}'), 400),
    "not JSON": (lambda s: _post(f"{s.url}/v2/models/tiny/infer", b"{nope"), 500),
}


@needs_server
@pytest.mark.parametrize("what", list(BAD_REQUESTS))
def test_bad_request_gets_an_error_and_the_server_stays_ready(server, what):
    send, expected = BAD_REQUESTS[what]
    status, body = send(server)
    assert status == expected and body.get("error"), (status, body)
    assert urllib.request.urlopen(f"{server.url}/v2/health/ready", timeout=5).status == 200
    status, body = _infer(server, ["still serving"])
    assert status == 200 and body["outputs"][0]["data"][0].startswith("LABEL_")


@needs_server
def test_the_example_client_talks_to_the_server(server, text_handoff, artifact):
    code = "import json, sys, client; print(json.dumps(client.classify(sys.argv[2:], sys.argv[1])))"
    proc = subprocess.run([sys.executable, "-c", code, server.url, "dull.", "a gripping film"], cwd=text_handoff,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)  # [[label, probs], ...]
    assert [g[0] for g in got] == [p.label for p in predict(artifact, ["dull.", "a gripping film"])]
    assert all(abs(sum(g[1]) - 1) < 1e-5 for g in got)


@needs_server
def test_bad_request_in_a_dynamic_batch_fails_alone(server):
    calls = [["good one"], [""], ["good two"], ["x" * (MAX_CHARS + 1)], ["good three"]] * 2
    with ThreadPoolExecutor(len(calls)) as pool:
        got = list(pool.map(lambda texts: _infer(server, texts)[0], calls))
    assert got == [200, 400, 200, 400, 200] * 2


@needs_server
def test_serve_command_stops_cleanly_on_ctrl_c(text_handoff, tmp_path):
    http, grpc, metrics = _free_ports(3)
    exe = Path(sys.executable).with_name("cahp-deploy")  # the console script, as a user runs it
    proc = subprocess.Popen([str(exe) if exe.is_file() else "cahp-deploy", "serve", str(text_handoff), "--http-port", str(http),
                             "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--log-file", str(tmp_path / "log")],
                            stderr=subprocess.PIPE, text=True)
    try:
        line, deadline = "", time.monotonic() + 120
        while not line.startswith("serving") and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "serve exited before it was ready"
        assert line.startswith(f"serving tiny at http://127.0.0.1:{http}/v2/models/tiny/infer")
        status, _ = _post(f"http://127.0.0.1:{http}/v2/models/tiny/infer", json.dumps(
            {"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": ["hello"]}]}).encode())
        assert status == 200
        # a second serve on the same port: one line, exit 2
        other = _free_ports(2)
        code, _, err = cli("serve", text_handoff, "--http-port", http, "--grpc-port", other[0], "--metrics-port", other[1])
        assert code == 2 and f"--http-port {http} is taken" in err and len(err.splitlines()) == 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert proc.stderr.read().strip().endswith("stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", http))  # the server is gone: its port is free again
    s.close()


def test_server_binary_is_where_serve_looks():
    if not HAVE_TRITON:
        pytest.skip("the `serve` extra is not installed")
    from cahp_deploy.handoff.serve import stub_path, triton_dist

    dist = triton_dist()
    assert (dist / "bin" / "tritonserver").is_file() and stub_path(dist).is_file()


@needs_server
def test_stop_reaps_the_stubs_of_a_killed_server(text_handoff, tmp_path):
    """SIGKILLed, tritonserver leaves its Python stubs running (and their /dev/shm regions): stop() kills them."""
    import psutil

    from cahp_deploy.handoff.serve import TritonServer

    server = TritonServer(text_handoff, *_free_ports(3), log_path=tmp_path / "log").start()
    stubs = psutil.Process(server.proc.pid).children()
    assert stubs, "the model instance runs in a stub process"
    regions = [a for p in stubs for a in p.cmdline() if a.startswith("triton_python_backend_shm_region")]
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    server.stop()
    assert server.reaped == len(stubs) and not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in stubs)
    assert not any(Path("/dev/shm", r).exists() for r in regions)


@needs_server
def test_serve_checks_the_python_env_it_is_given(text_handoff, tmp_path):
    ports = [str(p) for p in _free_ports(3)]
    args = ["serve", text_handoff, "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2]]
    code, _, err = cli(*args, "--python-env", tmp_path)
    assert code == 2 and "has no bin/python3" in err and len(err.splitlines()) == 1
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:  # this env: the stub would corrupt TYPE_STRING inputs
        code, _, err = cli(*args, "--python-env", sys.prefix)
        assert code == 2 and "needs numpy < 2" in err and len(err.splitlines()) == 1
