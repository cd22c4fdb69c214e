"""``run --max-accuracy-drop P``: the fewest CAHP heads whose recovered model stays within P points of dense.

Judged on the upper confidence bound of the *paired* drop against dense on the decision rows
(:mod:`cahp_deploy.paired`), never on the point estimate: per-row correctness of dense and of every
candidate is kept. With ``ffn_keep_ratio`` R the search is joint: each rung also keeps a share of FFN
neurons (CAHP's complementary neurons, from the same evidence pass) that falls with its head count,
from every neuron at every head to R at the knee (:func:`cahp_deploy.run.budget_search.ffn_ratio`);
the FFN is ~2/3 of a layer's multiply-accumulates, and near dense its neurons cost less accuracy per
MAC than heads do.

CAHP's evidence (signatures, profiles, the cluster sweep, the knee) is collected once. Each candidate
k is a cut of that sweep (:func:`cahp_deploy.methods.cahp.select_at`, guard included), pruned,
recovered and measured on the evaluation split; :func:`cahp_deploy.run.budget_search.search_k` tests
a ladder of k fixed in advance, from every head (k = N, the dense-sized model) down towards the knee,
and stops at the first rung that misses, so a search costs a few recoveries and its many looks at
the decision rows do not inflate the chance of a false pass.

**The first rung is dense itself.** At k = N (every head kept, and every FFN neuron in a joint
search) the pruned model *is* the dense model, so it is not recovered: recovery on a sample only moves
it away from dense (measured on SST-5, QAT recovery on 2,000 rows: 47.32% -> 46.96% on validation,
drop upper bound 1.31, which ended a budget-1 search before it began). It passes any budget the rows
can resolve (its drop is exactly zero), and the search goes on to the rungs below; when none of them
passes, the dense-sized model is what is exported, and the shipped artifact is then the fastest
measured dense variant within the budget (usually INT8). Every other rung is judged recovered (or
only pruned with ``--no-recover``): a version chosen per candidate would need rows of its own.
Comparing on recovery-split rows the fine-tune did not use was tried and dropped: the dense model was
fine-tuned on those rows, so they favour whichever model trained on that split most (they picked
the recovered every-head model, which validation put 0.36 points below dense).

Layout of ``OUT/search/`` (a candidate done is never redone while its inputs are unchanged, so an
interrupted search resumes where it stopped)::

    search.json        every candidate tried, in order, the chosen one, dense accuracy, the threshold
    tradeoff.png       accuracy vs estimated speedup of every candidate, the chosen one marked
    evidence.pkl       CAHP's evidence (so a resumed search does not run the model again)
    k015/              one dir per candidate (k = clusters; the guard may keep a few heads more)
        selection.json  candidate.json  pruning.json  recovery.json
        model/         the candidate's judged model (recovered; only pruned at the first rung or with --no-recover);
                       removed for the candidates not chosen once the search is over

One candidate (its cut, pruning, recovery, measurement and cache) is :mod:`cahp_deploy.run.candidates`'s;
this module holds the search's settings, CAHP's evidence, the search down the ladder and search.json.

Accuracy here is PyTorch's, on the *decision rows* (``eval_data``: the evaluation split, or its part
that is not held out for confirmation, see :mod:`cahp_deploy.run.promise`): never the selection or
the recovery split, never the confirmation rows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cahp_deploy import distributed
from cahp_deploy.atomic import atomic_file
from cahp_deploy.run.budget_search import RULE, CandidateResult, SearchResult, ffn_ratio, ladder, search_k
from cahp_deploy.run.candidates import MODEL_DIR, candidate_dir, ensure_model, measure_candidate
from cahp_deploy.errors import CahpError
from cahp_deploy.hashing import sha256_json
from cahp_deploy.paired import DEFAULT_CONFIDENCE
from cahp_deploy.run.progressive import NEURON_MULTIPLE
from cahp_deploy.run.promise import rows_fingerprint
from cahp_deploy.run.summary import points_word

log = logging.getLogger(__name__)

SEARCH_FILE = "search.json"
TRADEOFF_PLOT = "tradeoff.png"
EVIDENCE_FILE = "evidence.pkl"
#: the search's rules, in every candidate's cache key and the search stage's inputs: change it when a
#: change of rule must not reuse what earlier runs measured
RULES_VERSION = "refit"


@dataclass
class SearchSettings:
    """What a search needs; everything in it but ``say`` enters the candidates' cache keys.

    ``recover`` holds keyword arguments of :func:`cahp_deploy.recovery.recover` (epochs, lr,
    max_examples, distill_from, ...) or is None for ``--no-recover``.
    """

    model: str
    data: str
    model_sha256: str
    select_data: Any  # LabelledData of the selection split (already cut to max_examples)
    eval_data: Any  # LabelledData of the decision rows (the confirmation rows are never here)
    recover_split: str
    columns: dict[str, Any]
    seed: int
    cahp_options: dict[str, Any]
    recover: dict[str, Any] | None
    eval_max_examples: int | None
    max_drop: float
    say: Callable[[str], None] = field(default=lambda s: None, repr=False)
    confidence: float = DEFAULT_CONFIDENCE
    ffn_keep_ratio: float | None = None  # the FFN share kept at the knee rung (None: heads only)
    ffn_method: str = "cahp"
    search_step: int | None = None  # heads between the ladder's rungs (None: about N / 12)
    max_length: int = 128  # the run's one max length: every row is scored cut at it
    reconstruct: dict[str, Any] | None = None  # options of the least-squares refit (None: off)
    ladder: str = "heads"  # "heads": CAHP head counts (joint FFN share by k); "macs": the progressive ladder
    mac_step: float = 0.05  # progressive ladder: share of dense MACs between rungs
    mac_floor: float = 0.5  # progressive ladder: the last rung keeps about this share of dense MACs
    neuron_multiple: int = NEURON_MULTIPLE  # progressive ladder: each layer keeps a multiple of this many FFN neurons
    distill_rows: Any = None  # LabelledData: text to distil each rung towards dense on (None: no distillation)
    distill_judge: Any = None  # LabelledData: held-out text that decides whether a rung keeps its distillation
    distill_params: dict[str, Any] | None = None  # DistillParams fields

    def distill_key(self) -> dict[str, Any] | None:
        if self.distill_rows is None:
            return None
        return {"params": self.distill_params, "data": self.distill_rows.file_hashes,
                "rows": rows_fingerprint(self.distill_rows), "judge": rows_fingerprint(self.distill_judge)}

    def evidence_key(self) -> str:
        return sha256_json({
            "model_sha256": self.model_sha256, "data": self.select_data.file_hashes,
            "split": self.select_data.split, "rows": len(self.select_data), "columns": self.columns,
            "seed": self.seed, "options": self.cahp_options, "ffn": self.wants_ffn,
        })

    @property
    def wants_ffn(self) -> bool:
        """Whether the evidence pass collects FFN statistics (a joint head ladder, or the progressive one)."""
        return self.ffn_keep_ratio is not None or self.ladder == "macs"

    def ffn_ratio_at(self, k: int, evidence) -> float | None:
        """Rung k's share of FFN neurons (None: a heads-only search, or the progressive ladder's own sets)."""
        if self.ffn_keep_ratio is None or self.ladder == "macs":
            return None
        return ffn_ratio(k, evidence.knee.k, evidence.num_heads, self.ffn_keep_ratio)

    def candidate_key(self, k: int, ffn_share: float | None = None, rung: dict[str, Any] | None = None) -> str:
        return sha256_json({
            "ladder": self.ladder, "rung": None if rung is None else {key: rung[key] for key in ("kept_heads", "kept_neurons")},
            "evidence": self.evidence_key(), "k": int(k), "recover": self.recover,
            "recover_split": self.recover_split, "eval": self.eval_data.file_hashes,
            "eval_split": self.eval_data.split, "eval_rows": len(self.eval_data),
            "eval_rows_sha256": rows_fingerprint(self.eval_data), "ffn_keep_ratio": ffn_share,
            "ffn_method": self.ffn_method if self.ffn_keep_ratio is not None else None,
            "rule": RULES_VERSION, "max_length": int(self.max_length), "reconstruct": self.reconstruct,
            "distill": self.distill_key(),
        })


def _load_dense(settings: SearchSettings):
    from cahp_deploy.modeling import load_classifier

    return load_classifier(settings.model)


def collect(settings: SearchSettings, root: Path):
    """CAHP's evidence, from ``root/evidence.pkl`` when it was made from these inputs."""
    key = settings.evidence_key()
    path = root / EVIDENCE_FILE
    if path.is_file():
        try:
            with open(path, "rb") as f:
                cached = pickle.load(f)
            if cached.get("key") == key:
                return cached["evidence"]
        except Exception:  # a truncated or foreign cache is only a cache: recompute
            log.warning("ignoring unreadable %s", path)
    settings.say("search: collecting CAHP evidence (signatures, salience, cluster sweep"
                 + (", FFN neurons)" if settings.wants_ffn else ")"))
    evidence = distributed.collective(collect_evidence_of, settings.model, settings.select_data, settings.seed,
                                      dict(settings.cahp_options), settings.wants_ffn)
    with atomic_file(path, force=True) as tmp:
        with open(tmp, "wb") as f:
            pickle.dump({"key": key, "evidence": evidence}, f)
    return evidence


def collect_evidence_of(model: str, select_data, seed: int, cahp_options: dict[str, Any], ffn: bool):
    """CAHP's evidence of ``model`` on ``select_data`` (with FFN statistics when ``ffn``).

    Module-level, with plain arguments, so that a launched ``run`` can send it to every rank
    (:func:`cahp_deploy.distributed.collective`); ranks other than 0 raise ``NotMainRank`` once their
    statistics are merged into rank 0's.
    """
    from cahp_deploy.methods.base import MethodContext
    from cahp_deploy.methods.cahp import collect_evidence
    from cahp_deploy.modeling import load_classifier
    from cahp_deploy.progress import make_progress

    net, tokenizer = load_classifier(model)
    with make_progress(disable=True if not distributed.is_main() else None) as progress, \
            contextlib.ExitStack() as stack:
        collector = None
        if ffn:
            from cahp_deploy.signals.ffn import FfnCollector

            collector = stack.enter_context(FfnCollector(net, np.unique(select_data.labels)))
        ctx = MethodContext(model=net, tokenizer=tokenizer, data=select_data, budget=None, seed=seed,
                            options=cahp_options, progress=progress, ffn=collector)
        return collect_evidence(ctx)


def search(settings: SearchSettings, root: str | Path) -> dict[str, Any]:
    """Run the search into ``root`` (``OUT/search``) and return search.json's contents.

    Raises :class:`CahpError` when even k = N misses the budget; search.json then records every
    candidate tried and ``chosen`` is null, and no candidate model is kept.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    dense_pred, dense_correct = _dense_on_decision_rows(settings)
    dense_accuracy = float(dense_correct.mean())
    evidence = collect(settings, root)
    rungs, ks, order = _rungs_of(settings, evidence, root)
    settings.say(
        f"search: dense {100 * dense_accuracy:.2f}% on {settings.eval_data.split} ({len(settings.eval_data)} rows); "
        f"budget {points_word(settings.max_drop)}; ladder k = {', '.join(map(str, ks))} ({order}), tested in order "
        "until the first miss"
    )

    def write(found: SearchResult | None, tried: list[CandidateResult], error: str | None) -> dict[str, Any]:
        record = _search_record(settings, root, evidence, rungs, ks, dense_accuracy, found, tried, error)
        record["seconds"] = time.perf_counter() - start
        _keep_only_chosen_model(root, record["chosen_dir"])
        with atomic_file(root / SEARCH_FILE, force=True) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")
        plot_tradeoff(record, root / TRADEOFF_PLOT)
        return record

    tried: list[CandidateResult] = []

    def tracked(k: int) -> CandidateResult:
        result = measure_candidate(settings, evidence, k, root, dense_correct, dense_pred, rungs.get(k))
        tried.append(result)
        return result

    try:
        found = search_k(ks, tracked, dense_accuracy, settings.max_drop)
    except CahpError as e:
        write(None, tried, str(e))
        raise
    ensure_model(settings, evidence, root, found.chosen.k, dense_pred, rungs.get(found.chosen.k))
    return write(found, found.tried, None)


def _dense_on_decision_rows(settings: SearchSettings) -> tuple[np.ndarray, np.ndarray]:
    """Dense's per-row predicted label and correctness on the decision rows (PyTorch)."""
    from cahp_deploy import evaluation
    from cahp_deploy.paired import correct

    net, tokenizer = _load_dense(settings)
    dense_pred = evaluation.logits(net, tokenizer, settings.eval_data, max_length=settings.max_length).argmax(axis=1)
    return dense_pred, correct(dense_pred, settings.eval_data.labels)


def _rungs_of(settings: SearchSettings, evidence, root: Path) -> tuple[dict[int, Any], list[int], str]:
    """(progressive rungs by k, empty for the head ladder; the ladder's k in test order; its order in words)."""
    if settings.ladder == "macs":
        from cahp_deploy.run import progressive

        rungs = {r.k: r for r in progressive.load_or_build(settings, evidence, root)}
        return rungs, list(rungs), "% of dense MACs, every unit first"
    return {}, ladder(evidence.knee.k, evidence.num_heads, settings.search_step), "every head first, the knee last"


def _search_record(settings: SearchSettings, root: Path, evidence, rungs: dict[int, Any], ks: list[int],
                   dense_accuracy: float, found: SearchResult | None, tried: list[CandidateResult],
                   error: str | None) -> dict[str, Any]:
    """search.json's contents but its ``seconds``."""
    chosen_dir = None if found is None else candidate_dir(root, found.chosen.k, settings.ladder).name
    return {
        "dense_accuracy": dense_accuracy,
        "max_drop_points": settings.max_drop,
        "threshold": dense_accuracy - settings.max_drop / 100.0,
        "rule": f"paired drop vs dense, one-sided {settings.confidence:.0%} upper bound <= max_drop_points; {RULE}",
        "confidence": settings.confidence,
        "ffn_keep_ratio": settings.ffn_keep_ratio,
        "ffn_ratios": None if settings.ffn_keep_ratio is None or rungs else {k: settings.ffn_ratio_at(k, evidence)
                                                                              for k in ks},
        "ladder": settings.ladder,
        "neuron_multiple": settings.neuron_multiple if rungs else None,
        "ladder_rungs": None if not rungs else {k: {"heads": sum(map(len, r.kept_heads)),
                                                    "neurons": sum(map(len, r.kept_neurons)),
                                                    "macs_kept": round(r.macs_kept, 4), "move": r.move}
                                                for k, r in rungs.items()},
        "eval": settings.eval_data.provenance(),
        "select": settings.select_data.provenance(),
        "recover_split": None if settings.recover is None else settings.recover_split,
        "recover": settings.recover,
        "knee": evidence.knee.to_dict(),
        "candidates_k": ks,
        "tried": [c.to_dict() for c in tried],
        "stopped_at": None if found is None else found.stopped_at,
        "chosen_k": None if found is None else found.chosen.k,
        "chosen_dir": chosen_dir,
        "error": error,
    }


def _keep_only_chosen_model(root: Path, keep: str | None) -> None:
    """Candidates' models take ~100 MB each: keep the chosen one (dir name ``keep``), drop the rest (their
    numbers stay)."""
    for cand in [*root.glob("k[0-9][0-9][0-9]"), *root.glob("m[0-9][0-9][0-9]")]:
        if cand.name != keep and (cand / MODEL_DIR).is_dir():
            shutil.rmtree(cand / MODEL_DIR)


def chosen_model(root: str | Path) -> Path:
    """The final model dir of a finished search."""
    record = json.loads((Path(root) / SEARCH_FILE).read_text())
    if record.get("chosen_dir") is None:
        raise CahpError(f"{root}/{SEARCH_FILE} records no chosen candidate: {record.get('error')}")
    return Path(root) / record["chosen_dir"] / MODEL_DIR


def plot_tradeoff(record: dict[str, Any], path: Path) -> None:
    """Accuracy vs the MAC-count speedup ceiling of every candidate; the chosen one and dense marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tried = sorted(record["tried"], key=lambda c: c["k"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = [c["details"]["flop_ceiling_speedup"] for c in tried]
    ax.scatter(xs, [100 * c["accuracy_before"] for c in tried], marker="o", facecolors="none",
               edgecolors="tab:gray", label="pruned, before recovery")
    if any(c["accuracy_after"] is not None for c in tried):
        ax.scatter(xs, [100 * c["accuracy"] for c in tried], marker="o", color="tab:blue",
                   label="judged version (recovered or only pruned)")
    for c, x in zip(tried, xs):
        label = f"{c['k']}% MACs" if record.get("ladder") == "macs" else f"{c['details']['heads_kept']}h"
        ax.annotate(label, (x, 100 * c["accuracy"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.scatter([1.0], [100 * record["dense_accuracy"]], marker="s", color="black", label="dense")
    ax.axhline(100 * record["threshold"], color="tab:red", linestyle="--", linewidth=1,
               label=f"budget: dense - {record['max_drop_points']:g} points")
    chosen = [c for c in tried if c["k"] == record["chosen_k"]]
    if chosen:
        c = chosen[0]
        ax.scatter([c["details"]["flop_ceiling_speedup"]], [100 * c["accuracy"]], marker="*", s=220,
                   color="tab:orange", zorder=5, label=f"chosen: {c['details']['heads_kept']} heads"
                   + (f", {c['details']['neurons_kept']} neurons" if c["details"].get("neurons_kept") else ""))
    ax.set_xlabel("speedup ceiling from multiply-accumulates (seq 128)")
    ax.set_ylabel(f"accuracy on {record['eval']['split']} (%)")
    ax.set_title("accuracy budget search: every candidate tried")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path, force=True) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


__all__ = ["SearchSettings", "chosen_model", "collect", "collect_evidence_of", "measure_candidate",
           "plot_tradeoff", "search"]
