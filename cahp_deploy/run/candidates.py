"""One candidate of the accuracy-budget search: its cut (CAHP's at k, or a progressive rung's sets), pruned,
recovered (refit, distillation, fine-tune: each when asked, never at the dense rung) and measured on the
decision rows, in ``OUT/search/kNNN/`` (``mNNN/`` for a progressive rung).

A candidate done is read back from its ``candidate.json`` while its key (every input that could change
it, :meth:`cahp_deploy.run.accuracy_budget.SearchSettings.candidate_key`) is unchanged, so an
interrupted search resumes where it stopped. The search itself, its settings and search.json:
:mod:`cahp_deploy.run.accuracy_budget`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cahp_deploy import distributed
from cahp_deploy.atomic import atomic_dir
from cahp_deploy.errors import CahpError
from cahp_deploy.paired import paired_drop
from cahp_deploy.run.budget_search import CandidateResult
from cahp_deploy.run.promise import bits, from_bits

if TYPE_CHECKING:
    from cahp_deploy.run.accuracy_budget import SearchSettings

CANDIDATE_FILE = "candidate.json"
MODEL_DIR = "model"


def _predict(model_dir: Path, eval_data, max_length: int) -> np.ndarray:
    """Per-row predicted label of a model dir (PyTorch) on ``eval_data``, rows cut at ``max_length``."""
    from cahp_deploy import evaluation
    from cahp_deploy.modeling import load_classifier

    net, tokenizer = load_classifier(model_dir, attn_implementation=None)
    return evaluation.logits(net, tokenizer, eval_data, max_length=max_length).argmax(axis=1)


def _measured(record: dict[str, Any], when: str, pred: np.ndarray, eval_data, dense_pred: np.ndarray | None) -> None:
    """Record accuracy, per-row correctness and agreement with dense (same label) of predictions ``pred``."""
    good = pred == np.asarray(eval_data.labels)
    record[f"accuracy_{when}"] = float(good.mean())
    record[f"correct_{when}"] = bits(good)
    if dense_pred is not None:
        record[f"agreement_{when}"] = float((pred == dense_pred).mean())


def with_neurons(selection, settings: SearchSettings, evidence, share: float) -> None:
    """Add FFN neurons (``settings.ffn_method``: cahp or gradient) at keep ratio ``share`` to a head
    selection, from the same evidence pass."""
    from cahp_deploy.methods.ffn import select_neurons
    from cahp_deploy.selection.neurons import resolve_neuron_budget

    stats = evidence.ffn
    if stats is None:
        raise CahpError("this search's evidence has no FFN statistics; delete OUT/search/evidence.pkl and rerun")
    layers, inter = len(stats.neurons_per_layer), int(stats.neurons_per_layer[0])
    budget = resolve_neuron_budget(layers * inter, layers, keep_ratio=share)
    kept, details = select_neurons(stats, settings.ffn_method, budget, layers, inter, settings.seed,
                                   degree=int(settings.cahp_options.get("degree") or 6))
    selection.kept_neurons, selection.neurons_per_layer, selection.ffn = kept, inter, details


def candidate_dir(root: Path, k: int, ladder: str = "heads") -> Path:
    """``kNNN`` (a head-count rung) or ``mNNN`` (a progressive rung: NNN percent of dense MACs targeted)."""
    return root / f"{'m' if ladder == 'macs' else 'k'}{int(k):03d}"


def _rung_selection(evidence, rung):
    """A progressive rung's kept heads and neurons as a Selection (CAHP's, with its sweep and knee)."""
    from cahp_deploy.methods.cahp import select_at

    selection = select_at(evidence, evidence.num_heads)
    selection.kept_heads = [list(h) for h in rung.kept_heads]
    selection.kept_neurons = [list(n) for n in rung.kept_neurons]
    selection.neurons_per_layer = int(evidence.ffn.neurons_per_layer[0])
    selection.details["ladder_rung"] = {"k": rung.k, "target_macs": rung.target, "macs_kept": rung.macs_kept,
                                        "move": rung.move, "kl": rung.kl}
    selection.ffn = {"method": "progressive ladder", "order": "see search/schedule.json"}
    return selection


def _build_candidate(settings: SearchSettings, evidence, k: int, dest: Path,
                     dense_pred: np.ndarray | None = None, rung=None) -> dict[str, Any]:
    """Select at k (or take a progressive ``rung``'s sets), prune, recover, measure; into ``dest`` (atomically)."""
    from cahp_deploy import pruning

    start = time.perf_counter()
    share = settings.ffn_ratio_at(k, evidence)
    selection = _candidate_selection(settings, evidence, k, share, rung)
    with atomic_dir(dest, force=True) as tmp:
        selection.to_json(tmp / "selection.json")
        pruned = pruning.prune(settings.model, tmp / "selection.json", tmp / "pruned")
        costs = json.loads((pruned / "pruning.json").read_text())
        record = _cost_record(k, costs)
        _measured(record, "before", _predict(pruned, settings.eval_data, settings.max_length), settings.eval_data, dense_pred)
        dense = _is_dense(costs)
        final, steps = (pruned, []) if dense else _recover_candidate(settings, pruned, tmp, record)
        if steps:
            _measured(record, "after", _predict(final, settings.eval_data, settings.max_length), settings.eval_data,
                      dense_pred)
            record.update(judged="recovered", recovery=" + ".join(steps))
            for stale in ("pruned", "refit", "distilled"):
                if (tmp / stale).is_dir() and tmp / stale != final:
                    shutil.rmtree(tmp / stale)
        else:
            record.update(accuracy_after=None, judged="pruned", dense_anchor=dense)
        shutil.copy2(final / "pruning.json", tmp / "pruning.json")  # the numbers outlive the model
        final.rename(tmp / MODEL_DIR)
        record["seconds"] = time.perf_counter() - start
        if rung is not None:
            record.update(move=rung.move, target_macs=rung.target)
        record["key"] = settings.candidate_key(k, share, None if rung is None else rung.to_dict())
        with open(tmp / CANDIDATE_FILE, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
    return record


def _candidate_selection(settings: SearchSettings, evidence, k: int, share: float | None, rung):
    """Candidate k's Selection: a progressive ``rung``'s sets, or CAHP's cut at k (plus FFN neurons at
    ``share`` in a joint head ladder)."""
    from cahp_deploy.methods.cahp import select_at

    if rung is not None:
        selection = _rung_selection(evidence, rung)
    else:
        selection = select_at(evidence, k)
        if share is not None:
            with_neurons(selection, settings, evidence, share)
    selection.details["k_from"] = "accuracy budget"
    selection.provenance.update({"model": settings.model, "model_sha256": settings.model_sha256,
                                 **settings.select_data.provenance()})
    return selection


def _cost_record(k: int, costs: dict[str, Any]) -> dict[str, Any]:
    """candidate.json's start: what the cut kept and removed (from the pruned model's pruning.json)."""
    return {
        "k": int(k),
        "heads_kept": int(costs["num_heads_kept"]),
        "kept_heads": costs["kept_heads"],
        "params_after": costs["params_after"],
        "params_before": costs["params_before"],
        "flop_ceiling_speedup": costs["flop_ceiling_speedup"],
        "neurons_kept": costs.get("num_neurons_kept"),
        "macs_removed": round(1.0 - costs["macs_seq128"]["total_after"] / costs["macs_seq128"]["total_before"], 4),
    }


def _recover_candidate(settings: SearchSettings, pruned: Path, tmp: Path,
                       record: dict[str, Any]) -> tuple[Path, list[str]]:
    """A pruned candidate (not dense itself) recovered in ``tmp``: the refit, distillation towards dense,
    the fine-tune, each when asked. Returns (the final model dir, the steps taken); each step's numbers
    go into ``record`` and its record file next to candidate.json."""
    from cahp_deploy import recovery

    final = pruned
    steps = []
    if settings.reconstruct is not None:
        from cahp_deploy.recovery.refit import REFIT_FILE, refit

        final = tmp / "refit"
        rec = refit(pruned, settings.model, settings.select_data, final, max_length=settings.max_length,
                    seed=settings.seed, **settings.reconstruct)
        record["refit_seconds"] = rec["total_seconds"]
        shutil.copy2(final / REFIT_FILE, tmp / REFIT_FILE)
        steps.append("least-squares refit")
    if settings.distill_rows is not None:
        from cahp_deploy.recovery.distill import DISTILL_FILE, DistillParams, distill_model_dir

        rec = distill_model_dir(final, settings.model, settings.distill_rows, settings.distill_judge,
                                tmp / "distilled", max_length=settings.max_length,
                                params=DistillParams(**(settings.distill_params or {})))
        record["distill"] = {key: rec[key] for key in ("kept", "judge_rows", "agreement_before", "agreement_after",
                                                       "total_seconds")}
        if rec["kept"]:
            final = tmp / "distilled"
            shutil.copy2(final / DISTILL_FILE, tmp / DISTILL_FILE)
            steps.append("distillation towards dense")
    if settings.recover is not None:
        # accuracy is measured here, on the decision rows, not by recover()
        source, final = final, tmp / "recovered"
        rec = distributed.collective(  # launched: every rank trains, rank 0 writes
            recovery.recover, source, settings.data, final, split=settings.recover_split,
            seed=settings.seed, **settings.columns, **settings.recover,
        )
        record["recovery_seconds"] = rec["total_seconds"]
        shutil.copy2(final / recovery.RECOVERY_FILE, tmp / recovery.RECOVERY_FILE)
        steps.append("fine-tune")
    return final, steps


def _is_dense(costs: dict[str, Any]) -> bool:
    """Whether a pruned model removed nothing (every head, every FFN neuron): dense itself."""
    return costs["params_after"] == costs["params_before"]


def _cached(dest: Path, key: str, need_model: bool) -> dict[str, Any] | None:
    path = dest / CANDIDATE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if record.get("key") != key or (need_model and not (dest / MODEL_DIR / "config.json").is_file()):
        return None
    return record


def _as_result(record: dict[str, Any], dense_correct: np.ndarray | None, confidence: float) -> CandidateResult:
    drop = None
    if dense_correct is not None:
        final = record["correct_before"] if record["accuracy_after"] is None else record["correct_after"]
        drop = paired_drop(dense_correct, from_bits(final), confidence).to_dict()
    return CandidateResult(
        k=int(record["k"]), accuracy_before=float(record["accuracy_before"]),
        accuracy_after=None if record["accuracy_after"] is None else float(record["accuracy_after"]),
        seconds=float(record["seconds"]),
        details={key: record.get(key) for key in ("heads_kept", "neurons_kept", "flop_ceiling_speedup",
                                                  "params_after", "params_before", "dense_anchor", "recovery",
                                                  "macs_removed", "refit_seconds", "recovery_seconds",
                                                  "agreement_before", "agreement_after", "move", "target_macs",
                                                  "distill")},
        drop=drop,
    )


def measure_candidate(settings: SearchSettings, evidence, k: int, root: Path,
                      dense_correct: np.ndarray | None = None, dense_pred: np.ndarray | None = None,
                      rung=None) -> CandidateResult:
    """Candidate k's accuracies, built into ``root/kNNN`` (``mNNN`` for a progressive ``rung``) or read back
    from there when made from these inputs.

    With ``dense_correct`` (dense per-row correctness on the same rows) the result carries the paired
    drop, and the search judges it on the drop's upper confidence bound.
    """
    dest = candidate_dir(root, k, settings.ladder)
    key = settings.candidate_key(k, settings.ffn_ratio_at(k, evidence), None if rung is None else rung.to_dict())
    record = _cached(dest, key, need_model=False)
    if record is None:
        settings.say(f"search: candidate k={k}: select, prune, "
                     f"{'recover (unless nothing is removed), ' if settings.recover else ''}measure")
        record = _build_candidate(settings, evidence, k, dest, dense_pred, rung)
    else:
        settings.say(f"search: candidate k={k}: done before, reused")
    result = _as_result(record, dense_correct, settings.confidence)
    bound = "" if result.drop is None else \
        f"; drop {result.drop['drop']:+.2f} points, upper bound {result.drop['upper']:.2f}"
    settings.say(
        f"search: k={k} ({record['heads_kept']} heads): {100 * result.accuracy_before:.2f}% before recovery"
        + ("" if result.accuracy_after is None else f", {100 * result.accuracy_after:.2f}% after; judged: "
           f"{result.judged}") + f"{bound} ({result.seconds:.0f} s)"
    )
    return result


def ensure_model(settings: SearchSettings, evidence, root: Path, k: int, dense_pred: np.ndarray,
                 rung) -> None:
    """The chosen candidate's model, built again when another budget chose it before and its model was
    removed since."""
    chosen_dir = candidate_dir(root, k, settings.ladder)
    key = settings.candidate_key(k, settings.ffn_ratio_at(k, evidence), None if rung is None else rung.to_dict())
    if _cached(chosen_dir, key, need_model=True) is None:
        _build_candidate(settings, evidence, k, chosen_dir, dense_pred, rung)


__all__ = ["CANDIDATE_FILE", "MODEL_DIR", "candidate_dir", "ensure_model", "measure_candidate", "with_neurons"]
