"""Regenerate experiments/results/distributed/: data-parallel `select` (2 ranks, gloo) against one process.

Two measurements, each one process and then 2 ranks (``torchrun --nproc_per_node 2``), interleaved:

* ``sst5``: ``cahp-deploy select`` (CAHP defaults) on minilm-sst5 over the sst5 train split; are the
  selections identical, and the wall of each (CLI process start to exit, imports included); then
  (``sst5-one-thread``) one process with 1 thread, since a 2-thread process on a loaded machine loses
  much to thread contention.
* ``sst5-ffn``: the same with FFN neurons (``--ffn-method cahp --ffn-keep-ratio 0.5``), one process
  with 1 thread against 2 ranks: identical kept heads and neurons?, and the walls.
* ``merge``: (one process with 1 thread, as each rank, so both run the same float32 kernels) a BERT-base-sized model (12 layers x 12 heads, hidden 768, random weights) over the
  first N sst5 train rows: the merged per-head, per-class signature statistics (counts, mean, M2) and
  gradient salience of 2 ranks against one process, as max relative differences, and whether
  ``select`` keeps the same heads.

Usage: python experiments/distributed.py [sst5|sst5-one-thread|sst5-ffn|merge|all] [--max-examples N] [--merge-examples 96]
The load average is written next to every timing (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "minilm-sst5"
DATA = SHARED / "data" / "sst5"
OUT = ROOT / "experiments" / "results" / "distributed"
CLI = shutil.which("cahp-deploy") or "cahp-deploy"


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]


def _timed(cmd: list[str], env: dict[str, str]) -> dict:
    load = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return {"cmd": " ".join(cmd), "wall_seconds": round(wall, 2), "loadavg_before": [round(x, 2) for x in load],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()], "stdout": proc.stdout.strip()[-400:]}


def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}


def _compare_selections(a: Path, b: Path) -> dict:
    one, two = json.loads(a.read_text()), json.loads(b.read_text())
    s1, s2 = np.concatenate(one["scores"]), np.concatenate(two["scores"])
    e1, e2 = np.asarray(one["details"]["embedding"]), np.asarray(two["details"]["embedding"])
    return {
        "kept_heads_identical": one["kept_heads"] == two["kept_heads"],
        "knee_identical": one["knee"] == two["knee"],
        "num_heads_kept": [sum(map(len, one["kept_heads"])), sum(map(len, two["kept_heads"]))],
        "class_counts_identical": one["details"]["class_counts"] == two["details"]["class_counts"],
        "salience_max_abs_diff": float(np.max(np.abs(s1 - s2))),
        "tsne_embedding_max_abs_diff": float(np.max(np.abs(e1 - e2))),
        "kept_heads": one["kept_heads"],
    }


def sst5(max_examples: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        extra = ["--max-examples", str(max_examples)] if max_examples else []
        base = ["select", str(MODEL), "--data", str(DATA), "--split", "train", "--seed", "42", *extra]
        one = _timed([CLI, *base, "--out", str(tmp / "one.json")], _env(2))
        two = _timed([*_torchrun(2), CLI, *base, "--out", str(tmp / "two.json")], _env(1))
        written = sorted(p.name for p in tmp.iterdir())
        return {"num_examples": max_examples or 8544, "one_process_2_threads": one, "two_ranks_1_thread_each": two,
                "files_written": written, **_compare_selections(tmp / "one.json", tmp / "two.json")}


def sst5_ffn(max_examples: int | None) -> dict:
    """Heads and FFN neurons (``--ffn-method cahp --ffn-keep-ratio 0.5``): 2 ranks against one process,
    both with 1 thread per process (one process with 2 threads loses much to contention on 2 busy cores)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        extra = ["--max-examples", str(max_examples)] if max_examples else []
        base = ["select", str(MODEL), "--data", str(DATA), "--split", "train", "--seed", "42",
                "--ffn-method", "cahp", "--ffn-keep-ratio", "0.5", *extra]
        one = _timed([CLI, *base, "--out", str(tmp / "one.json")], _env(1))
        two = _timed([*_torchrun(2), CLI, *base, "--out", str(tmp / "two.json")], _env(1))
        written = sorted(p.name for p in tmp.iterdir())
        a, b = json.loads((tmp / "one.json").read_text()), json.loads((tmp / "two.json").read_text())
        sal_a, sal_b = np.asarray(a["ffn"]["salience_per_layer"]), np.asarray(b["ffn"]["salience_per_layer"])
        return {
            "num_examples": max_examples or 8544, "ffn": "--ffn-method cahp --ffn-keep-ratio 0.5",
            "one_process_1_thread": one, "two_ranks_1_thread_each": two, "files_written": written,
            **_compare_selections(tmp / "one.json", tmp / "two.json"),
            "kept_neurons_identical": a["kept_neurons"] == b["kept_neurons"],
            "num_neurons_kept": [sum(map(len, a["kept_neurons"])), sum(map(len, b["kept_neurons"]))],
            "neurons_per_layer_kept": [len(n) for n in a["kept_neurons"]],
            "ffn_salience_examples": [a["ffn"]["salience_examples"], b["ffn"]["salience_examples"]],
            "ffn_salience_per_layer_max_rel_diff_as_written": _rel(sal_a, sal_b),  # rounded to 6 decimals there
            "ffn_evidence_pass": [a["ffn"]["evidence_pass"], b["ffn"]["evidence_pass"]],
            "world_size": [a["provenance"].get("world_size"), b["provenance"].get("world_size")],
        }


def sst5_one_thread() -> dict:
    """A third run, added to the sst5 result: one process with 1 thread (a 2-thread process on a loaded
    machine can lose far more to thread contention than a rank with 1 thread does)."""
    path = OUT / "select_minilm_sst5.json"
    res = json.loads(path.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "one1.json"
        extra = ["--max-examples", str(res["num_examples"])] if res["num_examples"] != 8544 else []
        run = _timed([CLI, "select", str(MODEL), "--data", str(DATA), "--split", "train", "--seed", "42", *extra,
                      "--out", str(out)], _env(1))
        run["kept_heads_identical_to_two_ranks"] = json.loads(out.read_text())["kept_heads"] == res["kept_heads"]
    res["one_process_1_thread"] = run
    path.write_text(json.dumps(res, indent=1) + "\n")
    return res


def _bert_base(directory: Path) -> Path:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(num_labels=5, hidden_size=768, num_attention_heads=12, num_hidden_layers=12,
                        intermediate_size=3072, vocab_size=30522)
    cfg.architectures = ["BertForSequenceClassification"]
    model = tf.AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager")
    model.save_pretrained(directory)
    tf.AutoTokenizer.from_pretrained(MODEL).save_pretrained(directory)
    return directory


def stats_worker(model: str, n: int, out: str) -> None:
    """Under torchrun or alone: the statistics and salience of the first n rows, merged; rank 0 writes."""
    import torch

    from cahp_deploy import arch, distributed
    from cahp_deploy.data import load_labelled
    from cahp_deploy.modeling import load_classifier
    from cahp_deploy.signals.salience import head_salience, head_salience_over_ranks
    from cahp_deploy.signals.signatures import SignatureCollector, collect_signatures

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    distributed.init_from_env()
    net, tok = load_classifier(model)
    data = load_labelled(DATA, "train").head(n)
    collector = SignatureCollector(arch.heads_per_layer(net), data.classes, 32)
    kw = dict(batch_size=32, max_length=128)
    if distributed.is_distributed():
        salience = head_salience_over_ranks(net, tok, data, **kw)
    else:
        salience = head_salience(net, tok, data, fraction=1.0, **kw)
    collect_signatures(net, tok, distributed.shard_examples(data, tok, 32, 128), collector=collector, **kw)
    distributed.merge_welford([collector.acc])
    if distributed.is_main():
        s = collector.result()
        np.savez(out, counts=s.counts, mean=s.mean, m2=s.m2, salience=salience)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    scale = np.maximum(np.abs(a), np.abs(b))
    nz = scale > 0
    return float(np.max(np.abs(a - b)[nz] / scale[nz])) if nz.any() else 0.0


def merge(n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = _bert_base(tmp / "bert-base-random")
        me = [sys.executable, str(Path(__file__).resolve()), "stats-worker", str(model), str(n)]
        one = _timed([*me, str(tmp / "one.npz")], _env(1))  # same threads as a rank: same float32 kernels
        two = _timed([*_torchrun(2), str(Path(__file__).resolve()), "stats-worker", str(model), str(n),
                      str(tmp / "two.npz")], _env(1))
        a, b = np.load(tmp / "one.npz"), np.load(tmp / "two.npz")
        result = {
            "model": "BertForSequenceClassification, 12 layers x 12 heads, hidden 768, random weights (seed 0)",
            "num_examples": n, "pool_size": 32, "stats_shape_heads_classes_cells": list(a["mean"].shape),
            "one_process_1_thread": one, "two_ranks_1_thread_each": two,
            "counts_identical": bool(np.array_equal(a["counts"], b["counts"])),
            "counts": a["counts"].tolist(),
            "mean_max_rel_diff": _rel(a["mean"], b["mean"]),
            "m2_max_rel_diff": _rel(a["m2"], b["m2"]),
            "salience_max_rel_diff": _rel(a["salience"], b["salience"]),
            "salience_max_abs_diff": float(np.max(np.abs(a["salience"] - b["salience"]))),
        }
        base = ["select", str(model), "--data", str(DATA), "--split", "train", "--max-examples", str(n),
                "--seed", "42"]
        result["select_one_process"] = _timed([CLI, *base, "--out", str(tmp / "one.json")], _env(2))
        result["select_two_ranks"] = _timed([*_torchrun(2), CLI, *base, "--out", str(tmp / "two.json")], _env(1))
        result["select"] = _compare_selections(tmp / "one.json", tmp / "two.json")
        return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "stats-worker":
        stats_worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", choices=["sst5", "sst5-one-thread", "sst5-ffn", "merge", "all"],
                        default="all")
    parser.add_argument("--max-examples", type=int, default=None, help="sst5 rows (default: all 8,544)")
    parser.add_argument("--merge-examples", type=int, default=96, help="rows for the BERT-base-sized merge")
    args = parser.parse_args()
    if not MODEL.exists() or not DATA.exists():
        raise SystemExit(f"needs {MODEL} and {DATA}")
    OUT.mkdir(parents=True, exist_ok=True)
    if args.what in ("merge", "all"):
        res = merge(args.merge_examples)
        (OUT / "merge_bert_base.json").write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps({k: v for k, v in res.items() if "process" not in k and "ranks" not in k}, indent=1))
    if args.what in ("sst5", "all"):
        res = sst5(args.max_examples)
        (OUT / "select_minilm_sst5.json").write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(res, indent=1))
    if args.what in ("sst5-one-thread", "all"):
        print(json.dumps(sst5_one_thread()["one_process_1_thread"], indent=1))
    if args.what in ("sst5-ffn", "all"):
        res = sst5_ffn(args.max_examples)
        (OUT / "select_ffn_minilm_sst5.json").write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps({k: v for k, v in res.items() if k != "kept_heads"}, indent=1))


if __name__ == "__main__":
    main()
