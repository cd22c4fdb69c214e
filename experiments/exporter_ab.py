"""Regenerate experiments/results/tf5/exporter_ab.{json,md}: the torch.onnx export vs the Optimum export.

Both artifact dirs must hold the same pruned model exported twice (``cahp-deploy export PRUNED --out A
--exporter optimum --no-timing`` and ``... --out B --exporter torch --no-timing``, transformers 4.57,
where both exporters run). For each, this reports:

* parity: the manifests' max |logit diff| vs PyTorch (fp32 and optimized graphs), and the two
  artifacts' optimized graphs against each other on the same random inputs;
* the graphs: whether the plain exports have the same node sequence, and the fused ops per layer of
  ORT's every-fusion candidate (``ort_default``, rebuilt from each ``model.onnx``) and of the
  optimized graph the export chose: Attention (with its head count), SkipLayerNormalization,
  BiasGelu/FastGelu per layer, EmbedLayerNormalization once;
* p50 latency of the fp32 and optimized graphs of both at b1x128 and b32x128, all graphs in ONE
  interleaved loop per shape (order reversed every round), ratios torch / optimum. The machine is
  shared and noisy, so ratios of interleaved medians are the figure to read, not absolute times.

``--also NAME=DIR`` adds more artifacts of the same pruned model to every comparison and to the same
timing loop (e.g. ``torch-tf5=...``: the torch export made under transformers 5.x, whose plain graph
differs: eager attention, head counts pinned by ``torch_export.pin_head_counts``).

Usage: python experiments/exporter_ab.py OPTIMUM_ART TORCH_ART [--also NAME=DIR ...] [--threads 0]
       [--rounds 30 6] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import re
import statistics
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from cahp_deploy.export import load_manifest, variant_path
from cahp_deploy.export.optimize import build_candidate, check_attention_heads

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "experiments" / "results" / "tf5"
SHAPES = ((1, 128), (32, 128))
_LAYER = re.compile(r"layers?[._/](\d+)[._/]")
_PER_LAYER_OPS = ("SkipLayerNormalization", "BiasGelu", "FastGelu", "Gelu")


def _feed(session, batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feed = {"input_ids": rng.integers(1000, vocab, (batch, seq), dtype=np.int64),
            "attention_mask": np.ones((batch, seq), dtype=np.int64),
            "token_type_ids": np.zeros((batch, seq), dtype=np.int64)}
    feed["attention_mask"][-1, seq // 2:] = 0
    names = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feed.items() if k in names}


def fusions_per_layer(model: onnx.ModelProto, heads: list[int], head_dim: int) -> dict:
    """Fused ops per layer: Attention (layer -> heads) from the head check, the others by the layer
    index in the names of their parameters (LayerNorm gammas, FFN biases)."""
    per_layer: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for node in check_attention_heads(model, heads, head_dim, correct=False):
        per_layer[node.layer][f"Attention({node.num_heads_found})"] += 1
    for n in model.graph.node:
        if n.op_type in _PER_LAYER_OPS:
            layer = next((int(m.group(1)) for i in n.input if (m := _LAYER.search(i))), None)
            per_layer[-1 if layer is None else layer][n.op_type] += 1
    ops = collections.Counter(n.op_type for n in model.graph.node)
    return {
        "per_layer": {str(k): dict(sorted(v.items())) for k, v in sorted(per_layer.items())},
        "EmbedLayerNormalization": ops.get("EmbedLayerNormalization", 0),
        "op_counts": dict(sorted(ops.items())),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("optimum", type=Path)
    ap.add_argument("torch", type=Path)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, nargs=2, default=(30, 6), help="interleaved rounds at b1 and at b32")
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    ap.add_argument("--also", action="append", default=[], metavar="NAME=DIR")
    args = ap.parse_args()

    arts = {"optimum": args.optimum, "torch": args.torch}
    arts.update({k: Path(v) for k, v in (a.split("=", 1) for a in args.also)})
    manifests = {k: load_manifest(a) for k, a in arts.items()}
    for k, m in manifests.items():
        if k in ("optimum", "torch") and m["exporter"]["name"] != k:
            raise SystemExit(f"{arts[k]} was exported with {m['exporter']['name']}, expected {k}")
        if m["kept_heads"] != manifests["optimum"]["kept_heads"]:
            raise SystemExit(f"{arts[k]} holds another pruned model than {arts['optimum']}")
    m0 = manifests["torch"]
    heads = m0["heads_per_layer"]
    config = json.loads((arts["torch"] / "config.json").read_text())
    head_dim = int(config.get("hidden_size", 384)) // int(config.get("num_attention_heads", 12))
    vocab = int(config.get("vocab_size", 30522))

    report: dict = {"artifacts": {k: a.name for k, a in arts.items()},  # names: no machine paths "kept_heads_per_layer": heads,
                    "num_heads_kept": m0["num_heads_kept"], "versions": {k: m["versions"] for k, m in manifests.items()},
                    "exporter": {k: m["exporter"] for k, m in manifests.items()},
                    "attn_implementation": {k: m["attn_implementation"] for k, m in manifests.items()},
                    "machine": {"python": platform.python_version(), "processor": platform.processor(),
                                "ort_threads": args.threads or "ORT default"}}
    report["parity_vs_pytorch"] = {
        k: {v: m["variants"][v]["parity"]["max_abs_diff"] for v in ("fp32", "optimized")} |
           {"on": m["variants"]["fp32"]["parity"]["on"]}
        for k, m in manifests.items()}
    report["optimized_choice"] = {k: m["variants"]["optimized"]["choice"] for k, m in manifests.items()}

    plain = {k: onnx.load(str(variant_path(a, "fp32"))) for k, a in arts.items()}
    report["same_node_sequence_as_optimum"] = {
        k: [n.op_type for n in g.graph.node] == [n.op_type for n in plain["optimum"].graph.node] for k, g in plain.items()}
    report["node_counts"] = {k: len(g.graph.node) for k, g in plain.items()}
    scratch = Path(tempfile.mkdtemp(prefix="exporter-ab-"))
    report["fusions"] = {}
    for k, a in arts.items():
        full = build_candidate(variant_path(a, "fp32"), "ort_default", "bert")
        onnx.save(full, str(scratch / f"{k}_ort_default.onnx"))
        chosen = onnx.load(str(variant_path(a, "optimized")))
        report["fusions"][k] = {"ort_default": fusions_per_layer(full, heads, head_dim),
                                "optimized": fusions_per_layer(chosen, heads, head_dim)}
    report["same_fusions_as_optimum"] = {
        k: {c: f[c]["per_layer"] == report["fusions"]["optimum"][c]["per_layer"] and
               f[c]["EmbedLayerNormalization"] == report["fusions"]["optimum"][c]["EmbedLayerNormalization"]
            for c in f} for k, f in report["fusions"].items()}

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    graphs = {f"{k}/{v}": variant_path(a, v) for k, a in arts.items() for v in ("fp32", "optimized")}
    sessions = {name: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for name, p in graphs.items()}
    # every artifact's optimized graph against Optimum's, on the same random inputs
    report["optimized_max_abs_diff_vs_optimum"] = {}
    for k in arts:
        feeds = [_feed(sessions[f"{k}/optimized"], b, s, vocab, seed=i) for i, (b, s) in enumerate(((2, 16), (3, 64), (4, 128)))]
        report["optimized_max_abs_diff_vs_optimum"][k] = max(
            float(np.abs(sessions[f"{k}/optimized"].run(None, f)[0] - sessions["optimum/optimized"].run(None, f)[0]).max())
            for f in feeds)

    timings: dict[str, dict[str, float]] = {name: {} for name in graphs}
    names = list(graphs)
    for (batch, seq), rounds in zip(SHAPES, args.rounds):
        feeds = {n: _feed(sessions[n], batch, seq, vocab) for n in names}
        for n in names:
            sessions[n].run(None, feeds[n])
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            for n in names if r % 2 == 0 else reversed(names):
                t = time.perf_counter()
                sessions[n].run(None, feeds[n])
                times[n].append((time.perf_counter() - t) * 1000)
        for n in names:
            timings[n][f"b{batch}x{seq}"] = round(statistics.median(times[n]), 3)
        print(f"b{batch}x{seq} ({rounds} rounds):", {n: timings[n][f'b{batch}x{seq}'] for n in names}, flush=True)
    report["p50_ms"] = timings
    report["rounds"] = dict(zip((f"b{b}x{s}" for b, s in SHAPES), args.rounds))
    report["ratio_over_optimum"] = {
        k: {v: {s: round(timings[f"{k}/{v}"][s] / timings[f"optimum/{v}"][s], 3) for s in timings[f"{k}/{v}"]}
            for v in ("fp32", "optimized")} for k in arts if k != "optimum"}

    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "exporter_ab.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out_dir / "exporter_ab.md").write_text(_markdown(report))
    print(_markdown(report))


def _markdown(r: dict) -> str:
    keys = list(r["artifacts"])
    v0 = r["versions"]["optimum"]
    lines = [f"# torch.onnx vs Optimum export, same pruned model ({r['num_heads_kept']} heads kept)", "",
             "| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    row = lambda name, f: lines.append(f"| {name} | " + " | ".join(f(k) for k in keys) + " |")  # noqa: E731
    row("exporter", lambda k: r["exporter"][k]["name"])
    row("transformers", lambda k: str(r["versions"][k].get("transformers")))
    row("attention traced", lambda k: r["attn_implementation"][k])
    pv = r["parity_vs_pytorch"]
    row(f"max abs diff vs PyTorch, fp32 (on {pv['optimum']['on']})", lambda k: f"{pv[k]['fp32']:.1e}")
    row("max abs diff vs PyTorch, optimized", lambda k: f"{pv[k]['optimized']:.1e}")
    row("optimized vs Optimum's optimized (random inputs)", lambda k: f"{r['optimized_max_abs_diff_vs_optimum'][k]:.1e}")
    row("nodes in model.onnx", lambda k: str(r["node_counts"][k]))
    row("same node sequence as Optimum's", lambda k: str(r["same_node_sequence_as_optimum"][k]))
    row("same fusions per layer as Optimum's (ort_default / optimized)",
        lambda k: "/".join(str(v) for v in r["same_fusions_as_optimum"][k].values()))
    row("optimized choice", lambda k: r["optimized_choice"][k])
    lines += ["", "Fused ops per layer, ORT's every-fusion candidate (`ort_default`, rebuilt from each model.onnx):", "",
              "| layer | heads kept | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    per = {k: r["fusions"][k]["ort_default"]["per_layer"] for k in keys}
    fmt = lambda d: ", ".join(f"{op} x{n}" if n > 1 else op for op, n in d.items()) or "-"  # noqa: E731
    for layer in sorted(set().union(*per.values()), key=int):
        h = r["kept_heads_per_layer"][int(layer)] if int(layer) >= 0 else "-"
        lines.append(f"| {layer} | {h} | " + " | ".join(fmt(per[k].get(layer, {})) for k in keys) + " |")
    lines.append("| embeddings | | " + " | ".join(
        f"EmbedLayerNormalization x{r['fusions'][k]['ort_default']['EmbedLayerNormalization']}" for k in keys) + " |")
    lines += ["", f"p50 ms, all graphs in one interleaved loop per shape ({r['rounds']} rounds; ORT threads: "
              f"{r['machine']['ort_threads']}; torch {v0.get('torch')}, onnxruntime {v0.get('onnxruntime')}):", "",
              "| graph | shape | " + " | ".join(keys) + " | " + " | ".join(f"{k} / optimum" for k in keys[1:]) + " |",
              "|---" * (2 + len(keys) + len(keys) - 1) + "|"]
    for v in ("fp32", "optimized"):
        for s in r["p50_ms"][f"optimum/{v}"]:
            lines.append(f"| {v} | {s} | " + " | ".join(f"{r['p50_ms'][f'{k}/{v}'][s]:.2f}" for k in keys) + " | "
                         + " | ".join(f"{r['ratio_over_optimum'][k][v][s]:.3f}" for k in keys[1:]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
