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

Stages are run through :meth:`cahp_deploy.run.record.RunRecord.stage`, each one call with its own inputs and
output; :func:`run` checks every option and split first (:mod:`cahp_deploy.run.plan`), then runs them in
the order :func:`_run_stages` lists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cahp_deploy.atomic import atomic_file
from cahp_deploy.hashing import sha256_dir
from cahp_deploy.run import summary as run_summary
from cahp_deploy.run.config import RunConfig
from cahp_deploy.run.plan import Plan, make_plan
from cahp_deploy.run.promise import ErrorRates
from cahp_deploy.run.record import (
    DENSE_ARTIFACT, PRUNED_ARTIFACT, PRUNED_DIR, RECOVERED_DIR, REFIT_DIR, REPORT_DIR, SEARCH_DIR, SELECTION_FILE,
    SUMMARY_FILE, RunRecord, check_run_dir, model_sha256,
)
from cahp_deploy.run.summarize import summarize

def run(
    model: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: RunConfig | None = None,
    *,
    force: bool = False,
    console=None,
    **options: Any,
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

    The options are a :class:`~cahp_deploy.run.config.RunConfig` (``config``), or ``run``'s flags as
    keywords (``max_accuracy_drop=1``, ``recover_epochs=2``, ...: the names and defaults of the CLI);
    ``select_options`` / ``recover_options`` / ``export_options`` / ``bench_options`` pass further
    keyword arguments to those stages verbatim.

    Returns ``{"out", "report", "summary_md", "run", "summary"}``: the run record (run.json's
    contents) and the dense-vs-pruned summary that is also printed.

    Everything the user can get wrong (paths, splits, columns, labels, provider, an ``out`` that is
    not a run dir) is checked before any stage starts; nothing is written then.

    Launched as several ranks (``torchrun ... cahp-deploy run``), select's evidence and recovery (each
    budget-search candidate's too) run data-parallel on every rank; rank 0 alone decides, prunes,
    exports, benchmarks and writes (:func:`cahp_deploy.distributed.collective`). The other ranks write
    nothing, are let go once no data-parallel stage is left, and return None.
    """
    if config is None:
        config = RunConfig.from_options(**options)
    elif options:
        raise TypeError("run() takes a RunConfig or keyword options, not both")
    from cahp_deploy import distributed

    model, data, out = str(model), str(data), Path(out)
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    check_run_dir(out, force)
    plan = make_plan(model, data, config)

    # Everything above ran on every rank, so bad input failed on each alike before any rank joined; the
    # barrier keeps rank 0 from creating OUT before every rank has checked it (a group made earlier in
    # the same process joins no rendezvous).
    if distributed.init_from_env():
        distributed.barrier()
        if not distributed.is_main():
            distributed.serve()  # select's and recover's collectives, as rank 0 calls them; writes nothing
            return None
    return _run_in(out, force, console, model, data, plan)


def _run_in(out: Path, force: bool, console, model: str, data: str, plan: Plan) -> dict[str, Any]:
    """The stages into ``out``; a failure before the first stage finished leaves no empty dir behind."""
    from cahp_deploy import distributed

    existed = out.exists()
    record = None
    try:
        record = RunRecord(out, force, say=console.print)
        with distributed.leading():
            result = _run_stages(record, model, data, out, plan)
    except BaseException:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # failed before the first stage finished: leave no empty dir behind
        elif record is not None and out.is_dir() and not record.path.is_file():
            record.save()  # work left behind (a failed search's recovered candidates): a rerun resumes there
        raise
    return result


def _run_stages(record: RunRecord, model: str, data: str, out: Path, plan: Plan) -> dict[str, Any]:
    """The stages in order: the model's (select, prune, refit, recover; or the budget search), export
    (dense and pruned), bench, confirm (under a budget), then the summary."""
    from cahp_deploy import distributed

    model_hash = _note_run(record, model, data, plan)
    if plan.max_accuracy_drop is None:
        record.stages.pop("search", None)  # a path taken by an earlier run of this OUT, not this one
        final_model, _ = _select_prune_recover(record, model, data, out, plan, model_hash)
    else:
        for name in ("select", "prune", "refit", "recover"):
            record.stages.pop(name, None)
        final_model = _search(record, model, data, out, plan, model_hash)
    distributed.release()  # launched: the other ranks' part (select's evidence, recovery) is over
    dense_art, pruned_art = _export_both(record, model, model_hash, final_model, data, out, plan)
    report_dir = _bench(record, data, out, plan, dense_art, pruned_art)
    if plan.decision is not None:
        _confirm(record, out, plan, dense_art, pruned_art, report_dir)
    summary = _write_summary(record, out)
    return {"out": str(out), "report": str(report_dir / "report.md"), "summary_md": str(out / SUMMARY_FILE),
            "run": record.data, "summary": summary}


def _note_run(record: RunRecord, model: str, data: str, plan: Plan) -> str:
    """What this run reads, into run.json, and said before any stage: the serving length and, under a
    budget, what the decision rows can show. Returns the model's hash."""
    model_hash = model_sha256(model)
    record.data.update(
        model=model, model_sha256=model_hash, data=data, method=plan.config.select.method,
        select_split=plan.select_data.split, eval_split=plan.eval_data.split,
        recover_split=None if plan.recover_kwargs is None else plan.recover_split,
        max_length=plan.lengths, config=plan.config.record(),
    )
    from cahp_deploy.serving_length import words as length_words

    record.say(length_words(plan.lengths))
    if plan.max_accuracy_drop is not None:
        from cahp_deploy.run.promise import power_words

        record.data["power"] = plan.power
        record.say(power_words(plan.power))  # before any recovery: what these rows can show at all
        warning = plan.distill["record"]["likeness"]["warning"] if plan.distill else None
        record.data["distill_warning"] = warning
        if warning:
            record.say(f"WARNING: {warning}")
        _record_budget(record, plan)
    else:
        record.data.pop("power", None)
    return model_hash


def _select_prune_recover(record: RunRecord, model: str, data: str, out: Path, plan: Plan, model_hash: str):
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
             "max_length": plan.max_length, "seed": plan.seed},
            refitted,
            lambda overwrite: refit(pruned, model, plan.select_data, refitted, max_length=plan.max_length,
                                    seed=plan.seed, force=overwrite, **plan.reconstruct_kwargs),
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
            eval_max_examples=plan.eval_max_examples, seed=plan.seed,
            force=overwrite, **plan.columns, **plan.recover_kwargs,
        ),
    )
    return recovered, "recover"


def _exporter(record: RunRecord, name: str, source: Path, art: Path, options: dict[str, Any]):
    """The export stage's work. Under a budget an INT8 graph that fails its own gate does not end the run:
    export keeps it, marked (``keep_failed_int8``), run.json says why, and the shipping sequence judges it
    against dense on the decision rows like every other graph."""
    from cahp_deploy import export as export_stage

    def work(overwrite: bool):
        record.data.setdefault("int8_gate_failed", {}).pop(name, None)
        written = export_stage.export(source, art, force=overwrite, **options)
        failed = json.loads((written / "manifest.json").read_text())["variants"].get("int8", {}).get("gate_failed")
        if failed:
            record.data["int8_gate_failed"][name] = failed
            record.say(f"{name}: {failed}; kept under the accuracy budget: the shipping sequence judges it against "
                       "dense on the decision rows")
        return written

    return work


def _search(record: RunRecord, model: str, data: str, out: Path, plan: Plan, model_hash: str):
    """The accuracy-budget path: the search stage; returns its chosen model dir."""
    from cahp_deploy.run import accuracy_budget

    budget, select = plan.budget, plan.select_kwargs
    settings = accuracy_budget.SearchSettings(
        model=model, data=data, model_sha256=model_hash,
        select_data=plan.select_data.head(select["max_examples"]),
        eval_data=plan.decision,
        recover_split=plan.recover_split, columns=plan.columns, seed=plan.seed,
        cahp_options=dict(select["options"]), recover=plan.recover_kwargs, eval_max_examples=plan.eval_max_examples,
        max_drop=float(budget.max_accuracy_drop), say=record.say, confidence=ErrorRates(budget.confidence).search,
        ffn_keep_ratio=plan.config.ffn_keep_ratio, ffn_method=plan.config.select.ffn_method or "cahp",
        search_step=budget.search_step, max_length=plan.max_length, reconstruct=plan.reconstruct_kwargs,
        ladder=budget.ladder, **({} if budget.mac_step is None else {"mac_step": budget.mac_step}),
        **({} if plan.distill is None else {"distill_rows": plan.distill["rows"], "distill_judge": plan.distill["judge"],
                                            "distill_params": {}}),
    )
    search_dir = out / SEARCH_DIR
    record.stage(
        "search",
        {
            "model_sha256": model_hash, "select": {"data": plan.select_data.file_hashes, **select},
            "recover": plan.recover_kwargs, "recover_split": plan.recover_split,
            "recover_data": load_split_hashes(data, plan.recover_split, plan.select_data, plan.columns)
            if plan.recover_kwargs is not None else None,
            "eval": _eval_inputs(plan), "max_accuracy_drop": budget.max_accuracy_drop,
            "decision_rows": _rows_key(plan.decision), "confidence": ErrorRates(budget.confidence).search,
            "ffn_keep_ratio": plan.config.ffn_keep_ratio, "search_step": budget.search_step,
            "max_length": plan.max_length, "ladder": budget.ladder, "mac_step": budget.mac_step,
            "distill": None if plan.distill is None else plan.distill["record"],
            "reconstruct": plan.reconstruct_kwargs,
            "rule": accuracy_budget.RULES_VERSION,
        },
        search_dir,
        lambda overwrite: accuracy_budget.search(settings, search_dir),
    )
    return accuracy_budget.chosen_model(search_dir)


def _record_budget(record: RunRecord, plan: Plan) -> None:
    """Note the budget asked of these decision rows: every new budget on the same rows is one more look."""
    asked = record.data.setdefault("budgets_asked", [])
    entry = {"max_drop_points": float(plan.max_accuracy_drop), "decision_rows_sha256": _rows_key(plan.decision)}
    if entry not in asked:
        asked.append(entry)


def _rows_key(data) -> str:
    from cahp_deploy.run.promise import rows_fingerprint

    return rows_fingerprint(data)


def _confirm(record: RunRecord, out: Path, plan: Plan, dense_art: Path, pruned_art: Path, report_dir: Path) -> None:
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


def _eval_inputs(plan: Plan) -> dict[str, Any]:
    return {"data": plan.eval_data.file_hashes, "split": plan.eval_data.split,
            "max_examples": plan.eval_max_examples, **plan.columns}



def _export_both(record: RunRecord, model: str, model_hash: str, final_model: Path, data: str, out: Path,
                 plan: Plan) -> tuple[Path, Path]:
    """The export stages: dense and the final pruned model, the same options. Returns their artifact dirs."""
    final_sha = sha256_dir(final_model)
    record.data["final_model"] = str(final_model.relative_to(out))
    export_split = plan.export_kwargs["split"]
    export_in = {"data": plan.select_data.file_hashes if export_split == plan.select_data.split
                 else plan.eval_data.file_hashes, "split": export_split, **plan.columns}
    export_common = dict(data=data, **plan.columns, **plan.export_kwargs)
    dense_art, pruned_art = out / DENSE_ARTIFACT, out / PRUNED_ARTIFACT
    for name, source, sha, art in (("export-dense", model, model_hash, dense_art),
                                   ("export-pruned", final_model, final_sha, pruned_art)):
        record.stage(name, {"model_sha256": sha, "options": plan.export_kwargs, "eval": export_in}, art,
                     _exporter(record, name, source, art, export_common))
    return dense_art, pruned_art


def _bench(record: RunRecord, data: str, out: Path, plan: Plan, dense_art: Path, pruned_art: Path) -> Path:
    """The bench stage: dense vs pruned on the evaluation split. Returns the report dir."""
    from cahp_deploy import bench as bench_stage
    from cahp_deploy.export import variant_path

    eval_in = {"data": plan.eval_data.file_hashes, "split": plan.eval_data.split, **plan.columns}
    bench_kwargs = plan.bench_kwargs
    if bench_kwargs.get("variants") and any(not variant_path(a, "int8").is_file() for a in (dense_art, pruned_art)):
        bench_kwargs = {**bench_kwargs, "variants": None}  # an INT8 gate failed: time what each artifact has

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
    return report_dir


def _write_summary(record: RunRecord, out: Path) -> dict[str, Any]:
    """OUT/summary.md and run.json's summary, from the files the stages wrote."""
    summary = summarize(out, record.data)
    record.data["summary"] = summary
    text = run_summary.markdown(summary)
    summary_md = out / SUMMARY_FILE
    if not summary_md.is_file() or summary_md.read_text() != text:  # a rerun that changed nothing touches nothing
        with atomic_file(summary_md, force=True) as tmp:
            tmp.write_text(text)
    record.save()
    return summary


__all__ = ["run"]
