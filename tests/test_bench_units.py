"""The bench harness's parts: timing loop, statistics, runner, memory, inputs, report text."""

from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cahp_deploy import onnx_runtime
from cahp_deploy.bench import inputs, memory, timing
from cahp_deploy.errors import CahpError

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


def test_int_list_parsing():
    from cahp_deploy.commands.bench import _int_list

    assert _int_list("--batch", "1, 8,32") == (1, 8, 32)
    assert _int_list("--batch", "") == ()
    with pytest.raises(CahpError, match="comma-separated"):
        _int_list("--seq", "128,long")


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
