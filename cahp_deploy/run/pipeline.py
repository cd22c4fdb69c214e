"""``run``: every stage in one command, resumable, with a dense-vs-pruned summary at the end.

::

    MODEL ─select─▶ OUT/selection.json ─prune─▶ OUT/pruned/ ─recover─▶ OUT/recovered/ ─export─▶ OUT/artifacts/pruned/ ─┐
      └───────────────────────────────────────────────────────────────────export─▶ OUT/artifacts/dense/ ──────────┴─bench─▶ OUT/report/

With ``max_accuracy_drop`` (``--max-accuracy-drop P``), select/prune/recover become one ``search``
stage (:mod:`cahp_deploy.run.accuracy_budget`, into ``OUT/search/``) that tests CAHP cuts down a ladder
from every head towards the knee while the candidate stays within P points of dense; export takes the
last one that passed. Either way ``OUT/summary.md`` answers the user's question first, in words.

``OUT/run.json`` records, per stage, the hashes of the inputs it saw (model files, data files, the
upstream output, its options), its output's hash and its time. A rerun skips a stage whose output still
has the recorded hash and whose inputs hash as recorded; anything changed upstream makes every stage
after it run again. ``force`` redoes all. Each stage writes atomically, and run.json is rewritten after
each stage, so a Ctrl-C loses at most the stage in flight and a rerun resumes after the last one done.

Stages are run through :class:`RunRecord.stage`, each one call with its own inputs and output.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cahp_deploy import schema
from cahp_deploy.run import summary as run_summary
from cahp_deploy.atomic import atomic_file
from cahp_deploy.errors import CahpError
from cahp_deploy.hashing import sha256_dir, sha256_file, sha256_json
from cahp_deploy.paired import DEFAULT_CONFIDENCE
from cahp_deploy.run.promise import DENSE_ARTIFACT_DIR, PRUNED_ARTIFACT_DIR, ErrorRates

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
SELECTION_FILE = "selection.json"
PRUNED_DIR = "pruned"
REFIT_DIR = "refit"
RECOVERED_DIR = "recovered"
SEARCH_DIR = "search"
SUMMARY_FILE = "summary.md"
DENSE_ARTIFACT = DENSE_ARTIFACT_DIR
PRUNED_ARTIFACT = PRUNED_ARTIFACT_DIR
REPORT_DIR = "report"

#: Variants exported for both models: what a CPU deployment would choose between.
DEFAULT_QUANTIZE = "int8"
#: The bench grid of `run`: one latency-bound and one throughput-bound shape at a typical length.
DEFAULT_BATCHES = (1, 32)
DEFAULT_SEQS = (128,)
#: Under a budget with the refit, the ladder is joint by default: each rung also keeps a share of FFN
#: neurons falling from every neuron at every head to this share at CAHP's knee (FFN neurons are ~2/3
#: of the MACs; measured on SST-5, 48 heads refit: 83 rows disagree with dense, 48 heads + 75% of the
#: neurons refit: 90).
DEFAULT_BUDGET_FFN_FLOOR = 0.5
#: the budget search's ladder: "macs" (progressive: ~5% of dense MACs per rung, heads and neurons
#: together, nested; :mod:`cahp_deploy.run.progressive`) or "heads" (CAHP head counts, N/12 apart)
LADDERS = ("macs", "heads")
DEFAULT_LADDER = "macs"


#: text rows each rung is distilled on, at most (``--distill-max-examples``)
DEFAULT_DISTILL_ROWS = 20000


def _distill_rows(path, split: str, max_examples: int | None, max_drop: float | None, columns: dict[str, Any],
                  evaluation_rows: list, seed: int) -> dict[str, Any] | None:
    """``--distill-data``'s text: rows that appear in the evaluation or confirmation splits dropped, a judge
    part held out (:func:`cahp_deploy.recovery.distill.split_judge`), the rest cut to ``max_examples``."""
    if path is None:
        return None
    if max_drop is None:
        raise CahpError("--distill-data trains each rung of the accuracy budget's ladder; give --max-accuracy-drop too")
    from cahp_deploy.data import load_texts, without_rows_of
    from cahp_deploy.recovery.distill import split_judge
    from cahp_deploy.recovery.stage import sample_examples

    rows = load_texts(path, split, columns["text_column"], columns["text_pair_column"])
    rows, dropped = without_rows_of(rows, *[r for r in evaluation_rows if r is not None])
    train, judge = split_judge(rows, seed)
    train = sample_examples(train, max_examples, seed)
    return {"rows": train, "judge": judge, "record": {
        **train.provenance(), "rows": len(train), "judge_rows": len(judge), "dropped_as_evaluation_rows": dropped}}


def _check_ladder(ladder: str, mac_step: float | None, search_step: int | None, max_drop: float | None) -> None:
    if ladder not in LADDERS:
        raise CahpError(f"unknown --ladder {ladder!r}; choose from {', '.join(LADDERS)}")
    if mac_step is not None and not 0.0 < mac_step < 0.5:
        raise CahpError(f"--mac-step is a share of the dense MACs in (0, 0.5), got {mac_step}")
    if mac_step is not None and (ladder != "macs" or max_drop is None):
        raise CahpError("--mac-step sets the progressive ladder's step; give --ladder macs and --max-accuracy-drop")
    if search_step is not None and ladder != "heads":
        raise CahpError("--search-step is the head ladder's step; with --ladder macs give --mac-step")
#: The reference pipeline's recovery: 3 epochs of fine-tuning after pruning.
DEFAULT_RECOVER_EPOCHS = 3


def _default_variants(quantize: str | None) -> list[str]:
    """Time what a CPU deployment chooses between: the optimized graph and its INT8 version."""
    return ["optimized", "int8"] if quantize == "int8" else ["optimized"]


def output_sha256(path: Path) -> str | None:
    """Hash of everything a stage wrote (every file, not only model files), or None if absent."""
    if path.is_dir():
        return sha256_dir(path, model_files_only=False)
    if path.is_file():
        return sha256_file(path)
    return None


def model_sha256(model: str | os.PathLike) -> str:
    """Content hash of a local model dir; a hub id is identified by its name (nothing downloaded)."""
    p = Path(model)
    return sha256_dir(p) if p.is_dir() else sha256_json({"hub_id": str(model)})


class RunRecord:
    """``OUT/run.json``: what every stage saw and made; decides which stages a rerun may skip."""

    def __init__(self, out: Path, force: bool, say: Callable[[str], None] = lambda s: None):
        self.out = out
        self.force = force
        self.say = say
        self.path = out / RUN_FILE
        self.data: dict[str, Any] = {"schema": schema.RUN, "stages": {}}
        if self.path.is_file():
            # Kept even with force (which only stops skipping), so stages a caller ran before `run`
            # (the demo's fine-tune) stay on record.
            try:
                with open(self.path) as f:
                    loaded = json.load(f)
                schema.check_schema(loaded, schema.RUN, str(self.path))
            except (json.JSONDecodeError, CahpError) as e:
                if not force:
                    raise CahpError(f"{self.path} is not a readable run record ({e}); pass --force to start over") from None
            else:
                self.data = loaded
                self.data.setdefault("stages", {})

    @property
    def stages(self) -> dict[str, dict]:
        return self.data["stages"]

    def save(self) -> None:
        with atomic_file(self.path, force=True) as tmp:
            with open(tmp, "w") as f:
                json.dump(self.data, f, indent=2)
                f.write("\n")

    def output_hash(self, name: str) -> str:
        return self.stages[name]["output_sha256"]

    def stage(self, name: str, inputs: dict[str, Any], output: Path, work: Callable[[bool], Any]) -> bool:
        """Run ``work(overwrite)`` unless ``output`` is still what this stage made from these inputs.

        Returns True when the stage ran. ``work`` must write ``output`` atomically; ``overwrite`` is
        True when a stale output of an earlier run is there to be replaced.
        """
        inputs_sha = sha256_json(inputs)
        prev = self.stages.get(name)
        if (
            not self.force
            and prev is not None
            and prev.get("inputs_sha256") == inputs_sha
            and prev.get("output_sha256") is not None
            and output_sha256(output) == prev["output_sha256"]
        ):
            prev["status"] = "skipped"
            self.save()
            self.say(f"[dim]{name}: up to date ({output.relative_to(self.out)}), skipped[/dim]")
            return False
        self.say(f"[bold]{name}[/bold] -> {output.relative_to(self.out)}")
        start = time.perf_counter()
        work(self.force or output.exists())
        seconds = time.perf_counter() - start
        self.stages[name] = {
            "status": "done",
            "inputs": inputs,
            "inputs_sha256": inputs_sha,
            "output": str(output.relative_to(self.out)),
            "output_sha256": output_sha256(output),
            "seconds": round(seconds, 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.save()
        return True


def check_run_dir(out: Path, force: bool) -> None:
    """``out`` must be new, empty, or a run dir of ours (then a rerun resumes there)."""
    if out.exists() and not out.is_dir():
        raise CahpError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / RUN_FILE).is_file() and not force:
        raise CahpError(
            f"output {out} already exists and is not a cahp-deploy run dir (no {RUN_FILE}); "
            "pass --force to write into it or choose another --out"
        )


def _prune_none(d: dict[str, Any]) -> dict[str, Any]:
    """Options left at None are the stage's own defaults: pass them on only when set."""
    return {k: v for k, v in d.items() if v is not None}


def run(
    model: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    method: str = "cahp",
    select_split: str = "train",
    eval_split: str = "validation",
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str = "label",
    seed: int = 42,
    degree: int | None = None,
    pool_size: int | None = None,
    space: str | None = None,
    heads: int | None = None,
    keep_ratio: float | None = None,
    max_examples: int | None = None,
    ffn_method: str | None = None,
    ffn_keep_ratio: float | None = None,
    ffn_neurons: int | None = None,
    recover: bool | None = None,
    reconstruct: bool = True,
    reconstruct_rows: int | None = None,
    recover_epochs: int = DEFAULT_RECOVER_EPOCHS,
    recover_lr: float | None = None,
    recover_max_examples: int | None = None,
    recover_split: str | None = None,
    distill: bool = False,
    qat: bool | None = None,
    max_accuracy_drop: float | None = None,
    search_step: int | None = None,
    ladder: str = DEFAULT_LADDER,
    mac_step: float | None = None,
    distill_data: str | os.PathLike | None = None,
    distill_split: str = "train",
    distill_max_examples: int | None = DEFAULT_DISTILL_ROWS,
    confirm_split: str | None = None,
    confirm_fraction: float | None = None,
    confidence: float | None = None,
    quantize: str | None = DEFAULT_QUANTIZE,
    per_channel: bool | None = None,
    int8_max_accuracy_drop: float | None = None,
    int8_min_agreement: float | None = None,
    fp16: bool = False,
    opset: int | None = None,
    timing: bool = True,
    provider: str = "cpu",
    batch: tuple[int, ...] | None = None,
    seq: tuple[int, ...] | None = None,
    min_seconds: float | None = None,
    min_reps: int | None = None,
    warmup: int | None = None,
    traffic: bool = True,
    threads: int | None = None,
    variants: tuple[str, ...] | None = None,
    eval_max_examples: int | None = None,
    max_length: int | None = None,
    select_options: dict[str, Any] | None = None,
    recover_options: dict[str, Any] | None = None,
    export_options: dict[str, Any] | None = None,
    bench_options: dict[str, Any] | None = None,
    force: bool = False,
    console=None,
) -> dict[str, Any] | None:
    """Select, prune, refit, recover, export (dense and pruned: optimized fp32 + INT8) and bench, into ``out``.

    ``reconstruct`` (default) refits every pruned model's output projections against ``model`` by
    least squares on ``reconstruct_rows`` rows of the selection split (no training, no labels;
    :mod:`cahp_deploy.recovery.reconstruct`), before any fine-tune. ``recover`` None (default): the
    fine-tune runs after it, except under an accuracy budget with the refit, where it is off: every
    fine-tune on gold labels measured moved pruned models away from dense on new rows, the refit
    toward it.

    ``recover`` fine-tunes the pruned model on ``recover_split`` (default: the selection split) for
    ``recover_epochs``; ``distill`` adds distillation from ``model``; ``qat`` trains under simulated
    dynamic INT8 (the exported INT8 graph's rounding); None (default): on when INT8 is exported,
    because measured on minilm-sst5's knee (15 heads) the recovered model's INT8 graph then passes the
    accuracy gate with every MatMul INT8 (2.71x vs dense fp32 at b32x128; 0.05 points *above* its fp32 on
    test), where plain recovery's keeps 95 % of the MACs fp32 (1.31x) at the same test accuracy.
    ``max_accuracy_drop`` (points on
    the evaluation split) replaces select/prune/recover by the budget search (``ladder`` "macs": rungs
    ``mac_step`` of the dense MACs apart, heads in CAHP's order and FFN neurons together, nested;
    "heads": CAHP head counts ``search_step`` apart), decided on the upper
    confidence bound (``confidence``) of the paired drop, on decision rows only; ``confirm_split`` (or a
    held-out ``confirm_fraction`` of the evaluation split) confirms the shipped artifact on rows no
    decision saw (:mod:`cahp_deploy.run.promise`). ``max_length`` is the one length every stage scores
    at and the artifact serves (None: the longest row of the data, capped at the model's positions;
    :mod:`cahp_deploy.serving_length`).

    Returns ``{"out", "report", "summary_md", "run", "summary"}``: the run record (run.json's
    contents) and the dense-vs-pruned summary that is also printed. ``select_options`` /
    ``recover_options`` / ``export_options`` / ``bench_options`` pass further keyword arguments to
    those stages verbatim.

    Everything the user can get wrong (paths, splits, columns, labels, provider, an ``out`` that is
    not a run dir) is checked before any stage starts; nothing is written then.

    Launched as several ranks (``torchrun ... cahp-deploy run``), select's evidence and recovery (each
    budget-search candidate's too) run data-parallel on every rank; rank 0 alone decides, prunes,
    exports, benchmarks and writes (:func:`cahp_deploy.distributed.collective`). The other ranks write
    nothing, are let go once no data-parallel stage is left, and return None.
    """
    from cahp_deploy.onnx_runtime import check_provider
    from cahp_deploy.data import check_labels, load_labelled
    from cahp_deploy.modeling import load_config

    from cahp_deploy import distributed

    if distributed.launched() and method != "cahp":  # checked before joining: every rank fails alike
        raise CahpError(f"--method {method} runs in one process only; launch run without torchrun "
                        "(cahp is data-parallel)")
    model, data, out = str(model), str(data), Path(out)
    if recover is None:
        recover = not (max_accuracy_drop is not None and reconstruct)
    if ladder == "macs" and max_accuracy_drop is not None and (ffn_keep_ratio is not None or ffn_neurons is not None):
        raise CahpError("--ffn-keep-ratio/--ffn-neurons set the head ladder's FFN cut; the progressive ladder "
                        "(--ladder macs, the default) removes neurons itself: drop them or give --ladder heads")
    if max_accuracy_drop is not None and reconstruct and ffn_keep_ratio is None and ffn_method is None \
            and ffn_neurons is None and ladder == "heads":
        ffn_keep_ratio = DEFAULT_BUDGET_FFN_FLOOR  # the refit carries FFN cuts too: the ladder thins both
    if reconstruct_rows is not None and (not reconstruct or reconstruct_rows < 2):
        raise CahpError(f"--reconstruct-rows {reconstruct_rows} needs --reconstruct and at least 2 rows")
    recover_split = recover_split or select_split
    if select_split == eval_split:
        raise CahpError(
            f"the evaluation split ({eval_split!r}) must differ from the selection split "
            f"({select_split!r}); pass --eval-split (e.g. validation or test)"
        )
    if recover and recover_split == eval_split:
        raise CahpError(
            f"the evaluation split ({eval_split!r}) must differ from the recovery split ({recover_split!r})"
        )
    _check_budget_options(max_accuracy_drop, method, heads, keep_ratio)
    if max_accuracy_drop is not None and (ffn_method not in (None, "cahp", "gradient") or ffn_neurons is not None
                                          or (ffn_method is not None and ffn_keep_ratio is None)):
        raise CahpError("--max-accuracy-drop searches CAHP heads and, down to a --ffn-keep-ratio floor, FFN neurons "
                        "(--ffn-method cahp or gradient); give --ffn-keep-ratio for the FFN")
    if confirm_split is not None and confirm_split in (select_split, eval_split, recover_split if recover else None):
        raise CahpError(f"--confirm-split {confirm_split!r} must differ from the selection, recovery and evaluation "
                        "splits: it confirms on rows no decision saw")
    from cahp_deploy.export.stage import INT8_TUNING_SPLIT

    if confirm_split == INT8_TUNING_SPLIT and quantize == "int8" and max_accuracy_drop is None:
        raise CahpError(f"--confirm-split {confirm_split!r} is the split export's INT8 tuning reads; confirm on another "
                        "split (e.g. test)")
    if confirm_fraction is not None and not 0.0 < confirm_fraction < 1.0:
        raise CahpError(f"--confirm-fraction must be in (0, 1), got {confirm_fraction}")
    if confidence is not None and not 0.5 < confidence < 1.0:
        raise CahpError(f"--confidence must be in (0.5, 1), got {confidence}")
    _check_positive(recover_epochs=recover_epochs if recover else None, recover_lr=recover_lr,
                    recover_max_examples=recover_max_examples, eval_max_examples=eval_max_examples,
                    search_step=search_step)
    if search_step is not None and max_accuracy_drop is None:
        raise CahpError("--search-step sets the accuracy budget's ladder; give --max-accuracy-drop too")
    _check_ladder(ladder, mac_step, search_step, max_accuracy_drop)
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    check_run_dir(out, force)
    config = load_config(model)
    from cahp_deploy.serving_length import check_max_length

    check_max_length(max_length, config)
    num_labels = int(config.num_labels)
    if ffn_keep_ratio is not None or ffn_neurons is not None:  # checked now, not after hours of search
        from cahp_deploy import arch
        from cahp_deploy.selection.neurons import resolve_neuron_budget

        layers = arch.num_layers(config)
        resolve_neuron_budget(layers * arch.intermediate_size(config), layers, ffn_neurons, ffn_keep_ratio,
                              bool((select_options or {}).get("allow_empty_layers")))
    columns = dict(text_column=text_column, text_pair_column=text_pair_column, label_column=label_column)
    select_data = load_labelled(data, select_split, **columns)
    check_labels(select_data, num_labels, min_classes=2)
    eval_data = load_labelled(data, eval_split, **columns)
    check_labels(eval_data, num_labels, min_classes=1)
    confirm_data = load_labelled(data, confirm_split, **columns) if confirm_split is not None else None
    if confirm_data is not None:
        check_labels(confirm_data, num_labels, min_classes=1)
    from cahp_deploy.run import promise

    eval_rows = eval_data.head(eval_max_examples)
    confidence = DEFAULT_CONFIDENCE if confidence is None else float(confidence)
    power = None
    if max_accuracy_drop is not None:
        fraction = promise.default_confirm_fraction(confidence) if confirm_fraction is None else confirm_fraction
        decision, confirmation, how = promise.split_eval(eval_rows, confirm_data, fraction, seed)
        power = promise.power(len(decision), len(confirmation), max_accuracy_drop, confidence, confirm_data is not None)
    else:  # nothing is decided on the evaluation rows: measure there (and on --confirm-split if given)
        decision, confirmation = eval_rows, confirm_data if confirm_data is not None else eval_rows
        how = f"split {confirm_split!r}" if confirm_data is not None else "the evaluation rows"
    lengths = _serving_length(model, config, [select_data, eval_rows, confirm_data], max_length)
    distill = _distill_rows(distill_data, distill_split, distill_max_examples, max_accuracy_drop, columns,
                            [eval_rows, confirm_data], seed)
    if quantize == "int8":  # export's INT8 gate options, checked now rather than after select and recovery
        from cahp_deploy.export.parity import MAX_DATA_EXAMPLES
        from cahp_deploy.export.stage import resolve_int8_gate

        # under a budget INT8 is gated on the second half of the selection split (never a decision row)
        n_gate = min(len(select_data) // 2 if max_accuracy_drop is not None else len(decision), MAX_DATA_EXAMPLES)
        if max_accuracy_drop is not None and int8_max_accuracy_drop is None and int8_min_agreement is None:
            int8_max_accuracy_drop = _joint_int8_gate(max_accuracy_drop, n_gate, confidence)
        resolve_int8_gate(int8_max_accuracy_drop, int8_min_agreement, n_gate, confidence, n_gate)
    if recover and recover_split != select_split:
        check_labels(load_labelled(data, recover_split, **columns), num_labels, min_classes=2)
    check_provider(provider)

    serve = lengths["max_length"]
    method_options = _prune_none(dict(degree=degree, pool_size=pool_size, space=space)) | {"max_length": serve} \
        | (select_options or {})
    select_kwargs = _prune_none(dict(
        method=method, split=select_split, seed=seed, heads=heads, keep_ratio=keep_ratio,
        max_examples=max_examples, ffn_method=ffn_method, ffn_keep_ratio=ffn_keep_ratio, ffn_neurons=ffn_neurons,
        **columns,
    )) | ({"options": method_options} if method_options else {})
    reconstruct_kwargs = None if not reconstruct else _prune_none(dict(max_examples=reconstruct_rows))
    recover_kwargs = None if not recover else _prune_none(dict(
        epochs=recover_epochs, lr=recover_lr, max_examples=recover_max_examples,
        distill_from=model if distill else None, max_length=serve,
    )) | ({"qat": True} if (quantize == "int8" if qat is None else qat) else {}) | (recover_options or {})
    export_kwargs = _prune_none(dict(
        optimize=True, quantize=quantize, per_channel=per_channel, int8_min_agreement=int8_min_agreement,
        int8_max_accuracy_drop=int8_max_accuracy_drop, confidence=confidence, fp16=fp16, opset=opset,
        provider="cpu" if provider == "cpu" else "cuda", measure=timing, max_length=serve,
    )) | (_export_rows(max_accuracy_drop, select_split, eval_split, eval_max_examples)) | (export_options or {})
    bench_kwargs = _prune_none(dict(
        provider=provider, batches=batch or DEFAULT_BATCHES, seqs=seq or DEFAULT_SEQS,
        variants=list(variants) if variants else _default_variants(quantize),
        min_seconds=min_seconds, min_reps=min_reps, warmup=warmup, traffic=traffic, threads=threads,
        max_examples=eval_max_examples, seed=seed,
    )) | (bench_options or {})

    # Everything above ran on every rank, so bad input failed on each alike before any rank joined; the
    # barrier keeps rank 0 from creating OUT before every rank has checked it (a group made earlier in
    # the same process joins no rendezvous).
    if distributed.init_from_env():
        distributed.barrier()
        if not distributed.is_main():
            distributed.serve()  # select's and recover's collectives, as rank 0 calls them; writes nothing
            return None
    existed = out.exists()
    record = None
    try:
        record = RunRecord(out, force, say=console.print)
        plan = _Plan(
            select_data=select_data, eval_data=eval_data, columns=columns, select_kwargs=select_kwargs,
            recover_split=recover_split, recover_kwargs=recover_kwargs, max_accuracy_drop=max_accuracy_drop,
            eval_max_examples=eval_max_examples, export_kwargs=export_kwargs, bench_kwargs=bench_kwargs,
            decision=decision, confirmation=confirmation, confirm_how=how, confidence=confidence,
            ffn_keep_ratio=ffn_keep_ratio, ffn_method=ffn_method or "cahp", search_step=search_step,
            ladder=ladder, mac_step=mac_step, distill=distill, lengths=lengths, power=power, reconstruct_kwargs=reconstruct_kwargs,
        )
        with distributed.leading():
            result = _run_stages(record, model, data, out, plan)
    except BaseException:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # failed before the first stage finished: leave no empty dir behind
        elif record is not None and out.is_dir() and not record.path.is_file():
            record.save()  # work left behind (a failed search's recovered candidates): a rerun resumes there
        raise
    return result


def _joint_int8_gate(max_drop: float, rows: int, confidence: float) -> float | None:
    """Export's INT8 gate under an accuracy budget: the budget itself, when the rows can bound it.

    One budget for the whole artifact: whatever INT8 costs is judged against dense at P when the
    shipped artifact is chosen (:func:`cahp_deploy.run.promise.ship`), so export need not hold INT8 to
    its own 0.5 points as well. Measured: the dense SST-5 model's all-INT8 graph missed that 0.5 by
    0.03 points on the 1,101 decision rows (upper bound 0.53), so a budget-1 run kept a third of its
    MACs in fp32 (1.26x instead of ~2x). None (export's default gate) when the rows are too few.
    """
    from cahp_deploy.export.int8.gate import Int8Gate

    if max_drop <= 0 or rows < Int8Gate.accuracy(max_drop, confidence, rows).rows_needed():
        return None
    return float(max_drop)


def _check_positive(**values: float | None) -> None:
    """Numeric options a later stage would reject: rejected now, before hours of earlier stages."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise CahpError(f"--{name.replace('_', '-')} must be positive, got {value}")


def _check_budget_options(max_drop: float | None, method: str, heads: int | None, keep_ratio: float | None) -> None:
    if max_drop is None:
        return
    if method != "cahp":
        raise CahpError(f"--max-accuracy-drop searches CAHP's cluster sweep; it does not apply to --method {method}")
    if heads is not None or keep_ratio is not None:
        raise CahpError("--max-accuracy-drop chooses the number of heads itself; drop --heads / --keep-ratio")
    if not 0.0 <= float(max_drop) <= 100.0:
        raise CahpError(f"--max-accuracy-drop is in accuracy points and must be in [0, 100], got {max_drop}")


@dataclass
class _Plan:
    """What each stage will be asked to do, decided (and checked) before the first one runs."""

    select_data: Any
    eval_data: Any
    columns: dict[str, Any]
    select_kwargs: dict[str, Any]
    recover_split: str
    recover_kwargs: dict[str, Any] | None  # None: --no-recover
    max_accuracy_drop: float | None
    eval_max_examples: int | None
    export_kwargs: dict[str, Any]
    bench_kwargs: dict[str, Any]
    decision: Any = None  # rows the budget decisions are made on
    confirmation: Any = None  # rows no decision saw: the shipped artifact is confirmed there
    confirm_how: str = ""
    confidence: float = DEFAULT_CONFIDENCE
    ffn_keep_ratio: float | None = None
    ffn_method: str = "cahp"
    search_step: int | None = None
    ladder: str = "heads"
    mac_step: float | None = None
    distill: dict[str, Any] | None = None  # _distill_rows: training and judge text, their record
    lengths: dict[str, Any] | None = None  # the one max length (serving_length.resolve_max_length)
    power: dict[str, Any] | None = None  # what the decision and confirmation rows can show (promise.power)
    reconstruct_kwargs: dict[str, Any] | None = None  # None: --no-reconstruct

    @property
    def max_length(self) -> int:
        return int(self.lengths["max_length"])


def _export_rows(max_drop: float | None, select_split: str, eval_split: str, eval_max_examples: int | None) -> dict:
    """Which rows export's parity checks and INT8 gate read.

    Under a budget: the selection split (INT8 tunes on its first half and is gated on its second), so
    the gate's looks never touch the decision rows (the shipping sequence alone judges INT8 there, once)
    nor the confirmation rows. Otherwise: the evaluation split, where nothing else is decided.
    """
    if max_drop is not None:
        return {"split": select_split, "int8_tuning_split": select_split}
    return _prune_none({"split": eval_split, "max_examples": eval_max_examples})


def _serving_length(model: str, config, datasets: list, asked: int | None) -> dict[str, Any]:
    """The run's one max length (:mod:`cahp_deploy.serving_length`), from the rows of every split it reads."""
    from transformers import AutoTokenizer

    from cahp_deploy.serving_length import resolve_max_length

    tokenizer = AutoTokenizer.from_pretrained(model)
    return resolve_max_length(tokenizer, config, [d for d in datasets if d is not None], asked)


def _select_prune_recover(record: RunRecord, model: str, data: str, out: Path, plan: _Plan, model_hash: str):
    """The plain path: one selection, pruned, then recovered unless --no-recover. Returns (model dir, stage)."""
    from cahp_deploy import distributed, pruning, recovery
    from cahp_deploy.methods import stage as select_stage

    select_in = {"model_sha256": model_hash, "data": plan.select_data.file_hashes, "options": plan.select_kwargs}
    selection = out / SELECTION_FILE
    record.stage(
        "select", select_in, selection,
        lambda overwrite: distributed.collective(select_stage.select, model, data, selection, force=overwrite,
                                                 **plan.select_kwargs),
    )
    pruned = out / PRUNED_DIR
    record.stage(
        "prune",
        {"model_sha256": model_hash, "selection_sha256": record.output_hash("select")},
        pruned,
        lambda overwrite: pruning.prune(model, selection, pruned, force=overwrite),
    )
    last, last_stage = pruned, "prune"
    if plan.reconstruct_kwargs is None:
        record.stages.pop("refit", None)
    else:
        from cahp_deploy.recovery.refit import refit

        refitted = out / REFIT_DIR
        record.stage(
            "refit",
            {"pruned_sha256": record.output_hash("prune"), "model_sha256": model_hash,
             "data": plan.select_data.file_hashes, "split": plan.select_data.split, "options": plan.reconstruct_kwargs,
             "max_length": plan.max_length, "seed": plan.select_kwargs.get("seed", 42)},
            refitted,
            lambda overwrite: refit(pruned, model, plan.select_data, refitted, max_length=plan.max_length,
                                    seed=plan.select_kwargs.get("seed", 42), force=overwrite, **plan.reconstruct_kwargs),
        )
        last, last_stage = refitted, "refit"
    if plan.recover_kwargs is None:
        record.stages.pop("recover", None)
        return last, last_stage
    recovered = out / RECOVERED_DIR
    recover_data = load_split_hashes(data, plan.recover_split, plan.select_data, plan.columns)
    source = last
    record.stage(
        "recover",
        {
            "pruned_sha256": record.output_hash(last_stage), "data": recover_data, "split": plan.recover_split,
            "options": plan.recover_kwargs, "eval": _eval_inputs(plan),
            "teacher_sha256": model_hash if plan.recover_kwargs.get("distill_from") else None,
        },
        recovered,
        lambda overwrite: distributed.collective(
            recovery.recover, source, data, recovered, split=plan.recover_split, eval_split=plan.eval_data.split,
            eval_max_examples=plan.eval_max_examples, seed=plan.select_kwargs.get("seed", 42),
            force=overwrite, **plan.columns, **plan.recover_kwargs,
        ),
    )
    return recovered, "recover"


def _exporter(record: RunRecord, name: str, source: Path, art: Path, options: dict[str, Any], budget: bool):
    """The export stage's work. Under a budget, an INT8 graph that fails its gate does not end the run: the
    artifact is written without it (fp32 variants only), run.json says why, and the shipping sequence
    chooses among the variants that exist."""
    from cahp_deploy import export as export_stage
    from cahp_deploy.errors import Int8GateError

    def work(overwrite: bool):
        record.data.setdefault("int8_gate_failed", {}).pop(name, None)
        try:
            return export_stage.export(source, art, force=overwrite, **options)
        except Int8GateError as e:
            if not budget:
                raise
            record.data["int8_gate_failed"][name] = str(e)
            record.say(f"{name}: {e}; under the accuracy budget this artifact is exported without INT8 and the "
                       "shipping sequence chooses among the variants that exist")
            fp32_only = {k: v for k, v in options.items() if not k.startswith("int8_") and k != "per_channel"}
            return export_stage.export(source, art, force=overwrite, **{**fp32_only, "quantize": None})

    return work


def _search(record: RunRecord, model: str, data: str, out: Path, plan: _Plan, model_hash: str):
    """The accuracy-budget path: the search stage; returns its chosen model dir."""
    from cahp_deploy.run import accuracy_budget

    options = dict(plan.select_kwargs.get("options") or {})
    settings = accuracy_budget.SearchSettings(
        model=model, data=data, model_sha256=model_hash,
        select_data=plan.select_data.head(plan.select_kwargs.get("max_examples")),
        eval_data=plan.decision,
        recover_split=plan.recover_split, columns=plan.columns, seed=int(plan.select_kwargs.get("seed", 42)),
        cahp_options=options, recover=plan.recover_kwargs, eval_max_examples=plan.eval_max_examples,
        max_drop=float(plan.max_accuracy_drop), say=record.say, confidence=ErrorRates(plan.confidence).search,
        ffn_keep_ratio=plan.ffn_keep_ratio, ffn_method=plan.ffn_method,
        search_step=plan.search_step, max_length=plan.max_length, reconstruct=plan.reconstruct_kwargs,
        ladder=plan.ladder, **({} if plan.mac_step is None else {"mac_step": plan.mac_step}),
        **({} if plan.distill is None else {"distill_rows": plan.distill["rows"], "distill_judge": plan.distill["judge"],
                                            "distill_params": {}}),
    )
    search_dir = out / SEARCH_DIR
    record.stage(
        "search",
        {
            "model_sha256": model_hash, "select": {"data": plan.select_data.file_hashes, **plan.select_kwargs},
            "recover": plan.recover_kwargs, "recover_split": plan.recover_split,
            "recover_data": load_split_hashes(data, plan.recover_split, plan.select_data, plan.columns)
            if plan.recover_kwargs is not None else None,
            "eval": _eval_inputs(plan), "max_accuracy_drop": plan.max_accuracy_drop,
            "decision_rows": _rows_key(plan.decision), "confidence": ErrorRates(plan.confidence).search,
            "ffn_keep_ratio": plan.ffn_keep_ratio, "search_step": plan.search_step, "max_length": plan.max_length,
            "ladder": plan.ladder, "mac_step": plan.mac_step,
            "distill": None if plan.distill is None else plan.distill["record"],
            "reconstruct": plan.reconstruct_kwargs,
            "rule": accuracy_budget.RULES_VERSION,
        },
        search_dir,
        lambda overwrite: accuracy_budget.search(settings, search_dir),
    )
    return accuracy_budget.chosen_model(search_dir)


def _record_budget(record: RunRecord, plan: _Plan) -> None:
    """Note the budget asked of these decision rows: every new budget on the same rows is one more look."""
    asked = record.data.setdefault("budgets_asked", [])
    entry = {"max_drop_points": float(plan.max_accuracy_drop), "decision_rows_sha256": _rows_key(plan.decision)}
    if entry not in asked:
        asked.append(entry)


def budgets_on(record: dict[str, Any]) -> list[float]:
    """The budgets asked of the decision rows of the latest budget run in this OUT, in order."""
    asked = record.get("budgets_asked") or []
    if not asked:
        return []
    rows = asked[-1]["decision_rows_sha256"]
    return [a["max_drop_points"] for a in asked if a["decision_rows_sha256"] == rows]


def _rows_key(data) -> str:
    from cahp_deploy.run.promise import rows_fingerprint

    return rows_fingerprint(data)


def _confirm(record: RunRecord, out: Path, plan: _Plan, dense_art: Path, pruned_art: Path, report_dir: Path) -> None:
    """The confirm stage: choose the shipped variant by measured speed within the budget, confirm it on
    rows no decision saw, write OUT/confirm.json: the one record of the choice (no artifact is rewritten,
    so every hash recorded for export and bench stays true)."""
    from cahp_deploy.run import promise

    confirm_file = out / promise.CONFIRM_FILE
    inputs = {
        "bench_sha256": record.output_hash("bench"),
        "export_pruned_inputs_sha256": record.stages["export-pruned"]["inputs_sha256"],
        "dense_sha256": record.output_hash("export-dense"),
        "decision_rows": _rows_key(plan.decision), "confirmation_rows": _rows_key(plan.confirmation),
        "max_accuracy_drop": plan.max_accuracy_drop, "confidence": plan.confidence,
        "threads": plan.bench_kwargs.get("threads"), "max_length": plan.max_length,
        "error_rates": ErrorRates(plan.confidence).to_dict(),
    }
    record.stage(
        "confirm", inputs, confirm_file,
        lambda overwrite: promise.confirm(dense_art, pruned_art, report_dir, plan.decision, plan.confirmation,
                                          plan.confirm_how, plan.max_accuracy_drop, confirm_file,
                                          confidence=plan.confidence, threads=plan.bench_kwargs.get("threads"),
                                          max_length=plan.max_length),
    )


def load_split_hashes(data: str, split: str, already, columns: dict[str, Any]) -> dict[str, str]:
    """File hashes of ``data[split]`` (reusing ``already`` when it is that split)."""
    from cahp_deploy.data import load_labelled

    return already.file_hashes if already.split == split else load_labelled(data, split, **columns).file_hashes


def _eval_inputs(plan: _Plan) -> dict[str, Any]:
    return {"data": plan.eval_data.file_hashes, "split": plan.eval_data.split,
            "max_examples": plan.eval_max_examples, **plan.columns}


def _run_stages(record: RunRecord, model: str, data: str, out: Path, plan: _Plan) -> dict[str, Any]:
    from cahp_deploy import bench as bench_stage
    from cahp_deploy import distributed
    from cahp_deploy import export as export_stage

    model_hash = model_sha256(model)
    record.data.update(
        model=model, model_sha256=model_hash, data=data, method=plan.select_kwargs.get("method", "cahp"),
        select_split=plan.select_data.split, eval_split=plan.eval_data.split,
        recover_split=None if plan.recover_kwargs is None else plan.recover_split,
        max_length=plan.lengths,
    )
    from cahp_deploy.serving_length import words as length_words

    record.say(length_words(plan.lengths))
    if plan.max_accuracy_drop is not None:
        from cahp_deploy.run.promise import power_words

        record.data["power"] = plan.power
        record.say(power_words(plan.power))  # before any recovery: what these rows can show at all
        _record_budget(record, plan)
    else:
        record.data.pop("power", None)
    eval_in = {"data": plan.eval_data.file_hashes, "split": plan.eval_data.split, **plan.columns}
    export_split = plan.export_kwargs["split"]
    export_in = {"data": plan.select_data.file_hashes if export_split == plan.select_data.split
                 else plan.eval_data.file_hashes, "split": export_split, **plan.columns}

    if plan.max_accuracy_drop is None:
        record.stages.pop("search", None)  # a path taken by an earlier run of this OUT, not this one
        final_model, _ = _select_prune_recover(record, model, data, out, plan, model_hash)
    else:
        for name in ("select", "prune", "refit", "recover"):
            record.stages.pop(name, None)
        final_model = _search(record, model, data, out, plan, model_hash)
    distributed.release()  # launched: the other ranks' part (select's evidence, recovery) is over
    final_sha = sha256_dir(final_model)
    record.data["final_model"] = str(final_model.relative_to(out))

    export_common = dict(data=data, **plan.columns, **plan.export_kwargs)
    dense_art, pruned_art = out / DENSE_ARTIFACT, out / PRUNED_ARTIFACT
    for name, source, sha, art in (("export-dense", model, model_hash, dense_art),
                                   ("export-pruned", final_model, final_sha, pruned_art)):
        record.stage(name, {"model_sha256": sha, "options": plan.export_kwargs, "eval": export_in}, art,
                     _exporter(record, name, source, art, export_common, plan.max_accuracy_drop is not None))
    bench_kwargs = plan.bench_kwargs
    if any(not (a / "model_int8.onnx").is_file() for a in (dense_art, pruned_art)) and \
            plan.export_kwargs.get("quantize") == "int8":
        bench_kwargs = {**bench_kwargs, "variants": None}  # time what each artifact has (dense INT8 included)

    report_dir = out / REPORT_DIR
    record.stage(
        "bench",
        {
            "dense_sha256": record.output_hash("export-dense"),
            "pruned_sha256": record.output_hash("export-pruned"),
            "options": bench_kwargs,
            "eval": eval_in,
        },
        report_dir,
        lambda overwrite: bench_stage.bench(
            [pruned_art], dense_art, report_dir, data=data, split=plan.eval_data.split,
            force=overwrite, **plan.columns, **bench_kwargs,
        ),
    )

    if plan.decision is not None:
        _confirm(record, out, plan, dense_art, pruned_art, report_dir)
    summary = summarize(out, record.data)
    record.data["summary"] = summary
    text = run_summary.markdown(summary)
    summary_md = out / SUMMARY_FILE
    if not summary_md.is_file() or summary_md.read_text() != text:  # a rerun that changed nothing touches nothing
        with atomic_file(summary_md, force=True) as tmp:
            tmp.write_text(text)
    record.save()
    return {"out": str(out), "report": str(report_dir / "report.md"), "summary_md": str(out / SUMMARY_FILE),
            "run": record.data, "summary": summary}


# --------------------------------------------------------------------------------------------------
# The summary: dense vs pruned, read back from the files the stages wrote.


def _read(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def _recovery_summary(final_model: Path) -> dict[str, Any] | None:
    """What recovered the exported model: the refit (refit.json), the fine-tune (recovery.json), or both."""
    refit_path, path = final_model / "refit.json", final_model / "recovery.json"
    refit = None
    if refit_path.is_file():
        r = _read(refit_path)
        refit = {"rows": (r.get("calibration") or {}).get("num_examples"),
                 "split": (r.get("calibration") or {}).get("split"), "seconds": r.get("total_seconds")}
    if not path.is_file():
        return None if refit is None else {"accuracy_before": None, "accuracy_after": None, "epochs": None,
                                           "refit": refit}
    r = _read(path)
    return {
        "accuracy_before": r.get("accuracy_before"), "accuracy_after": r.get("accuracy_after"),
        "epochs": (r.get("params") or {}).get("epochs"), "train": r.get("train"), "eval": r.get("eval"),
        "distilled": r.get("distill_from") is not None, "seconds": r.get("total_seconds"), "refit": refit,
    }


def _search_summary(out: Path) -> dict[str, Any] | None:
    path = out / SEARCH_DIR / "search.json"
    if not path.is_file():
        return None
    r = _read(path)
    keys = ("dense_accuracy", "max_drop_points", "threshold", "chosen_k", "candidates_k", "tried", "seconds", "knee",
            "confidence", "ffn_keep_ratio", "stopped_at", "ladder", "ladder_rungs")
    return {k: r.get(k) for k in keys} | {"plot": f"{SEARCH_DIR}/tradeoff.png"}


def summarize(out: str | os.PathLike, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Dense vs pruned per variant, from report.json: heads, params, size, p50 per grid cell, accuracy;
    plus, from ``record`` (run.json), the splits, the recovery and the budget search."""
    out = Path(out)
    record = record if record is not None else (_read(out / RUN_FILE) if (out / RUN_FILE).is_file() else {})
    report = _read(out / REPORT_DIR / "report.json")
    grid = [c for c in report.get("cells", []) if c.get("mode") == "grid"]
    shapes = sorted({(c["batch"], c["seq"]) for c in grid})
    rows = []
    for a in report.get("artifacts", []):
        for variant, info in a.get("variants", {}).items():
            cells = {
                f"{c['batch']}x{c['seq']}": c for c in grid if c["artifact"] == a["name"] and c["variant"] == variant
            }
            rows.append({
                "artifact": a["name"],
                "baseline": bool(a.get("baseline")),
                "variant": variant,
                "heads_kept": a.get("num_heads_kept"),
                "heads_total": a.get("num_heads_total"),
                "neurons_kept": a.get("num_neurons_kept"),
                "neurons_total": a.get("num_neurons_total"),
                "params": a.get("params"),
                "bytes": info.get("size_bytes"),
                "p50_ms": {k: c.get("p50_ms") for k, c in cells.items()},
                "speedup_same_variant": {k: c.get("speedup_vs_baseline_same_variant") for k, c in cells.items()},
                "speedup_vs_dense_fp32": {k: c.get("speedup_vs_baseline_fp32") for k, c in cells.items()},
                "flop_ceiling_speedup": a.get("flop_ceiling_speedup"),
                "accuracy": info.get("accuracy"),
                "accuracy_change": info.get("accuracy_change_vs_baseline_fp32"),
            })
    data = (report.get("settings") or {}).get("data") or {}
    final = record.get("final_model")
    searched = "search" in record.get("stages", {})
    return {
        "model": record.get("model"),
        "method": record.get("method"),
        "shapes": [f"{b}x{q}" for b, q in shapes],
        "eval_split": data.get("split"),
        "eval_examples": data.get("num_examples"),
        "select_split": record.get("select_split"),
        "recover_split": record.get("recover_split"),
        "final_model": final,
        "recovery": _recovery_summary(out / final) if final else None,
        "search": _search_summary(out) if searched else None,
        "confirm": _read(out / "confirm.json") if "confirm" in record.get("stages", {}) and (out / "confirm.json").is_file() else None,
        "max_length": record.get("max_length"),
        "power": record.get("power") if searched else None,
        "budgets_asked": budgets_on(record) if searched else [],
        "int8_gate_failed": sorted(record.get("int8_gate_failed") or {}),
        "rows": rows,
    }


def print_result(result: dict[str, Any], console=None) -> None:
    """What `run` and `demo` print: the answer in words, the table, where the reports are."""
    from cahp_deploy.run.summary import headline

    console = console or summary_console()
    for line in headline(result["summary"]):
        console.print(line, highlight=False)
    print_summary(result["summary"], console)
    console.print(f"summary: {result['summary_md']}", highlight=False)
    console.print(f"report: {result['report']}", highlight=False)


def summary_console():
    """stdout; when it is not a terminal (a log, a pipe) wide enough that no column is cut."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=120)


def print_summary(summary: dict[str, Any], console) -> None:
    """The dense-vs-pruned table a user reads first (report.md has every number).

    Kept narrow enough for an 80-column terminal: short headers, the definitions in the caption.
    """
    from rich import box
    from rich.table import Table

    def num(x, fmt, suffix=""):
        return "-" if x is None else format(x, fmt) + suffix

    shapes = summary["shapes"]
    speed_shape = shapes[-1] if shapes else None
    split = summary.get("eval_split")
    caption = ["ms BxS: median ms per batch at batch x seq",
               f"speedup: vs dense, same variant, at {speed_shape}"]
    if split:
        caption.append(f"acc: on {split} ({summary.get('eval_examples')} examples)")
        caption.append("Δ acc: points vs dense fp32")
    table = Table(title="dense vs pruned", caption="\n".join(caption), box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True, show_edge=False)
    for col in ("model", "variant"):
        table.add_column(col, no_wrap=True)
    for col in ("heads", "params", "MB", *(f"ms {s}" for s in shapes), "speedup", "acc", "Δ acc"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in summary["rows"]:
        total = r["heads_total"]
        kept = r["heads_kept"] if r["heads_kept"] is not None else total
        speed = r["speedup_same_variant"].get(speed_shape) if speed_shape else None
        table.add_row(
            r["artifact"], r["variant"],
            "-" if total is None else f"{kept}/{total}",
            num(None if r["params"] is None else r["params"] / 1e6, ".1f", "M"),
            num(None if r["bytes"] is None else r["bytes"] / 2**20, ".1f"),
            *(num(r["p50_ms"].get(s), ".1f") for s in shapes),
            num(speed, ".2f", "x"),
            num(None if r["accuracy"] is None else 100 * r["accuracy"], ".1f", "%"),
            num(None if r["accuracy_change"] is None else 100 * r["accuracy_change"], "+.1f"),
        )
    console.print(table)


__all__ = ["RUN_FILE", "RunRecord", "check_run_dir", "print_result", "print_summary", "run", "summarize",
           "summary_console"]
