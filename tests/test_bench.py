"""The bench package: its parts (timing loop, statistics, runner, memory, inputs, report text) on stubs,
then the bench stage end to end on tiny artifacts (report contents, CUDA path stubbed, bad input)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cahp_deploy import onnx_runtime
from cahp_deploy.bench import inputs, memory, timing
from cahp_deploy.errors import CahpError

# ============================================================================= the parts (no artifacts)

# ----------------------------------------------------------------------------- timing


def test_round_robin_rotates_order_and_feeds():
    calls = []
    runners = [lambda i, n=n: calls.append((n, i)) for n in "ABC"]
    samples = timing.time_round_robin(runners, 2, warmup=1, min_reps=4, min_seconds=0.0)
    assert [len(s) for s in samples] == [4, 4, 4]
    timed = calls[3:]  # after one warm-up run each
    rounds = [timed[k * 3:(k + 1) * 3] for k in range(4)]
    assert [[n for n, _ in r] for r in rounds] == [list("ABC"), list("BCA"), list("CAB"), list("ABC")]
    assert [{i for _, i in r} for r in rounds] == [{0}, {1}, {0}, {1}]  # same feed for all in a round


def test_round_robin_times_every_feed_and_honours_min_seconds():
    def sleeper(dt):
        return lambda i: time.sleep(dt)

    samples = timing.time_round_robin([sleeper(0.001), sleeper(0.003)], 5, warmup=0, min_reps=1, min_seconds=0.02)
    fast, slow = samples
    assert len(fast) == len(slow) >= 5  # every one of the 5 feeds at least once
    assert fast.sum() >= 0.02  # the fastest runner decides when enough time was spent
    assert np.median(slow) > np.median(fast)


def test_summarize_by_hand():
    s = timing.summarize(np.array([0.001, 0.002, 0.003, 0.004]), 2)
    assert s["reps"] == 4 and s["p50_ms"] == pytest.approx(2.5) and s["mean_ms"] == pytest.approx(2.5)
    assert s["p90_ms"] == pytest.approx(3.7) and s["min_ms"] == pytest.approx(1.0) and s["max_ms"] == pytest.approx(4.0)
    assert s["std_ms"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert s["throughput_seq_per_s"] == pytest.approx(8 / 0.010)
    # per-repetition sequence counts (real traffic): total sequences / total time
    t = timing.summarize(np.array([0.001, 0.003]), np.array([1, 7]))
    assert t["throughput_seq_per_s"] == pytest.approx(8 / 0.004)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(1e-5, 1.0), min_size=1, max_size=40), st.floats(0.1, 10))
def test_paired_speedup_is_exact_for_scaled_timings(times, factor):
    from cahp_deploy.bench.stage import _paired_speedup

    this = np.array(times)
    assert _paired_speedup(this * factor, this) == pytest.approx(factor)


@pytest.mark.parametrize("kw, match", [({"min_reps": 0}, "min_reps"), ({"min_seconds": -1}, "min-seconds"), ({"warmup": -1}, "warmup")])
def test_budget_checks(kw, match):
    args = {"min_reps": 1, "min_seconds": 0.0, "warmup": 0} | kw
    with pytest.raises(CahpError, match=match):
        timing.check_budget(**args)


# ----------------------------------------------------------------------------- runner


def test_io_binding_runner_matches_plain_run(tiny_onnx):
    from cahp_deploy.bench.cell_session import Runner

    sess = onnx_runtime.session(tiny_onnx, settings=onnx_runtime.thread_settings(1))
    feeds = [inputs.grid_feed(2, 8, 30522, seed=1), inputs.grid_feed(3, 5, 30522, seed=2)]
    plain, bound = Runner(sess, feeds), Runner(sess, feeds, ("cpu", 0), io_binding=True)
    for i in range(2):
        np.testing.assert_allclose(bound.logits(i), plain.logits(i), rtol=1e-5, atol=1e-6)
        assert bound.logits(i).shape == (feeds[i].num_sequences, 3)


# ----------------------------------------------------------------------------- memory


def test_peak_rss_sees_a_transient_allocation():
    with memory.PeakRSS(interval_s=0.001) as rss:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        time.sleep(0.05)
        del block
    assert rss.growth_bytes > 40 * 2**20


def test_device_memory_from_nvidia_smi(monkeypatch):
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 0, stdout="1536\n", stderr="")

    monkeypatch.setattr(memory.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(memory.subprocess, "run", fake_run)
    assert memory.device_memory_used(0) == 1536 * 2**20
    assert "--query-gpu=memory.used" in seen["cmd"] and "--id=0" in seen["cmd"]
    readings = iter([1000, 1250])
    monkeypatch.setattr(memory, "device_memory_used", lambda device_id=0: next(readings) * 2**20)
    with memory.device_memory_growth("cuda", 0) as dev:
        pass
    assert dev["device_memory_bytes"] == 250 * 2**20
    with memory.device_memory_growth("cpu", 0) as dev:
        pass
    assert dev["device_memory_bytes"] is None


def test_no_gpu_means_no_device_memory(monkeypatch):
    monkeypatch.setattr(memory.shutil, "which", lambda name: None)
    monkeypatch.setattr(memory, "_torch_used", lambda device_id: None)
    assert memory.device_memory_used(0) is None


def test_model_size_counts_external_data(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"x" * 100)
    assert memory.model_size_bytes(tmp_path / "model.onnx") == 100
    (tmp_path / "model.onnx_data").write_bytes(b"x" * 1000)
    assert memory.model_size_bytes(tmp_path / "model.onnx") == 1100


# ----------------------------------------------------------------------------- inputs


def test_max_sequence_length_accounts_for_position_offsets():
    assert inputs.max_sequence_length({"model_type": "bert", "max_position_embeddings": 512}) == 512
    assert inputs.max_sequence_length({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1}) == 512


def test_grid_feed_is_full_and_reproducible():
    f = inputs.grid_feed(4, 16, 100, seed=3)
    assert f.arrays["input_ids"].shape == (4, 16) and f.arrays["input_ids"].dtype == np.int64
    assert f.arrays["attention_mask"].all() and not f.arrays["token_type_ids"].any()
    assert (f.num_sequences, f.padded_length, f.real_tokens) == (4, 16, 64)
    np.testing.assert_array_equal(f.arrays["input_ids"], inputs.grid_feed(4, 16, 100, seed=3).arrays["input_ids"])


def test_traffic_batches_are_random_and_padded_per_batch(tiny_data):
    from transformers import AutoTokenizer

    from cahp_deploy.data import load_labelled
    from conftest import tokenizer_dir

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    data = load_labelled(tiny_data, "validation")
    feeds = inputs.traffic_feeds(tok, data, 4, 64, num_sequences=20, seed=0)
    assert [f.num_sequences for f in feeds] == [4] * 5
    for f in feeds:
        mask = f.arrays["attention_mask"]
        assert f.padded_length == mask.shape[1] == mask.sum(axis=1).max()  # padded to its own longest
        assert f.real_tokens == mask.sum()
    again = inputs.traffic_feeds(tok, data, 4, 64, num_sequences=20, seed=0)
    assert all(np.array_equal(a.arrays["input_ids"], b.arrays["input_ids"]) for a, b in zip(feeds, again))
    other = inputs.traffic_feeds(tok, data, 4, 64, num_sequences=20, seed=1)
    assert not all(np.array_equal(a.arrays["input_ids"], b.arrays["input_ids"]) for a, b in zip(feeds, other))
    # not length-bucketed: lengths in data order are not sorted
    lengths = [int(x) for f in feeds for x in f.arrays["attention_mask"].sum(axis=1)]
    assert lengths != sorted(lengths)


# ----------------------------------------------------------------------------- CLI parsing


@pytest.mark.parametrize("values, match", [((), "empty --seq grid"), ((0, 8), ">= 1"), (("a",), "positive integers")])
def test_grid_checks(values, match):
    from cahp_deploy.bench.stage import _check_grid

    with pytest.raises(CahpError, match=match):
        _check_grid("seq", values)


def test_int8_mac_share_from_the_manifest():
    from cahp_deploy.export import int8_mac_share

    m = {"variants": {"int8": {"fp32_mac_fraction": 0.25, "int8_mac_fraction": 0.75}, "fp16": {}}}
    assert int8_mac_share(m, "int8") == 0.75 and int8_mac_share(m, "optimized") == 0.0
    assert int8_mac_share(m, "fp16") is None
    assert int8_mac_share({"variants": {"int8": {"fp32_mac_fraction": 0.1}}}, "int8") == 0.9  # older manifests


# ============================================================================= the stage end to end

TINY = dict(batches=(1, 4), seqs=(8, 16), min_seconds=0.0, min_reps=3, warmup=1, traffic_sequences=8)


# ----------------------------------------------------------------------------- artifacts


def _export(model_dir: Path, out: Path, full: bool = True) -> Path:
    """The real export stage (fp32, optimized, INT8); candidate timing off to keep tests fast."""
    from cahp_deploy.export import export

    return Path(export(model_dir, out, optimize=full, quantize="int8" if full else None, measure=False))


@pytest.fixture(scope="session")
def arts(tmp_path_factory, tiny_models) -> dict[str, Path]:
    """Dense and pruned exports of the tiny BERT, and a 5-label model (another task)."""
    from cahp_deploy.pruning import prune
    from cahp_deploy.selection.result import Selection
    from conftest import save_tiny_model

    root = tmp_path_factory.mktemp("bench_arts")
    dense = tiny_models["bert"]
    sel = Selection(method="random", kept_heads=[[0, 1], [2], [0, 1, 3]], num_heads_total=12, heads_per_layer=4)
    pruned = prune(dense, sel, root / "pruned_model")
    five = save_tiny_model("bert", root / "five_labels_model", num_labels=5)
    return {
        "dense": _export(dense, root / "dense"),
        "pruned": _export(pruned, root / "pruned"),
        "five": _export(five, root / "five", full=False),
    }


@pytest.fixture(scope="session")
def report_dir(arts, tiny_data, tmp_path_factory) -> Path:
    from cahp_deploy.bench import bench

    out = tmp_path_factory.mktemp("bench_report") / "report"
    bench([arts["pruned"]], arts["dense"], out, data=tiny_data, progress=False, variants=["fp32", "optimized", "int8"],
          **TINY)
    return out


def test_default_variants_are_what_a_deployment_chooses_between(arts):
    """No --variant: the pruned artifact's optimized and INT8 graphs; the baseline adds its fp32 graph."""
    from cahp_deploy.bench.stage import _open_artifacts

    opened, _ = _open_artifacts([arts["pruned"]], arts["dense"], (8,), None, "cpu")
    chosen = {a.name: sorted(a.variants) for a in opened}
    assert chosen == {"pruned": ["int8", "optimized"], "dense": ["fp32", "int8", "optimized"]}


# ----------------------------------------------------------------------------- the report


def test_report_json_has_every_cell_speedup_and_accuracy(report_dir, arts, tiny_data):
    from cahp_deploy import schema

    rep = json.loads((report_dir / "report.json").read_text())
    schema.check_schema(rep, schema.REPORT, "report.json")
    names = {a["name"]: a for a in rep["artifacts"]}
    assert rep["baseline"] == "dense" and set(names) == {"dense", "pruned"}
    variants = sorted(names["pruned"]["variants"])
    assert variants == ["fp32", "int8", "optimized"]
    n_sessions = sum(len(a["variants"]) for a in rep["artifacts"])
    grid = [c for c in rep["cells"] if c["mode"] == "grid"]
    traffic = [c for c in rep["cells"] if c["mode"] == "traffic"]
    assert len(grid) == n_sessions * 2 * 2 and len(traffic) == n_sessions * 2
    for c in rep["cells"]:
        assert c["reps"] >= 3 and 0 < c["p50_ms"] <= c["p90_ms"] <= c["p99_ms"] <= c["max_ms"]
        assert c["throughput_seq_per_s"] > 0
    # The baseline against itself, paired round by round, is exactly 1.
    for c in grid:
        if c["artifact"] == "dense" and c["variant"] == "fp32":
            assert c["speedup_vs_baseline_fp32"] == 1.0 and c["speedup_vs_baseline_same_variant"] == 1.0
    ceiling = json.loads((arts["pruned"] / "manifest.json").read_text())["pruning"]["flop_ceiling_speedup"]
    assert ceiling > 1.0
    assert {c["flop_ceiling_speedup"] for c in grid if c["artifact"] == "pruned"} == {ceiling}
    assert {c["flop_ceiling_speedup"] for c in grid if c["artifact"] == "dense"} == {1.0}
    # traffic: 8 sequences at batch 4 -> 2 batches, each padded to its own longest sequence (< 16 here)
    t = next(c for c in traffic if c["batch"] == 4)
    assert t["num_batches"] == 2 and t["mean_padded_length"] < t["max_length"]
    # machine and settings
    m = rep["machine"]
    assert m["onnxruntime"] and m["logical_cores"] >= 1 and m["cpu_model"] and m["load_average_start"] is not None
    assert m["threads"]["allow_spinning"] is False and rep["settings"]["io_binding"] is False
    assert names["pruned"]["num_heads_kept"] == 6 and names["dense"]["num_heads_kept"] == 12
    assert names["pruned"]["params"] < names["dense"]["params"]
    # every timed file's fused attention is counted; the optimized graphs fuse each of the 3 layers
    for a in rep["artifacts"]:
        assert a["variants"]["fp32"]["fused_attention_nodes"] == 0
        assert a["variants"]["optimized"]["fused_attention_nodes"] == a["variants"]["optimized"]["expected_fused_attention_nodes"] == 3
    assert rep["notes"] == []  # same source model, every layer fused, nothing skipped


def test_accuracy_is_computed_with_onnxruntime_on_each_file(report_dir, arts, tiny_data):
    """Recompute one artifact's accuracy independently (unbucketed, one example at a time)."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from cahp_deploy.data import load_labelled

    rep = json.loads((report_dir / "report.json").read_text())
    data = load_labelled(tiny_data, "validation")
    tok = AutoTokenizer.from_pretrained(str(arts["pruned"]))
    for variant, fname in (("fp32", "model.onnx"), ("int8", "model_int8.onnx")):
        sess = ort.InferenceSession(str(arts["pruned"] / fname), providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        preds = []
        for text in data.texts:
            enc = {k: v for k, v in tok(text, return_tensors="np").items() if k in names}
            preds.append(int(sess.run(None, enc)[0].argmax()))
        info = next(a for a in rep["artifacts"] if a["name"] == "pruned")["variants"][variant]
        assert info["accuracy"] == pytest.approx(np.mean(np.array(preds) == data.labels))
    dense = next(a for a in rep["artifacts"] if a["name"] == "dense")["variants"]
    assert dense["fp32"]["agreement_with_baseline_fp32"] == 1.0
    assert dense["fp32"]["accuracy_change_vs_baseline_fp32"] == 0.0
    assert 0.0 <= dense["int8"]["agreement_with_baseline_fp32"] <= 1.0


def test_report_md_and_plots_are_readable_alone(report_dir):
    md = (report_dir / "report.md").read_text()
    for needle in ("## Summary at batch 4 x seq 16", "## Variant fp32", "## Variant int8", "### Real traffic",
                   "heads kept", "FLOP ceiling", "Δ accuracy", "6/12", "12/12", "dense (baseline)", "pruned"):
        assert needle in md, needle
    for png in ("latency_vs_batch.png", "accuracy_vs_speedup.png"):
        assert (report_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in report_dir.iterdir()) == ["accuracy_vs_speedup.png", "latency_vs_batch.png", "report.json", "report.md"]


def test_variant_filter_keeps_baseline_fp32_and_no_data_skips_accuracy(arts, tmp_path):
    from cahp_deploy.bench import bench

    rep = bench([arts["pruned"]], arts["dense"], tmp_path / "r", variants=["int8"], progress=False, plots=False,
                **{**TINY, "batches": (2,), "seqs": (8,)})
    got = {(a["name"], v) for a in rep["artifacts"] for v in a["variants"]}
    assert got == {("dense", "fp32"), ("dense", "int8"), ("pruned", "int8")}
    assert all(c["mode"] == "grid" for c in rep["cells"])
    assert all("accuracy" not in info for a in rep["artifacts"] for info in a["variants"].values())
    assert any("no --data" in n for n in rep["notes"])
    assert not (tmp_path / "r" / "latency_vs_batch.png").exists()


# ----------------------------------------------------------------------------- CUDA, stubbed


class _FakeBinding:
    def __init__(self, real, log):
        self.real, self.log = real, log

    def bind_ortvalue_input(self, name, value):
        self.log.append(("bind_input", name, value.device_name()))
        self.real.bind_ortvalue_input(name, value)

    def bind_output(self, name, kind, device_id):
        self.log.append(("bind_output", name, kind))
        self.real.bind_output(name, "cpu", 0)

    def synchronize_outputs(self):
        self.real.synchronize_outputs()

    def copy_outputs_to_cpu(self):
        return self.real.copy_outputs_to_cpu()


class _FakeCudaSession:
    """A CPU session that claims to run on CUDA when asked for it, and logs how it is driven.

    Sessions created for the CPU (the export's ``verify`` smoke test) behave normally and log nothing.
    """

    log: list = []
    real_class = None  # onnxruntime.InferenceSession, saved before it is patched

    def __init__(self, path, sess_options=None, providers=None):
        first = (providers or ["CPUExecutionProvider"])[0]
        self.cuda = first == ("CUDAExecutionProvider", {"device_id": 0})
        self.real = self.real_class(path, sess_options=sess_options, providers=["CPUExecutionProvider"])
        self._log(("create", providers))

    def _log(self, entry):
        if self.cuda:
            self.log.append(entry)

    def get_providers(self):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.cuda else self.real.get_providers()

    def get_inputs(self):
        return self.real.get_inputs()

    def get_outputs(self):
        return self.real.get_outputs()

    def run(self, names, feeds, *args):
        self._log(("run",))
        return self.real.run(names, feeds, *args)

    def io_binding(self):
        return _FakeBinding(self.real.io_binding(), self.log)

    def run_with_iobinding(self, binding):
        self._log(("run_with_iobinding",))
        self.real.run_with_iobinding(binding.real)


def test_cuda_path_uses_io_binding_and_device_memory(arts, tiny_data, tmp_path, monkeypatch):
    import onnxruntime as ort

    from cahp_deploy.bench import memory

    real_from_numpy = ort.OrtValue.ortvalue_from_numpy
    placed = []

    def from_numpy(array, kind="cpu", device_id=0):
        placed.append(kind)
        return real_from_numpy(array, "cpu", 0)

    used = iter(range(1000, 10**6, 100))
    monkeypatch.setattr(_FakeCudaSession, "real_class", ort.InferenceSession)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", _FakeCudaSession)
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy", staticmethod(from_numpy))
    monkeypatch.setattr(memory, "device_memory_used", lambda device_id=0: next(used) * 2**20)
    _FakeCudaSession.log = []
    from cahp_deploy.bench import bench

    rep = bench([arts["pruned"]], arts["dense"], tmp_path / "r", provider="cuda", variants=["fp32"], progress=False,
                plots=False, **{**TINY, "batches": (2,), "seqs": (8,)}, data=tiny_data, traffic=False)
    log = _FakeCudaSession.log
    creates = [e[1] for e in log if e[0] == "create"]
    assert len(creates) == 2 and all(c[-1] == "CPUExecutionProvider" for c in creates)  # dense + pruned fp32
    assert set(placed) == {"cuda"}
    assert ("bind_output", "logits", "cuda") in log
    # timing ran through IO binding only; plain run() is used for accuracy, after the last timed call
    last_timed = max(i for i, e in enumerate(log) if e[0] == "run_with_iobinding")
    first_plain = min(i for i, e in enumerate(log) if e[0] == "run")
    assert first_plain > last_timed
    assert rep["settings"]["io_binding"] is True and rep["settings"]["ort_providers"][0] == "CUDAExecutionProvider"
    for a in rep["artifacts"]:
        assert a["variants"]["fp32"]["device_memory_bytes"] == 100 * 2**20
        assert a["variants"]["fp32"]["providers"][0] == "CUDAExecutionProvider"
        assert a["variants"]["fp32"]["accuracy"] is not None


# ----------------------------------------------------------------------------- bad input


def _in_process(args, capsys):
    from cahp_deploy.commands.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", *args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return e.value.code, err


@pytest.mark.parametrize(
    "case, expect",
    [
        ("not_artifact", "not an artifact dir"),
        ("tampered", "re-export"),
        ("other_task", "5 labels"),
        ("empty_grid", "empty --batch grid"),
        ("seq_too_long", "--seq 256 is longer than"),
        ("cuda_missing", "CUDAExecutionProvider"),
        ("out_exists", "already exists"),
        ("bad_list", "comma-separated integers"),
    ],
)
def test_bad_input_is_one_line_exit_2(case, expect, arts, tmp_path, capsys):
    base = ["--baseline", str(arts["dense"]), "--out", str(tmp_path / "r"), "--min-seconds", "0", "--min-reps", "1",
            "--batch", "1", "--seq", "8"]
    target = str(arts["pruned"])
    extra: list[str] = []
    if case == "not_artifact":
        target = str(tmp_path)
    elif case == "tampered":
        t = tmp_path / "tampered"
        shutil.copytree(arts["pruned"], t)
        data = bytearray((t / "model.onnx").read_bytes())
        data[-1] ^= 0xFF
        (t / "model.onnx").write_bytes(bytes(data))
        target = str(t)
    elif case == "other_task":
        target = str(arts["five"])
    elif case == "empty_grid":
        extra = ["--batch", ""]
    elif case == "seq_too_long":
        extra = ["--seq", "8,256"]
    elif case == "cuda_missing":
        extra = ["--provider", "cuda"]
    elif case == "out_exists":
        (tmp_path / "r").mkdir()
    elif case == "bad_list":
        extra = ["--seq", "8,x"]
    code, err = _in_process([target, *base, *extra], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
    if case != "out_exists":
        assert not (tmp_path / "r").exists()


def test_cli_runs_end_to_end(arts, tiny_data, tmp_path, capsys):
    from cahp_deploy.commands.cli import main

    main(["bench", str(arts["pruned"]), "--baseline", str(arts["dense"]), "--out", str(tmp_path / "r"),
          "--batch", "2", "--seq", "8", "--variant", "fp32", "--min-seconds", "0", "--min-reps", "2",
          "--data", str(tiny_data), "--max-examples", "10"])
    assert "report.md" in capsys.readouterr().out
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["settings"]["data"]["num_examples"] == 10
    assert {c["mode"] for c in rep["cells"]} == {"grid", "traffic"}


def test_failure_while_writing_leaves_no_report(arts, tmp_path, monkeypatch):
    from cahp_deploy.bench import bench, report

    def boom(rep, directory):
        (directory / "report.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write", boom)
    with pytest.raises(KeyboardInterrupt):
        bench([arts["pruned"]], arts["dense"], tmp_path / "r", variants=["fp32"], progress=False,
              **{**TINY, "batches": (1,), "seqs": (8,)})
    assert list(tmp_path.iterdir()) == []
