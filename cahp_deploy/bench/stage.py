"""The ``bench`` stage: verified artifacts in, a report dir (JSON, Markdown, plots) out.

Order of work, so that every mistake surfaces before the slow part::

    check options -> open + verify artifacts -> check they are comparable -> load data
      -> create sessions (memory) -> fixed grid (timing) -> real traffic (timing)
      -> accuracy (ONNX Runtime) -> report.json + report.md + plots, written atomically

The baseline is timed in the same run, interleaved with the others, so every speedup compares
numbers taken under the same machine conditions.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cahp_deploy.atomic import atomic_dir, check_output_path
from cahp_deploy.bench import accuracy as acc
from cahp_deploy import onnx_runtime
from cahp_deploy.bench import machine, memory, report, timing
from cahp_deploy.bench.artifacts import (
    Artifact,
    attention_layers,
    check_comparable,
    check_seqs,
    choose_variants,
    graph_facts,
    open_all,
)
from cahp_deploy.bench.inputs import Feed, grid_feed, traffic_feeds
from cahp_deploy.bench.cell_session import Runner
from cahp_deploy.bench.config import (  # defaults for a quick but meaningful run (experiments/reference.py asks more)
    DEFAULT_BATCHES, DEFAULT_MIN_REPS, DEFAULT_MIN_SECONDS, DEFAULT_SEQS, DEFAULT_TRAFFIC_SEQUENCES, DEFAULT_WARMUP,
)
from cahp_deploy.errors import CahpError
from cahp_deploy.export import int8_mac_share

log = logging.getLogger(__name__)


@dataclass
class Session:
    artifact: Artifact
    variant: str
    session: object
    info: dict  # file, size, creation time, memory

    @property
    def key(self) -> tuple[str, str]:
        return self.artifact.name, self.variant


class _Steps:
    """One progress bar over all steps; calling it starts a step and finishes the one before."""

    def __init__(self, bar, total: int):
        self.bar, self.task, self.open = bar, bar.add_task("bench", total=total), False

    def __call__(self, desc: str) -> None:
        self.finish()
        self.bar.update(self.task, description=desc)
        self.open = True

    def finish(self) -> None:
        if self.open:
            self.bar.advance(self.task)
        self.open = False


def _check_grid(name: str, values) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in values)
    except (TypeError, ValueError) as e:
        raise CahpError(f"--{name} must be positive integers, got {values!r}") from e
    if not vals:
        raise CahpError(f"empty --{name} grid; give at least one value, e.g. --{name} {'1,32' if name == 'batch' else '128'}")
    if any(v < 1 for v in vals):
        raise CahpError(f"--{name} values must be >= 1, got {list(vals)}")
    return tuple(dict.fromkeys(vals))


def _create_sessions(arts: list[Artifact], provider: str, settings, first_feed: Feed, step) -> list[Session]:
    """One session per (artifact, variant); memory measured over creation plus a first run."""
    device = onnx_runtime.device_of(provider)
    sessions = []
    for a in arts:
        for variant, path in a.variants.items():
            step(f"loading {a.name} {variant}")
            with memory.device_memory_growth(*device) as dev, memory.PeakRSS() as rss:
                start = time.perf_counter()
                sess = onnx_runtime.load_session(path, provider, settings=settings)
                create_s = time.perf_counter() - start
                onnx_runtime.check_kept_provider(sess, provider, path)
                start = time.perf_counter()
                Runner(sess, [first_feed], device, io_binding=provider != "cpu")(0)
                first_run_s = time.perf_counter() - start
            info = {
                "file": path.name,
                "size_bytes": memory.model_size_bytes(path),
                "session_create_s": create_s,
                "first_run_ms": first_run_s * 1e3,
                "rss_growth_bytes": rss.growth_bytes,
                "device_memory_bytes": dev["device_memory_bytes"],
                "providers": list(sess.get_providers()),
                "int8_mac_share": int8_mac_share(a.manifest, variant),
            }
            sessions.append(Session(a, variant, sess, info))
    return sessions


def _time_cell(sessions: list[Session], feeds: list[Feed], provider: str, budget: dict) -> list[np.ndarray]:
    device = onnx_runtime.device_of(provider)
    runners = [Runner(s.session, feeds, device, io_binding=provider != "cpu") for s in sessions]
    return timing.time_round_robin(runners, len(feeds), **budget)


def _paired_speedup(base: np.ndarray, this: np.ndarray) -> float:
    """Median over rounds of baseline time / this time; rounds are interleaved, so noise pairs up."""
    return float(np.median(base / this))


def _cells(sessions: list[Session], samples: list[np.ndarray], seqs_per_rep: np.ndarray, where: dict) -> list[dict]:
    """Summaries of one timed cell, with speedups against the baseline's same variant and fp32."""
    by_key = {s.key: x for s, x in zip(sessions, samples)}
    base_name = next(s.artifact.name for s in sessions if s.artifact.is_baseline)
    out = []
    for s, x in zip(sessions, samples):
        same, fp32 = by_key.get((base_name, s.variant)), by_key[(base_name, "fp32")]
        speed_same = _paired_speedup(same, x) if same is not None else None
        ceiling = s.artifact.flop_ceiling
        out.append(
            {
                "artifact": s.artifact.name,
                "variant": s.variant,
                **where,
                **timing.summarize(x, seqs_per_rep),
                "speedup_vs_baseline_same_variant": speed_same,
                "speedup_vs_baseline_fp32": _paired_speedup(fp32, x),
                "flop_ceiling_speedup": ceiling,
                "share_of_flop_ceiling": None if speed_same is None else speed_same / ceiling,
            }
        )
    return out


def _load_data(data, split, text_column, text_pair_column, label_column, num_labels, max_examples):
    from cahp_deploy.data import check_labels, load_labelled

    labelled = load_labelled(data, split, text_column=text_column, text_pair_column=text_pair_column, label_column=label_column)
    check_labels(labelled, num_labels)
    if max_examples is not None:
        if max_examples < 1:
            raise CahpError(f"--max-examples must be >= 1, got {max_examples}")
        labelled = labelled.head(max_examples)
    return labelled


def _accuracy(sessions: list[Session], tokenizer, labelled, max_length: int, step) -> dict:
    batches = acc.encode(tokenizer, labelled, max_length)
    preds = {}
    for s in sessions:
        step(f"accuracy {s.artifact.name} {s.variant}")
        preds[s.key] = acc.predict(s.session, batches, len(labelled))
    base_name = next(s.artifact.name for s in sessions if s.artifact.is_baseline)
    base_fp32 = preds[(base_name, "fp32")]
    results = {}
    for s in sessions:
        p = preds[s.key]
        same = preds.get((base_name, s.variant))
        a = acc.accuracy(p, labelled.labels)
        a_same = None if same is None else acc.accuracy(same, labelled.labels)
        a_fp32 = acc.accuracy(base_fp32, labelled.labels)
        results[s.key] = {
            "accuracy": a,
            "accuracy_change_vs_baseline_fp32": a - a_fp32,
            "accuracy_change_vs_baseline_same_variant": None if a_same is None else a - a_same,
            "agreement_with_baseline_fp32": acc.agreement(p, base_fp32),
            "agreement_with_baseline_same_variant": None if same is None else acc.agreement(p, same),
        }
    return results


def _check_fusion(sessions: list[Session], notes: list[str]) -> None:
    """Count fused attention nodes in every timed file. An optimized graph should have one per layer
    that kept a head; when it has fewer (the export's timing may pick the unfused graph on some
    CPUs) the report says so, since its numbers then are not those of the fused kernels."""
    for s in sessions:
        got = graph_facts(s.artifact.path / s.info["file"])["fused_attention_nodes"]
        s.info["fused_attention_nodes"] = got
        if s.variant != "optimized":
            continue
        want = attention_layers(s.artifact)
        choice = ((s.artifact.manifest.get("variants") or {}).get("optimized") or {}).get("choice")
        s.info["expected_fused_attention_nodes"] = want
        s.info["optimization_choice"] = choice
        if got != want:
            notes.append(
                f"{s.artifact.name} optimized: {got} fused attention nodes for {want} layers with heads "
                f"(export's fusion choice: {choice!r}), so its timings are not those of fully fused attention"
            )


def _origin(a: Artifact) -> str | None:
    """Hash of the dense model an artifact comes from (a pruned one records it in pruning.json)."""
    return (a.manifest.get("pruning") or {}).get("source_model_sha256") or a.manifest.get("source_model_sha256")


def bench(
    artifacts: list[str | os.PathLike],
    baseline: str | os.PathLike,
    out: str | os.PathLike,
    *,
    provider: str = "cpu",
    variants: list[str] | None = None,
    batches=DEFAULT_BATCHES,
    seqs=DEFAULT_SEQS,
    data: str | os.PathLike | None = None,
    split: str = "validation",
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str = "label",
    threads: int | None = None,
    min_seconds: float = DEFAULT_MIN_SECONDS,
    min_reps: int = DEFAULT_MIN_REPS,
    warmup: int = DEFAULT_WARMUP,
    traffic: bool = True,
    traffic_sequences: int = DEFAULT_TRAFFIC_SEQUENCES,
    max_examples: int | None = None,
    seed: int = 0,
    plots: bool = True,
    progress: bool | None = None,
    force: bool = False,
) -> dict:
    """Time, measure and score every artifact against ``baseline``; write REPORT_DIR ``out``.

    Parameters
    ----------
    artifacts : artifact dirs written by ``cahp-deploy export`` (pruned ones, typically).
    baseline : the dense artifact of the same fine-tuned model; timed in the same run, all variants.
    provider : ``cpu``, ``cuda`` or ``tensorrt``; the last two time with IO binding (inputs on device).
    variants : which of fp32/optimized/int8/fp16 to time; None = what a deployment chooses between:
        optimized and int8 where present, fp16 off the CPU (the baseline always keeps fp32).
    batches, seqs : the fixed grid; every (batch, seq) cell is timed for every session.
    data, split : labelled data for accuracy and real-traffic mode (skipped when None).
    threads : ONNX Runtime intra-op threads (None = its default, one per physical core).
    min_seconds, min_reps, warmup : per cell, every session runs ``warmup`` untimed runs, then is
        timed until it has ``min_reps`` repetitions and ``min_seconds`` of timed work.
    traffic : time real-traffic batches (one per batch size) when ``data`` is given.
    traffic_sequences : sequences drawn from the split per real-traffic batch size.
    max_examples : score accuracy on the first N rows only (None = the whole split).

    Returns the report (the contents of ``report.json``).
    """
    # -- cheap checks first: nothing slow runs before every option is known to be usable
    out = check_output_path(out, force)
    batches = _check_grid("batch", batches)
    seqs = _check_grid("seq", seqs)
    timing.check_budget(min_reps, min_seconds, warmup)
    if traffic_sequences < 1:
        raise CahpError(f"traffic_sequences must be >= 1, got {traffic_sequences}")
    onnx_runtime.check_provider(provider)
    settings = onnx_runtime.thread_settings(threads)
    started = time.perf_counter()
    load_start = machine.load_average()

    arts, notes = _open_artifacts(artifacts, baseline, seqs, variants, provider)
    base = arts[0]
    labelled = tokenizer = None
    if data is not None:
        labelled = _load_data(data, split, text_column, text_pair_column, label_column, base.num_labels, max_examples)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(base.path))
    elif traffic:
        notes.append("no --data: accuracy and real-traffic mode skipped")

    vocab = int(base.config.get("vocab_size") or 1000)
    grid = [(b, s) for b in batches for s in seqs]
    n_sessions = sum(len(a.variants) for a in arts)
    max_len = min(max(seqs), *(a.max_seq for a in arts))
    budget = dict(warmup=warmup, min_reps=min_reps, min_seconds=min_seconds)
    do_traffic = traffic and labelled is not None
    acc_len = min(a.serving_length for a in arts)  # accuracy at the length the artifacts serve
    total_steps = n_sessions + len(grid) + (len(batches) if do_traffic else 0) + (n_sessions if labelled is not None else 0)

    from cahp_deploy.progress import make_progress

    bar = make_progress(disable=None if progress is None else not progress)
    with bar:
        step = _Steps(bar, total_steps)
        # sessions one by one, so each one's memory growth is its own; first run at the largest cell
        first = grid_feed(max(batches), max(seqs), vocab, seed)
        sessions = _create_sessions(arts, provider, settings, first, step)

        cells = []
        for b, s in grid:
            step(f"grid batch {b} x seq {s}")
            samples = _time_cell(sessions, [grid_feed(b, s, vocab, seed)], provider, budget)
            cells += _cells(sessions, samples, np.full(len(samples[0]), b), {"mode": "grid", "batch": b, "seq": s})

        if do_traffic:
            cells += _traffic_cells(sessions, tokenizer, labelled, batches, max_len, traffic_sequences, seed, provider,
                                    budget, step)

        scores = _accuracy(sessions, tokenizer, labelled, acc_len, step) if labelled is not None else {}
        step.finish()

    _check_fusion(sessions, notes)
    params = {a.name: _params(a) for a in arts}
    rep = report.build(
        arts=arts,
        sessions=[(s.artifact.name, s.variant, s.info) for s in sessions],
        cells=cells,
        scores=scores,
        params=params,
        machine_info=machine.describe(provider, settings.to_dict(), load_start),
        settings={
            "provider": provider,
            "ort_providers": [p if isinstance(p, str) else p[0] for p in onnx_runtime.provider_list(provider)],
            "io_binding": provider != "cpu", "variants": variants, "batches": list(batches), "seqs": list(seqs),
            "min_seconds": min_seconds, "min_reps": min_reps, "warmup": warmup, "seed": seed, "traffic": do_traffic,
            "traffic_sequences": min(traffic_sequences, len(labelled)) if do_traffic else None,
            "data": None if labelled is None else labelled.provenance(),
            "accuracy_max_length": None if labelled is None else acc_len,
        },
        notes=notes,
        seconds=time.perf_counter() - started,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    _write_report(rep, out, force, plots)
    log.info("bench report written to %s", out)
    return rep


def _open_artifacts(artifacts, baseline, seqs, variants, provider) -> tuple[list[Artifact], list[str]]:
    """(the baseline then the artifacts, opened and checked comparable; the notes for the report)."""
    arts = open_all(list(artifacts), baseline)
    check_comparable(arts)
    check_seqs(arts, seqs)
    notes = choose_variants(arts, variants, provider)
    base = arts[0]
    if base.manifest.get("kept_heads") is not None:
        notes.append(f"baseline {base.name} is itself pruned: FLOP ceilings are relative to the dense model, speedups to it")
    others = [a.name for a in arts[1:] if _origin(a) != _origin(base)]
    if others:
        notes.append(f"{', '.join(others)}: not made from the baseline's source model (source_model_sha256 differs)")
    return arts, notes


def _traffic_cells(sessions, tokenizer, labelled, batches, max_len: int, traffic_sequences: int, seed: int,
                   provider: str, budget: dict, step) -> list[dict]:
    """Real-traffic mode: per batch size, batches of real rows (length-bucketed, padded per batch) timed."""
    cells = []
    for b in batches:
        step(f"real traffic batch {b}")
        feeds = traffic_feeds(tokenizer, labelled, b, max_len, traffic_sequences, seed)
        samples = _time_cell(sessions, feeds, provider, budget)
        per_rep = np.array([feeds[i % len(feeds)].num_sequences for i in range(len(samples[0]))])
        where = {
            "mode": "traffic",
            "batch": b,
            "seq": None,
            "max_length": max_len,
            "num_batches": len(feeds),
            "num_sequences": sum(f.num_sequences for f in feeds),
            "mean_padded_length": float(np.mean([f.padded_length for f in feeds])),
            "mean_tokens_per_sequence": float(sum(f.real_tokens for f in feeds) / sum(f.num_sequences for f in feeds)),
        }
        cells += _cells(sessions, samples, per_rep, where)
    return cells


def _params(a: Artifact) -> int | None:
    """Parameters, counted on the fp32 file even when it is not timed."""
    fp32 = a.file_of("fp32")
    return graph_facts(fp32)["params"] if fp32 is not None else None


def _write_report(rep: dict, out: Path, force: bool, plots: bool) -> None:
    """report.json, report.md and (with ``plots``) the two plots, into ``out`` at once."""
    with atomic_dir(out, force) as tmp:
        report.write(rep, tmp)
        if plots:
            from cahp_deploy.bench import plots as plotting

            plotting.latency_vs_batch(rep, tmp / "latency_vs_batch.png")
            plotting.accuracy_vs_speedup(rep, tmp / "accuracy_vs_speedup.png")
