"""A real Triton server on the SST-5 handoff (issue #30): predictions vs `cahp-deploy predict`, a bounded
load test with and without dynamic batching beside in-process ONNX Runtime, bad requests, and the server
killed mid-load and started again.

Usage (repo root; needs the `serve` extra and ../shared):

    cahp-deploy export ../shared/models/minilm-sst5 --out ART --quantize int8 --data ../shared/data/sst5 \\
        --split validation --no-timing
    python experiments/serve_load.py --artifact ART --work /tmp/serve-bench --out experiments/results/serve

Handoffs are written with the CLI (`cahp-deploy handoff --target triton-text`), predictions with
`cahp-deploy predict --json`; the server is `cahp_deploy.handoff.serve.TritonServer` (what `serve`
runs). Clients: one thread per client, each with its own keep-alive HTTP connection, one text per
request (the KServe v2 JSON protocol), sending back to back. Writes results.json and README.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from cahp_deploy.handoff.serve import TritonServer
from cahp_deploy.handoff.triton_text_model import TextClassifier

NAME = "minilm-sst5"
PORTS = (18500, 18501, 18502)


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def sh(*cmd: str) -> str:
    if cmd[0] == "cahp-deploy":  # the console script of this interpreter's environment
        cmd = (str(Path(sys.executable).with_name("cahp-deploy")), *cmd[1:])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {res.stderr.strip()[-500:]}")
    return res.stdout


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Client:
    """One keep-alive HTTP connection; ``infer`` returns (status, body or error name, seconds)."""

    def __init__(self, port: int):
        self.port = port
        self.conn = None

    def infer(self, texts: list[str] | None = None, body: bytes | None = None, headers: dict | None = None):
        if body is None:
            body = json.dumps({"inputs": [{"name": "TEXT", "shape": [len(texts), 1], "datatype": "BYTES",
                                           "data": texts}]}).encode()
        t0 = time.perf_counter()
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            self.conn.request("POST", f"/v2/models/{NAME}/infer", body,
                              {"Content-Type": "application/json", **(headers or {})})
            r = self.conn.getresponse()
            data = r.read()
            return r.status, json.loads(data or b"{}"), time.perf_counter() - t0
        except (OSError, http.client.HTTPException) as e:
            if self.conn is not None:
                self.conn.close()
            self.conn = None
            return None, type(e).__name__, time.perf_counter() - t0


def run_load(port: int, texts: list[str], clients: int, on_progress=None, pause_after_error: float = 0.0) -> list[dict]:
    """Send ``texts`` (one per request) from ``clients`` threads; every request once, in order of a shared queue."""
    lock = threading.Lock()
    nxt = [0]
    out: list[dict] = [None] * len(texts)  # type: ignore[list-item]
    t_start = time.perf_counter()

    def worker():
        c = Client(port)
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(texts):
                return
            t0 = time.perf_counter() - t_start
            status, body, dt = c.infer([texts[i]])
            rec = {"i": i, "t": t0, "s": dt, "status": status}
            if status == 200:
                o = {x["name"]: x for x in body["outputs"]}
                rec["label"] = o["LABEL"]["data"][0]
                rec["probs"] = o["PROBS"]["data"]
            else:
                rec["error"] = body.get("error") if isinstance(body, dict) else body
                if pause_after_error:
                    time.sleep(pause_after_error)
            out[i] = rec
            if on_progress is not None:
                on_progress(i, rec)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def summarize(recs: list[dict], wall: float) -> dict:
    ok = [r["s"] * 1000 for r in recs if r["status"] == 200]
    return {"requests": len(recs), "ok": len(ok), "errors": len(recs) - len(ok), "wall_s": round(wall, 2),
            "throughput_rps": round(len(ok) / wall, 1),
            "p50_ms": round(float(np.percentile(ok, 50)), 2) if ok else None,
            "p99_ms": round(float(np.percentile(ok, 99)), 2) if ok else None,
            "mean_ms": round(statistics.fmean(ok), 2) if ok else None}


def compare(recs: list[dict], ref: list[dict], labels: list[str]) -> dict:
    same = sum(r.get("label") == p["label"] for r, p in zip(recs, ref))
    diff = max(abs(q - p["scores"][lab]) for r, p in zip(recs, ref) if r["status"] == 200
               for lab, q in zip(labels, r["probs"]))
    return {"rows": len(ref), "answered": sum(r["status"] == 200 for r in recs), "labels_identical": same,
            "max_abs_prob_diff": diff}


def batch_stats(server: TritonServer) -> dict:
    """Triton's own counters for the model: inferences (texts) per execution (ONNX batches it was handed)."""
    c = http.client.HTTPConnection("127.0.0.1", server.ports["--http-port"], timeout=10)
    c.request("GET", f"/v2/models/{NAME}/stats")
    st = json.loads(c.getresponse().read())["model_stats"][0]
    return {"inference_count": st["inference_count"], "execution_count": st["execution_count"],
            "texts_per_execution": round(st["inference_count"] / max(1, st["execution_count"]), 2),
            "batch_sizes": {b["batch_size"]: b["compute_infer"]["count"] for b in st.get("batch_stats", [])}}


def in_process(version_dir: Path, texts: list[str], batch: int) -> dict:
    clf = TextClassifier(version_dir)
    clf.probabilities(texts[:64])  # warm-up
    times = []
    t0 = time.perf_counter()
    for i in range(0, len(texts), batch):
        t = time.perf_counter()
        clf.probabilities(texts[i:i + batch])
        times.append((time.perf_counter() - t) * 1000)
    wall = time.perf_counter() - t0
    return {"requests": len(texts), "batch": batch, "wall_s": round(wall, 2), "throughput_rps": round(len(texts) / wall, 1),
            "p50_ms": round(float(np.percentile(times, 50)), 2), "p99_ms": round(float(np.percentile(times, 99)), 2),
            "what": f"TextClassifier (the served model.py's class) in this process, batches of {batch}, one stream"}


def in_process_concurrent(version_dir: Path, texts: list[str], clients: int) -> dict:
    """The same concurrency as the server's clients: ``clients`` threads, one text per call, one shared session."""
    clf = TextClassifier(version_dir)
    clf.probabilities(texts[:64])
    lock, nxt, times = threading.Lock(), [0], []

    def worker():
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(texts):
                return
            t = time.perf_counter()
            clf.probabilities([texts[i]])
            dt = (time.perf_counter() - t) * 1000
            with lock:
                times.append(dt)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"requests": len(texts), "batch": 1, "wall_s": round(wall, 2), "throughput_rps": round(len(texts) / wall, 1),
            "p50_ms": round(float(np.percentile(times, 50)), 2), "p99_ms": round(float(np.percentile(times, 99)), 2),
            "what": f"TextClassifier in this process, one text per call from {clients} threads sharing one session"}


def bad_requests(port: int, max_batch: int, max_chars: int) -> list[dict]:
    import struct

    def binary(raw: list[bytes]):
        data = b"".join(struct.pack("<I", len(b)) + b for b in raw)
        header = json.dumps({"inputs": [{"name": "TEXT", "shape": [len(raw), 1], "datatype": "BYTES",
                                         "parameters": {"binary_data_size": len(data)}}]}).encode()
        return {"body": header + data, "headers": {"Inference-Header-Content-Length": str(len(header)),
                                                   "Content-Type": "application/octet-stream"}}

    def j(obj):
        return {"body": json.dumps(obj).encode()}

    one = {"name": "TEXT", "shape": [1, 1], "datatype": "BYTES"}
    cases = {
        "empty text": j({"inputs": [{**one, "data": [""]}]}),
        f"{100_000:,}-character text (limit {max_chars:,})": j({"inputs": [{**one, "data": ["x" * 100_000]}]}),
        "wrong input name (TEXTS)": j({"inputs": [{**one, "name": "TEXTS", "data": ["fine"]}]}),
        "wrong datatype (INT64)": j({"inputs": [{**one, "datatype": "INT64", "data": [1]}]}),
        "invalid UTF-8 (binary BYTES b'\\xc3\\x28')": binary([b"\xc3\x28 broken"]),
        f"batch of {max_batch + 1} (max {max_batch})": j({"inputs": [{**one, "shape": [max_batch + 1, 1],
                                                                      "data": ["fine"] * (max_batch + 1)}]}),
        "body not JSON": {"body": b"{not json"},
    }
    c = Client(port)
    out = []
    for what, req in cases.items():
        status, body, dt = c.infer(body=req["body"], headers=req.get("headers"))
        ready = Client(port)
        hc = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        hc.request("GET", "/v2/health/ready")
        ready_status = hc.getresponse().status
        s2, b2, _ = ready.infer(["a fine, moving film"])
        out.append({"request": what, "status": status, "error": body.get("error") if isinstance(body, dict) else body,
                    "ms": round(dt * 1000, 1), "ready_after": ready_status, "next_request": s2,
                    "next_label": b2["outputs"][0]["data"][0] if s2 == 200 else None})
    return out


def kill_and_restart(handoff: Path, texts: list[str], clients: int, log_dir: Path,
                     kill_after: int) -> tuple[dict, TritonServer]:
    """Load from ``clients`` threads; after ``kill_after`` answers SIGKILL tritonserver, start it again at once."""
    server = TritonServer(handoff, *PORTS, log_path=log_dir / "kill-1.log").start()
    events: dict = {}
    done = [0]
    lock = threading.Lock()

    def restart():
        import psutil

        stubs = psutil.Process(server.proc.pid).children()
        events["killed_at"] = time.perf_counter()
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        time.sleep(1.0)
        events["stubs_alive_1s_after_kill"] = sum(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in stubs)
        server.stop()  # what `serve` does when its server dies: reap the stubs it left
        events["stubs_reaped_by_stop"] = server.reaped
        t = time.perf_counter()
        events["server2"] = TritonServer(handoff, *PORTS, log_path=log_dir / "kill-2.log").start()
        events["ready_again_at"] = time.perf_counter()
        events["restart_to_ready_s"] = round(time.perf_counter() - t, 2)

    def progress(i, rec):
        with lock:
            done[0] += rec["status"] == 200
            if done[0] == kill_after and "thread" not in events:
                events["thread"] = threading.Thread(target=restart)
                events["thread"].start()

    t0 = time.perf_counter()
    recs = run_load(PORTS[0], texts, clients, on_progress=progress, pause_after_error=0.25)
    wall = time.perf_counter() - t0
    events["thread"].join()
    server2 = events.pop("server2")
    k, r = events["killed_at"] - t0, events["ready_again_at"] - t0
    phases = {"before kill": [x for x in recs if x["t"] + x["s"] < k],
              "in flight at the kill or sent while down": [x for x in recs if x["t"] + x["s"] >= k and x["t"] < r],
              "sent after the restarted server was ready": [x for x in recs if x["t"] >= r]}
    seen = {}
    for name, xs in phases.items():
        errs: dict = {}
        for x in xs:
            if x["status"] != 200:
                key = x["error"] if isinstance(x["error"], str) and len(x["error"]) < 60 else f"HTTP {x['status']}"
                errs[key] = errs.get(key, 0) + 1
        seen[name] = {"requests": len(xs), "ok": sum(x["status"] == 200 for x in xs), "errors": errs}
    result = {"requests": len(texts), "clients": clients, "killed_after_answers": kill_after,
              "killed_at_s": round(k, 2), "ready_again_at_s": round(r, 2),
              "restart_to_ready_s": events["restart_to_ready_s"],
              "stub_processes": {"alive_1s_after_kill": events["stubs_alive_1s_after_kill"],
                                               "killed_by_TritonServer.stop": events["stubs_reaped_by_stop"]},
              "wall_s": round(wall, 2), "clients_saw": seen,
              "client_behaviour": "each request sent once, never retried; after an error the client waits 250 ms and "
                                  "reconnects"}
    return result, server2


def repeat(args) -> None:
    res = json.loads((args.out / "results.json").read_text())
    test = read_rows(args.data / "test.jsonl")
    load_texts = [test[i % len(test)]["text"] for i in range(args.requests)]
    res["repeat"] = []
    for variant in args.variants.split(","):
        for db in ("off", "on"):
            h = args.work / f"h-{variant}-db{db}"
            before = load()
            with TritonServer(h, *PORTS, log_path=args.work / "logs" / f"repeat-{variant}-db{db}.log"):
                run_load(PORTS[0], load_texts[:200], args.clients)  # warm-up
                t = time.perf_counter()
                recs = run_load(PORTS[0], load_texts, args.clients)
                s = summarize(recs, time.perf_counter() - t)
            res["repeat"].append({"variant": variant, "dynamic_batching": db, **s, "load_before": before,
                                  "load_after": load()})
            print(json.dumps(res["repeat"][-1]), flush=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "README.md").write_text(render(res))


def _repeat_says_so(res: dict) -> bool:
    """The conclusion written under the repeat table holds only for the numbers it was written for."""
    first = {(v, db): res["variants"][v][f"dynamic_batching_{db}"]["load"]["throughput_rps"]
             for v in res["variants"] for db in ("on", "off")}
    again = {(r["variant"], r["dynamic_batching"]): r["throughput_rps"] for r in res["repeat"]}
    inproc = {v: [x["throughput_rps"] for x in res["variants"][v]["in_process_ort"]] for v in res["variants"]}
    return (first.get(("int8", "off")) == 77.3 and again.get(("int8", "off")) == 102.8
            and inproc.get("optimized", [])[:2] == [60.9, 63.9] and inproc.get("int8", [])[:2] == [108.6, 124.9])


def render(res: dict) -> str:
    """README.md of the results: every number from results.json."""
    m = res["machine"]
    lines = [
        "# A real Triton server on the SST-5 handoff (issue #30)",
        "",
        "Regenerate: `python experiments/serve_load.py --artifact ART` (see its docstring for ART); numbers below are",
        "read from `results.json`. The server is nvidia-pytriton's tritonserver on CPU, started by",
        "`cahp_deploy.handoff.serve.TritonServer` (what `cahp-deploy serve` runs), one model instance.",
        "",
        f"**Conditions.** {m['cpu']}, {m['cores']} cores shared with other engineers' jobs (`ps` showed two "
        f"`cahp-deploy run`s of others running); load average {m['load_at_start']} at the start, {m.get('load_at_end', '?')} at the end; the "
        "16 client threads run on the same 2 cores as the server. Absolute numbers are those of a loaded 2-core "
        "machine; compare rows of one table, measured minutes apart, with that in mind.",
        f"Versions: {', '.join(f'{k} {v}' for k, v in res.get('versions', {}).items())}. Artifact: dense "
        f"minilm-sst5 exported with `--quantize int8` ({res['artifact']}).",
        "",
        f"## Server vs `cahp-deploy predict` ({res['rows']}, one text per request, 16 concurrent clients)",
        "",
        "| variant | dynamic batching | reference | labels identical | max abs prob diff |",
        "|---|---|---|---|---|",
    ]
    for variant, v in res["variants"].items():
        for db in ("on", "off"):
            e = v.get(f"dynamic_batching_{db}")
            if not e:
                continue
            for ref, c in e["vs_predict"].items():
                if ref == "sent":
                    continue
                lines.append(f"| {variant} | {db} | `{ref}` | {c['labels_identical']}/{c['rows']} | "
                             f"{c['max_abs_prob_diff']:.1e} |")
    lines += [
        "",
        "`predict` prints probabilities rounded to 6 decimals, so ~5e-7 is the rounding. INT8 runs each request",
        "as its own ONNX batch (`merge_requests: false`): a text sent alone gets `predict --batch-size 1`'s",
        "answer; `predict`'s default batches of 32 quantize each batch's activations with that batch's scale,",
        "which is the difference in the `--batch-size 32` row.",
        "",
        f"## Load: {res['load_rows']}, 16 concurrent clients",
        "",
        "Each client: its own keep-alive HTTP connection, one text per request, back to back (KServe v2 JSON).",
        "In-process rows: the served model's own class (`TextClassifier`) in one Python process, no HTTP.",
        "",
        "| variant | how | requests | errors | throughput (texts/s) | p50 ms | p99 ms | texts per model execution | load avg before -> after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, v in res["variants"].items():
        for db in ("on", "off"):
            e = v.get(f"dynamic_batching_{db}")
            if not e:
                continue
            ld = e["load"]
            how = f"Triton, dynamic batching {db}" + (f" (queue delay {v['settings']['max_queue_delay_us']} us)"
                                                       if db == "on" else "")
            lines.append(f"| {variant} | {how} | {ld['requests']} | {ld['errors']} | {ld['throughput_rps']} | "
                         f"{ld['p50_ms']} | {ld['p99_ms']} | {ld['texts_per_execution']} | {e['load_before']} -> "
                         f"{e['load_after']} |")
        for ip in v.get("in_process_ort", []):
            lines.append(f"| {variant} | {ip['what']} | {ip['requests']} | 0 | {ip['throughput_rps']} | "
                         f"{ip['p50_ms']} | {ip['p99_ms']} | {ip['batch']} | |")
    if res.get("repeat"):
        lines += ["", "Repeated later (`--repeat`), the server rows only, dynamic batching off before on:", "",
                  "| variant | dynamic batching | requests | errors | throughput (texts/s) | p50 ms | p99 ms | load avg before -> after |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["repeat"]:
            lines.append(f"| {r['variant']} | {r['dynamic_batching']} | {r['requests']} | {r['errors']} | "
                         f"{r['throughput_rps']} | {r['p50_ms']} | {r['p99_ms']} | {r['load_before']} -> {r['load_after']} |")
        lines += ["", "What the two runs say about dynamic batching here: the same configuration moved by up to a third "
                  "between runs (INT8 without batching: 77.3 then 102.8 texts/s), more than batching moved any of them, "
                  "and the sign of its effect flipped for INT8; on this shared 2-core machine no throughput difference "
                  "from dynamic batching is measurable. It does form batches (~9 texts per model execution at 16 clients). "
                  "In-process, one stream, batches of 32 were at most 15% faster than batches of 1 (optimized 63.9 vs "
                  "60.9, INT8 124.9 vs 108.6 texts/s): the model itself gains little from batching on this CPU." if _repeat_says_so(res) else ""]
    lines += [
        "",
        "Texts per model execution: Triton's counters (`/v2/models/NAME/stats`), how many texts the dynamic batcher",
        "handed the model per `execute` call; for INT8 each request inside it still runs as its own ONNX batch, so",
        "there batching saves only the per-call overhead (Triton to stub round trips). The in-process rows were",
        "measured just before their variant's servers, load average not recorded for them.",
        "Latency of a server request is client-side (send to last byte); in-process latency is one call (a",
        "batch of 32 for the batch-32 row). With 16 requests always in flight, a server request's latency is",
        "mostly waiting behind the other 15 (throughput x latency ~ 16).",
        "",
        "## Bad requests (the optimized server, dynamic batching on)",
        "",
        "| request | HTTP | error | server ready after | next request |",
        "|---|---|---|---|---|",
    ]
    for b in res.get("bad_requests", []):
        err = str(b["error"]).replace("|", "/")
        lines.append(f"| {b['request']} | {b['status']} | {err} | {b['ready_after']} | {b['next_request']} "
                     f"({b['next_label']}) |")
    k = res.get("kill_and_restart")
    if k:
        lines += [
            "",
            f"## tritonserver killed (SIGKILL) in the middle of the load test, started again at once",
            "",
            f"{k['requests']} requests from {k['clients']} clients ({k['client_behaviour']}). The server was killed "
            f"after {k['killed_after_answers']} answers, at {k['killed_at_s']} s; a new server on the same ports "
            f"was ready at {k['ready_again_at_s']} s ({k['restart_to_ready_s']} s from start to ready). Stub processes "
            f"of the killed server still alive 1 s after the kill: {k['stub_processes']['alive_1s_after_kill']} "
            f"(killed by `TritonServer.stop()`: {k['stub_processes']['killed_by_TritonServer.stop']}).",
            "",
            "| phase | requests | answered | errors the clients saw |",
            "|---|---|---|---|",
        ]
        for phase, x in k["clients_saw"].items():
            errs = ", ".join(f"{n} {e}" for e, n in sorted(x["errors"].items(), key=lambda t: -t[1])) or "none"
            lines.append(f"| {phase} | {x['requests']} | {x['ok']} | {errs} |")
        a = k.get("after_restart_vs_predict")
        if a:
            lines += ["", f"After the restart, the {a['rows']} rows again vs `predict`: {a['labels_identical']}/{a['rows']} "
                          f"labels identical, max abs prob diff {a['max_abs_prob_diff']:.1e}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True, type=Path)
    ap.add_argument("--data", default="../shared/data/sst5", type=Path)
    ap.add_argument("--work", default="/tmp/serve-bench", type=Path)
    ap.add_argument("--out", default="experiments/results/serve", type=Path)
    ap.add_argument("--rows", type=int, default=500)
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--variants", default="optimized,int8")
    ap.add_argument("--render-only", action="store_true", help="Rewrite README.md from OUT/results.json.")
    ap.add_argument("--repeat", action="store_true",
                    help="After a full run: the server load tests again, dynamic batching off before on (the full run "
                         "measures on first), into results.json's `repeat`.")
    args = ap.parse_args()
    if args.render_only:
        (args.out / "README.md").write_text(render(json.loads((args.out / "results.json").read_text())))
        return
    if args.repeat:
        repeat(args)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.work / "logs"
    logs.mkdir(exist_ok=True)
    test = read_rows(args.data / "test.jsonl")
    rows = test[:args.rows]
    (args.work / "rows.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    load_texts = [test[i % len(test)]["text"] for i in range(args.requests)]
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    res: dict = {"machine": {"cpu": cpu, "cores": os.cpu_count(), "load_at_start": load(),
                             "note": "2 cores shared with other engineers' jobs; the clients run on the same cores"},
                 "artifact": str(args.artifact), "rows": f"first {args.rows} of SST-5 test",
                 "load_rows": f"{args.requests} requests cycling over the {len(test)} SST-5 test rows",
                 "variants": {}}
    for variant in args.variants.split(","):
        v: dict = {}
        res["variants"][variant] = v
        for db in ("on", "off"):
            h = args.work / f"h-{variant}-db{db}"
            if not (h / "handoff.json").is_file():
                sh("cahp-deploy", "handoff", str(args.artifact), "--out", str(h), "--target", "triton-text", "--name", NAME,
                   "--variant", variant, "--force", *([] if db == "on" else ["--no-dynamic-batching"]))
        hrec = json.loads((args.work / f"h-{variant}-dbon" / "handoff.json").read_text())
        st = hrec["triton_text"]["settings"]
        v["settings"] = {"max_batch_size": hrec["triton_text"]["max_batch_size"],
                         "max_queue_delay_us": hrec["triton_text"]["max_queue_delay_us"], **st}
        # predict, as a user runs it (batch 32), and one row at a time (INT8's scales depend on the batch)
        refs = {}
        for bs in (32, 1):
            out = sh("cahp-deploy", "predict", str(args.artifact), "--file", str(args.work / "rows.jsonl"), "--json",
                     "--variant", variant, "--batch-size", str(bs))
            refs[bs] = [json.loads(line) for line in out.splitlines() if line.strip()]
        version_dir = args.work / f"h-{variant}-dbon" / "model_repository" / NAME / "1"
        v["in_process_ort"] = [in_process(version_dir, load_texts, 1), in_process(version_dir, load_texts, 32),
                               in_process_concurrent(version_dir, load_texts, args.clients)]
        for db in ("on", "off"):
            h = args.work / f"h-{variant}-db{db}"
            entry: dict = {"load_before": load()}
            v[f"dynamic_batching_{db}"] = entry
            with TritonServer(h, *PORTS, log_path=logs / f"{variant}-db{db}.log") as server:
                t = time.perf_counter()
                recs = run_load(PORTS[0], [r["text"] for r in rows], args.clients)
                entry["vs_predict"] = {f"predict --batch-size {bs}": compare(recs, refs[bs], st["labels"]) for bs in refs}
                entry["vs_predict"]["sent"] = f"{args.rows} rows, one per request, {args.clients} concurrent clients"
                run_load(PORTS[0], load_texts[:200], args.clients)  # warm-up
                before = batch_stats(server)
                t = time.perf_counter()
                recs = run_load(PORTS[0], load_texts, args.clients)
                entry["load"] = summarize(recs, time.perf_counter() - t)
                after = batch_stats(server)
                entry["load"]["texts_per_execution"] = round(
                    (after["inference_count"] - before["inference_count"]) /
                    max(1, after["execution_count"] - before["execution_count"]), 2)
                entry["load"]["errors_seen"] = sorted({str(r.get("error"))[:120] for r in recs if r["status"] != 200})
                if variant == "optimized" and db == "on":
                    res["bad_requests"] = bad_requests(PORTS[0], hrec["triton_text"]["max_batch_size"],
                                                       st["max_text_chars"])
            entry["load_after"] = load()
            print(variant, db, json.dumps(entry["load"]), json.dumps(entry["vs_predict"]), flush=True)
        (args.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    # the server killed in the middle of the load test, started again at once; then the 500 rows again
    variant = args.variants.split(",")[0]
    h = args.work / f"h-{variant}-dbon"
    kill, server2 = kill_and_restart(h, load_texts, args.clients, logs, kill_after=args.requests // 3)
    try:
        recs = run_load(PORTS[0], [r["text"] for r in rows], args.clients)
        out = sh("cahp-deploy", "predict", str(args.artifact), "--file", str(args.work / "rows.jsonl"), "--json",
                 "--variant", variant)
        ref = [json.loads(line) for line in out.splitlines() if line.strip()]
        kill["after_restart_vs_predict"] = compare(recs, ref, res["variants"][variant]["settings"]["labels"])
    finally:
        server2.stop()
    res["kill_and_restart"] = kill
    res["machine"]["load_at_end"] = load()
    res["versions"] = {"python": platform.python_version(), "onnxruntime": __import__("onnxruntime").__version__,
                       "nvidia-pytriton": sh(sys.executable, "-m", "pip", "show", "nvidia-pytriton").split("Version: ")[1].split()[0]}
    (args.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "README.md").write_text(render(res))
    print(json.dumps(kill, indent=1))


if __name__ == "__main__":
    main()
