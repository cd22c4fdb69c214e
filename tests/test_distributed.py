"""Data-parallel select and recover: 2 gloo ranks on CPU give one process's selection, and train a model."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cahp_deploy import distributed
from cahp_deploy.signals.signatures import WelfordAccumulator

# Small batches so that 60 rows make several batches per rank (and the salience pass's 15 rows, too).
OPTS = {"batch_size": 8, "salience_batch_size": 4, "max_length": 64}
KEPT = [[0, 2], [], [1]]  # layer 1 keeps no head: DDP must cope with a layer without attention weights


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accumulate(x: torch.Tensor, cls: torch.Tensor, chunks: list[int]) -> WelfordAccumulator:
    acc = WelfordAccumulator(3, x.shape[1], x.shape[2])
    start = 0
    for n in chunks:
        if n:
            acc.update(x[start:start + n], cls[start:start + n])
        start += n
    return acc


@settings(max_examples=30, deadline=None)
@given(cuts=st.lists(st.integers(0, 12), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_welford_merge_of_parts_equals_one_pass(cuts, seed):
    """Chan et al.'s merge of per-part accumulators (parts may be empty or miss a class) is what one
    accumulator fed the same batches holds, to float64 rounding; and both are the exact moments."""
    g = torch.Generator().manual_seed(seed)
    parts = list(cuts) + [5]
    n = sum(parts)
    x = torch.rand(n, 4, 6, generator=g)
    cls = torch.randint(0, 3, (n,), generator=g)
    sequential = _accumulate(x, cls, parts)
    merged = WelfordAccumulator(3, 4, 6)
    start = 0
    for k in parts:
        piece = _accumulate(x[start:start + k], cls[start:start + k], [k])
        merged.merge(piece.count, piece.mean, piece.m2)
        start += k
    torch.testing.assert_close(merged.count, sequential.count, rtol=0, atol=0)
    torch.testing.assert_close(merged.mean, sequential.mean, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(merged.m2, sequential.m2, rtol=1e-12, atol=1e-15)
    x64 = x.double()
    for c in range(3):
        rows = x64[cls == c]
        if len(rows):  # float32 batch moments: exact to ~1e-7 of the values
            torch.testing.assert_close(merged.mean[c], rows.mean(0), rtol=0, atol=1e-6)
            torch.testing.assert_close(merged.m2[c], (rows - rows.mean(0)).square().sum(0), rtol=0, atol=1e-5)


def test_one_process_is_untouched(monkeypatch):
    """Without a launcher nothing is initialised and every helper is the identity."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env() is False
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    batches = [np.arange(3), np.arange(3, 5)]
    assert [b.tolist() for b in distributed.shard_batches(batches)] == [[0, 1, 2], [3, 4]]
    v = np.arange(4.0)
    assert distributed.sum_over_ranks([v])[0] is v


def _save_ffn_evidence(model_dir: str, data_dir: str, path: str | None) -> dict[str, np.ndarray] | None:
    """CAHP's evidence pass with the FFN collector attached; the (merged) FFN statistics, saved to ``path``.

    Every rank calls it; under 2 ranks only rank 0 gets the statistics (the others return None).
    """
    from cahp_deploy.data import load_labelled
    from cahp_deploy.methods.base import MethodContext
    from cahp_deploy.methods.cahp import collect_evidence
    from cahp_deploy.modeling import load_classifier
    from cahp_deploy.signals.ffn import FfnCollector

    model, tok = load_classifier(model_dir)
    data = load_labelled(data_dir, "train")
    with FfnCollector(model, data.classes) as ffn:
        ctx = MethodContext(model=model, tokenizer=tok, data=data, budget=None, seed=0, options=OPTS, progress=None,
                            ffn=ffn)
        try:
            stats = collect_evidence(ctx).ffn
        except distributed.NotMainRank:
            return None
    arrays = {"counts": stats.counts, "mean": stats.mean, "m2": stats.m2, "salience": stats.salience,
              "salience_examples": np.array(stats.salience_examples)}
    if path is not None:
        np.savez(path, **arrays)
    return arrays


def _worker(rank: int, port: int, model_dir: str, pruned_dir: str, data_dir: str, out: str) -> None:
    """One of 2 ranks, as torchrun would start it (the environment is all a launcher provides)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from cahp_deploy.data import load_labelled
    from cahp_deploy.errors import CahpError
    from cahp_deploy.methods.stage import select
    from cahp_deploy.modeling import load_classifier
    from cahp_deploy.recovery import recover
    from cahp_deploy.signals.signatures import SignatureCollector, collect_signatures

    assert distributed.init_from_env(timeout_s=120)
    sel = select(model_dir, data_dir, f"{out}/selection.json", seed=0, options=OPTS, show_progress=False)
    assert (sel is None) == (rank != 0)
    with pytest.raises(CahpError, match="one process only"):
        select(model_dir, data_dir, f"{out}/random.json", method="random", heads=4, show_progress=False)

    # Heads and FFN neurons from the same sharded passes: CAHP's neurons (per layer knee) and gradient's.
    for name, ffn in (("ffn_cahp", dict(ffn_method="cahp")), ("ffn_gradient", dict(ffn_method="gradient",
                                                                                    ffn_keep_ratio=0.5))):
        sel = select(model_dir, data_dir, f"{out}/{name}.json", seed=0, options=OPTS, show_progress=False, **ffn)
        assert (sel is None) == (rank != 0)
    _save_ffn_evidence(model_dir, data_dir, f"{out}/ffn_stats.npz" if rank == 0 else None)

    # The raw statistics, merged: rank 0 keeps them for the comparison with one process.
    model, tok = load_classifier(model_dir)
    data = load_labelled(data_dir, "train")
    collector = SignatureCollector([4, 4, 4], data.classes, 8)
    collect_signatures(model, tok, distributed.shard_examples(data, tok, 8, 64), batch_size=8, max_length=64,
                       collector=collector)
    distributed.merge_welford([collector.acc])
    if rank == 0:
        stats = collector.result()
        np.savez(f"{out}/stats.npz", counts=stats.counts, mean=stats.mean, m2=stats.m2)

    record = recover(pruned_dir, data_dir, f"{out}/recovered", epochs=10, lr=3e-3, batch_size=4,
                     freeze_embeddings=False, eval_split="validation", progress=False)
    assert record["world_size"] == 2
    assert os.path.isdir(f"{out}/recovered")  # every rank returns after rank 0 wrote it
    distributed.shutdown()


@pytest.fixture(scope="module")
def two_ranks(tiny_models, tiny_data, tmp_path_factory):
    """Run select, a statistics merge and recover on 2 spawned gloo ranks; return their output dir."""
    import torch.multiprocessing as mp

    from cahp_deploy.pruning import prune
    from cahp_deploy.selection.result import Selection

    root = tmp_path_factory.mktemp("distributed")
    pruned = prune(tiny_models["bert"], Selection(method="random", kept_heads=KEPT, num_heads_total=12,
                                                 heads_per_layer=4), root / "pruned")
    out = root / "out"
    out.mkdir()
    mp.spawn(_worker, args=(_free_port(), str(tiny_models["bert"]), str(pruned), str(tiny_data), str(out)),
             nprocs=2, join=True)
    return out, pruned


def test_two_ranks_select_what_one_process_selects(two_ranks, tiny_models, tiny_data, tmp_path):
    from cahp_deploy.methods.stage import select

    out, _ = two_ranks
    one = select(tiny_models["bert"], tiny_data, tmp_path / "one.json", seed=0, options=OPTS, show_progress=False)
    two = json.loads((out / "selection.json").read_text())
    assert two["kept_heads"] == one.kept_heads
    np.testing.assert_allclose(np.concatenate(two["scores"]), np.concatenate(one.scores), rtol=1e-6, atol=1e-12)
    assert two["details"]["class_counts"] == one.details["class_counts"] == [20, 20, 20]
    assert (two["provenance"]["world_size"], one.provenance["world_size"]) == (2, 1)
    assert two["knee"] == one.knee
    assert not (out / "random.json").exists()
    assert sorted(p.name for p in out.iterdir()) == [
        "ffn_cahp.json", "ffn_cahp_mss.png", "ffn_gradient.json", "ffn_gradient_mss.png", "ffn_stats.npz",
        "recovered", "selection.json", "selection_mss.png", "stats.npz"]


@pytest.mark.parametrize("name, ffn", [("ffn_cahp", dict(ffn_method="cahp")),
                                       ("ffn_gradient", dict(ffn_method="gradient", ffn_keep_ratio=0.5))])
def test_two_ranks_keep_the_neurons_one_process_keeps(name, ffn, two_ranks, tiny_models, tiny_data, tmp_path):
    """FFN neuron selection data-parallel: the same heads and the same neurons as one process."""
    from cahp_deploy.methods.stage import select

    out, _ = two_ranks
    one = select(tiny_models["bert"], tiny_data, tmp_path / "one.json", seed=0, options=OPTS, show_progress=False,
                 **ffn)
    two = json.loads((out / f"{name}.json").read_text())
    assert two["kept_heads"] == one.kept_heads
    assert two["kept_neurons"] == one.kept_neurons
    assert 0 < sum(map(len, one.kept_neurons)) < 3 * 64  # a real choice: some neurons go, some stay
    assert two["ffn"]["evidence_pass"] == one.ffn["evidence_pass"] == "shared with the heads"
    assert two["ffn"]["salience_examples"] == one.ffn["salience_examples"] == 15
    if ffn["ffn_method"] == "cahp":
        assert two["ffn"]["layer_knees"] == one.ffn["layer_knees"]


def test_merged_ffn_statistics_equal_one_process(two_ranks, tiny_models, tiny_data):
    """Per-class FFN activation moments (Chan merge) and FFN salience (summed) of 2 ranks: one process's."""
    out, _ = two_ranks
    one = _save_ffn_evidence(str(tiny_models["bert"]), str(tiny_data), None)
    two = np.load(out / "ffn_stats.npz")
    np.testing.assert_array_equal(two["counts"], one["counts"])
    assert int(two["salience_examples"]) == int(one["salience_examples"]) == 15
    for key in ("mean", "m2", "salience"):
        np.testing.assert_allclose(two[key], one[key], rtol=1e-6, atol=1e-12)
    assert np.all(one["salience"] > 0) and np.all(one["m2"] > 0)  # evidence that is there to compare


def test_merged_statistics_equal_one_process(two_ranks, tiny_models, tiny_data):
    from cahp_deploy.data import load_labelled
    from cahp_deploy.modeling import load_classifier
    from cahp_deploy.signals.signatures import collect_signatures

    out, _ = two_ranks
    model, tok = load_classifier(tiny_models["bert"])
    one = collect_signatures(model, tok, load_labelled(tiny_data, "train"), pool_size=8, batch_size=8, max_length=64)
    two = np.load(out / "stats.npz")
    np.testing.assert_array_equal(two["counts"], one.counts)
    np.testing.assert_allclose(two["mean"], one.mean, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(two["m2"], one.m2, rtol=1e-6, atol=1e-12)


def test_two_ranks_recover_a_loadable_trained_model(two_ranks, tiny_data):
    from safetensors.torch import load_file

    from cahp_deploy import evaluation
    from cahp_deploy.data import load_labelled
    from cahp_deploy.modeling import load_classifier

    out, pruned = two_ranks
    rec = out / "recovered"
    record = json.loads((rec / "recovery.json").read_text())
    assert record["world_size"] == 2 and record["epochs_completed"] == 10
    # 60 rows / batch 4 = 15 batches an epoch, padded to 16 (one repeated) so each rank runs 8 steps an epoch
    assert record["steps"] == 80 and record["epochs"][0]["examples"] == 64
    before, after = load_file(pruned / "model.safetensors"), load_file(rec / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    model, tok = load_classifier(rec)
    acc = evaluation.accuracy(model, tok, load_labelled(tiny_data, "validation"), max_length=64)
    assert acc == pytest.approx(record["accuracy_after"])
    losses = [e["loss"] for e in record["epochs"]]
    assert losses[-1] < losses[0]
    assert record["accuracy_after"] >= record["accuracy_before"] + 0.3  # it learns the planted task


def test_run_refuses_a_baseline_under_a_launcher_before_joining(monkeypatch, tiny_models, tiny_data, tmp_path):
    """Checked before the process group is joined (none exists here), so every rank fails alike at once."""
    from cahp_deploy.errors import CahpError
    from cahp_deploy.run.stage import run

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CahpError, match="--method random runs in one process only"):
        run(tiny_models["bert"], tiny_data, tmp_path / "run", method="random", heads=4)
    assert not (tmp_path / "run").exists() and not distributed.is_distributed()


#: `run` on the tiny model: 1 recovery epoch, one tiny bench cell, no INT8
RUN = dict(select_options=OPTS, recover_epochs=1, seed=0, batch=(1,), seq=(16,), min_seconds=0.01, min_reps=2,
           warmup=1, traffic=False, timing=False, variants=("optimized",), quantize=None)


def _join(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def _run_worker(rank: int, port: int, model_dir: str, data_dir: str, out: str) -> None:
    """`run` on 2 ranks: plainly (heads and FFN neurons), then a budget search that rank 0 gives up."""
    _join(rank, port)
    from cahp_deploy.errors import CahpError
    from cahp_deploy.run.stage import run

    result = run(model_dir, data_dir, f"{out}/run", ffn_keep_ratio=0.5, **RUN)
    assert (result is None) == (rank != 0)
    again = run(model_dir, data_dir, f"{out}/run", ffn_keep_ratio=0.5, **RUN)  # resumes: rank 0 skips every stage
    assert (again is None) == (rank != 0)
    if rank == 0:
        assert {s["status"] for s in again["run"]["stages"].values()} == {"skipped"}
    # No head count meets a budget of 0 points (not even the first rung, dense itself: its bound is above 0)
    # after the evidence is collected on both ranks; rank 0 fails and its error stops the other rank
    # too, in one line.
    with pytest.raises(CahpError) as e:
        run(model_dir, data_dir, f"{out}/search", max_accuracy_drop=0.0, ladder="heads", **RUN)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("rank 0 stopped: " if rank else "") and "cannot show a drop within" in message
    distributed.shutdown()


@pytest.fixture(scope="module")
def two_rank_runs(tiny_models, tiny_data, tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("distributed_run")
    mp.spawn(_run_worker, args=(_free_port(), str(tiny_models["bert"]), str(tiny_data), str(out)), nprocs=2, join=True)
    return out


def test_run_under_a_launcher_selects_as_one_process_and_ships_a_loadable_artifact(two_rank_runs, tiny_models,
                                                                                   tiny_data, tmp_path):
    from cahp_deploy.methods.stage import select
    from cahp_deploy.modeling import load_classifier
    from cahp_deploy.predict import predict

    out = two_rank_runs / "run"
    record = json.loads((out / "run.json").read_text())
    assert list(record["stages"]) == ["select", "prune", "refit", "recover", "export-dense", "export-pruned", "bench", "confirm"]
    assert all(stage["status"] == "skipped" for stage in record["stages"].values())  # the resumed run's record
    assert not [p for p in two_rank_runs.rglob(".*")]  # no temp dir left by any rank
    one = select(tiny_models["bert"], tiny_data, tmp_path / "one.json", seed=0, options=OPTS, show_progress=False,
                 ffn_keep_ratio=0.5)
    two = json.loads((out / "selection.json").read_text())
    assert (two["kept_heads"], two["kept_neurons"]) == (one.kept_heads, one.kept_neurons)
    assert json.loads((out / "recovered" / "recovery.json").read_text())["world_size"] == 2
    # the shipped artifact is the recovered model: its probabilities are PyTorch's
    texts = ["alpha beta gamma", "a b c d e f"]
    results = predict(out / "artifacts" / "pruned", texts, variant="optimized")
    net, tok = load_classifier(out / "recovered")
    with torch.no_grad():
        probs = torch.softmax(net(**tok(texts, padding=True, return_tensors="pt")).logits, -1).numpy()
    np.testing.assert_allclose([list(r.scores.values()) for r in results], probs, atol=1e-4)
    assert (out / "summary.md").is_file()


def test_budget_search_under_a_launcher_tries_what_one_process_tries(two_rank_runs, tiny_models, tiny_data, tmp_path):
    """Rank 0 decided on the evidence both ranks collected; the error left no model behind."""
    from cahp_deploy.errors import CahpError
    from cahp_deploy.methods.stage import select
    from cahp_deploy.run.budget_search import CandidateResult, ladder, search_k

    search = json.loads((two_rank_runs / "search" / "search" / "search.json").read_text())
    # one process's knee and ladder, and the candidates a search down it tries when every one fails
    knee = select(tiny_models["bert"], tiny_data, tmp_path / "one.json", seed=0, options=OPTS,
                  show_progress=False).knee
    expected: list[int] = []
    with pytest.raises(CahpError):
        search_k(ladder(knee, 12), lambda k: expected.append(k) or CandidateResult(k, 0.0), 1.0, 0.0)
    tried = [c["k"] for c in search["tried"]]
    assert search["knee"]["k"] == knee and search["candidates_k"] == ladder(knee, 12)
    assert tried == expected == [12] and search["chosen_k"] is None  # every head first: it misses, the search stops
    assert "cannot show a drop within" in search["error"]
    first = search["tried"][0]
    assert first["judged"] == "pruned" and first["details"]["dense_anchor"] and first["drop"]["drop"] == 0.0
    assert not (two_rank_runs / "search" / "search" / "k012" / "recovery.json").exists()  # dense is not recovered
    assert not list((two_rank_runs / "search").glob("search/k*/model"))
    assert not (two_rank_runs / "search" / "artifacts").exists()


def test_accelerate_launch_runs_select_on_two_ranks(tiny_models, tiny_data, tmp_path):
    """`accelerate launch --multi_gpu` on a CPU host: accelerate's torchrun launcher, gloo between the ranks.

    (`--cpu --num_processes 2` would start one process: accelerate's multi-CPU launcher is mpirun.)
    """
    pytest.importorskip("accelerate")
    import shutil
    import subprocess
    import sys

    from cahp_deploy.methods.stage import select

    accelerate, cli = shutil.which("accelerate"), shutil.which("cahp-deploy")
    if accelerate is None or cli is None:
        pytest.skip("the accelerate and cahp-deploy commands are not on PATH")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "two.json"
    proc = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(_free_port()), cli, "select", str(tiny_models["bert"]),
         "--data", str(tiny_data), "--seed", "0", "--ffn-keep-ratio", "0.5", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.splitlines()) == 1 and "wrote" in proc.stdout  # rank 0 reports, the other is silent
    two = json.loads(out.read_text())
    assert two["provenance"]["world_size"] == 2
    one = select(tiny_models["bert"], tiny_data, tmp_path / "one.json", seed=0, ffn_keep_ratio=0.5,
                 show_progress=False)
    assert (two["kept_heads"], two["kept_neurons"]) == (one.kept_heads, one.kept_neurons)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.json", "one_mss.png", "two.json", "two_mss.png"]
