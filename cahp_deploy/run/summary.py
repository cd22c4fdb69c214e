"""The answer to the user's question, in words: what was kept, what it cost in accuracy, what it gained.

Built from :func:`cahp_deploy.run.summarize.summarize`'s dict (itself read back from the files the stages
wrote), so the words can never disagree with report.json. ``headline`` gives the first lines (printed
by the CLI, and the top of ``OUT/summary.md``); ``markdown`` the whole ``OUT/summary.md``.
"""

from __future__ import annotations

from typing import Any

from cahp_deploy.formatting import percent

#: the variant the headline compares: what a CPU deployment ships without quantization
HEADLINE_VARIANT = "optimized"


def _row(summary: dict[str, Any], artifact_is_dense: bool, variant: str) -> dict[str, Any] | None:
    rows = [r for r in summary["rows"] if r["baseline"] == artifact_is_dense and r["variant"] == variant]
    return rows[0] if rows else None


def _pct(x: float | None) -> str:
    return percent(x, missing="n/a")


def _points(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f} points"


def points_word(p: float) -> str:
    """``1 point``, ``0.5 points``."""
    return f"{p:g} point" + ("" if p == 1 else "s")


def _recovery_words(rec: dict[str, Any]) -> str:
    epochs = rec.get("epochs")
    rows = (rec.get("train") or {}).get("num_examples")
    split = (rec.get("train") or {}).get("split")
    refit = rec.get("refit")
    words = [] if not refit else [f"least-squares refit against dense on {refit['rows']} {refit['split']} rows"]
    if isinstance(epochs, (int, float)):
        words.append(f"{epochs:g} epoch{'' if epochs == 1 else 's'}" + (f" on {rows} {split} rows" if rows and split else ""))
    return ", then ".join(words) or "recovery"


def _shape(s: str) -> str:
    b, q = s.split("x")
    return f"batch {b} x {q} tokens"


def drop_words(d: dict[str, Any]) -> str:
    """A paired drop as a user reads it, in the one sign convention of every printed drop: dense minus
    candidate, in points, positive is worse; the interval and the upper bound are the drop's."""
    return (f"drop {d['drop']:+.1f} points ({d['confidence']:.0%} CI {d['low']:+.1f} .. {d['high']:+.1f}, "
            f"{d['n']} rows)")


def promise_lines(confirm: dict[str, Any]) -> list[str]:
    """The first lines of every run: what was shipped, its confirmed accuracy change, its measured speed."""
    rec = confirm.get("recommended")
    budget = confirm.get("max_drop_points")
    rows = confirm["confirmation_rows"]
    shipped = confirm.get("shipped") or {"artifact": "pruned" if rec else None, "variant": rec}
    if shipped["artifact"] is None:
        return [f"Nothing pruned is shipped as recommended: {confirm['why']}. Ship the dense model "
                f"(or dense INT8) instead."]
    dense = shipped["artifact"] == "dense"
    if not dense:  # an unconfirmed promise recommends nothing; the shipped artifact is still named
        rec = rec or shipped.get("variant")
    v = confirm["dense_int8"] if dense else confirm["variants"][rec]
    share = v.get("int8_mac_share")
    int8 = f", {share:.0%} of its weight-MatMul MACs in INT8" if share else ""
    lines = [f"Shipped: the dense model's INT8 variant, not a pruned one ({shipped['why']}{int8}; "
             f"`{shipped['path']}`)." if dense else f"Shipped: the pruned model's `{rec}` variant ({confirm['why']}{int8})."]
    conf = v["confirmation"]
    check = ""
    if budget is not None:
        held = conf["upper"] <= budget + 1e-9
        check = (f": the budget of {points_word(budget)} HOLDS (upper bound of the drop {conf['upper']:+.2f} points)"
                 if held else f": the budget of {points_word(budget)} is NOT confirmed (upper bound of the drop "
                 f"{conf['upper']:+.2f} points)")
    if budget is None:  # nothing was decided on these rows: one measurement
        lines.append(f"Accuracy vs dense on {rows['how']}: {drop_words(conf)}.")
    else:
        lines.append(f"Accuracy vs dense on {rows['how']} (never used by any decision): {drop_words(conf)}{check}. "
                     f"On the {confirm['decision_rows']['num_examples']} decision rows: {drop_words(v['decision'])}.")
    speed = f"Measured speed at {_shape(confirm['shape'])}: {v['speedup_vs_dense_fp32']:.2f}x vs dense fp32" \
        if v.get("speedup_vs_dense_fp32") else "Speed: not measured at the headline shape"
    di = confirm.get("dense_int8")
    if dense:
        best = confirm["variants"].get(rec) if rec else None
        lines.append(speed + ".")
        lines.append("Plainly: at this budget quantizing the dense model beats pruning it" + (
            f"; the pruned model's best variant within the budget, `{rec}`, runs {best['speedup_vs_dense_fp32']:.2f}x "
            f"vs dense fp32" if best is not None and best.get("speedup_vs_dense_fp32") else
            "; no pruned variant kept the budget on the decision rows") + ".")
        return lines
    if di is not None and v.get("speedup_vs_dense_int8"):
        speed += (f", {v['speedup_vs_dense_int8']:.2f}x vs dense INT8 (the honest competitor: "
                  f"{drop_words(di['confirmation'])} on its own)")
    lines.append(speed + ".")
    if confirm.get("dense_int8_faster"):
        lines.append("Plainly: dense INT8 is faster than the shipped pruned artifact here; quantizing the dense "
                     "model beats this pruning at this budget.")
    return lines


def headline(summary: dict[str, Any]) -> list[str]:
    """Four or five sentences: heads, accuracy (before/after recovery), speed, size, how k was chosen;
    preceded by what was shipped and its confirmed accuracy change when the confirm stage ran."""
    variant = HEADLINE_VARIANT
    dense, pruned = _row(summary, True, variant), _row(summary, False, variant)
    if dense is None or pruned is None:
        variant = "fp32"
        dense, pruned = _row(summary, True, variant), _row(summary, False, variant)
    if dense is None or pruned is None:
        return ["No dense/pruned pair was benchmarked; see report/report.md."]
    lines = promise_lines(summary["confirm"]) if summary.get("confirm") else []
    asked = summary.get("budgets_asked") or []
    if len(asked) > 1:
        lines.append(f"These decision rows have now been asked {len(asked)} budgets ({', '.join(f'{b:g}' for b in asked)} "
                     "points): each budget is one more look at them, and the error rate holds for one run alone; "
                     "confirm on a fresh --confirm-split before relying on a budget chosen after seeing others.")
    if summary.get("distill_warning"):
        lines.append(f"**Warning:** {summary['distill_warning']}.")
    for stage in summary.get("int8_gate_failed") or []:
        lines.append(f"The {stage.removeprefix('export-')} model's INT8 graph failed its own accuracy gate (INT8 vs "
                     "its fp32 graph on the selection split's gate rows; run.json, `int8_gate_failed`): it was kept, "
                     "marked in the manifest (`gate_failed`), and judged against dense on the decision rows like every "
                     "other graph; predict and handoff never pick it unless this run recommends it.")
    kept, total = pruned["heads_kept"], pruned["heads_total"]
    search = summary.get("search")
    how = ""
    if search is not None and search.get("ladder") == "macs":
        how = (f", the last of {len(search['tried'])} progressive rungs (each ~{_mac_step(search):.0%} fewer dense MACs, "
               f"heads and FFN neurons together) tested down from dense that stays within "
               f"{points_word(search['max_drop_points'])} of dense")
    elif search is not None:
        how = (f", the last of {len(search['tried'])} CAHP candidates tested down from every head that stays within "
               f"{points_word(search['max_drop_points'])} of dense")
    elif summary.get("method") == "cahp":
        how = ", at the knee of CAHP's silhouette curve"
    neurons = ""
    n_kept, n_total = pruned.get("neurons_kept"), pruned.get("neurons_total")
    if n_kept is not None and n_total and n_kept < n_total:
        neurons = f" and {n_kept} of {n_total} FFN neurons ({n_kept / n_total:.0%})"
    lines.append(f"Kept {kept} of {total} attention heads ({kept / total:.0%}){how}{neurons}.")
    chosen = [c for c in search["tried"] if c["k"] == search.get("chosen_k")] if search else []
    if chosen and (chosen[0].get("details") or {}).get("dense_anchor"):
        lines.append(f"Plainly: no pruned candidate kept the budget on the decision rows (the search stopped at "
                     f"k={search.get('stopped_at')}), so nothing was removed: the model exported as `pruned` is "
                     "dense itself, and the gain is quantization's.")

    split, n = summary.get("eval_split"), summary.get("eval_examples")
    rec = summary.get("recovery")
    acc = f"Accuracy on {split} ({n} rows): dense {_pct(dense['accuracy'])}"
    if rec is not None and rec.get("accuracy_before") is not None:
        acc += (f", pruned {_pct(rec['accuracy_before'])} before recovery, {_pct(pruned['accuracy'])} after "
                f"recovery ({_recovery_words(rec)})")
    elif rec is not None:  # the budget search measured before/after itself, on its decision rows
        acc += f", pruned {_pct(pruned['accuracy'])} after recovery ({_recovery_words(rec)})"
    else:
        acc += f", pruned {_pct(pruned['accuracy'])} (no recovery)"
    drop = None if pruned["accuracy"] is None or dense["accuracy"] is None else dense["accuracy"] - pruned["accuracy"]
    lines.append(f"{acc}: drop {_points(drop)}.")

    shapes = summary.get("shapes") or []
    speeds = [f"{pruned['speedup_same_variant'].get(s):.2f}x at {_shape(s)}" for s in reversed(shapes)
              if pruned["speedup_same_variant"].get(s) is not None]
    if speeds:
        lines.append(f"Speed ({variant} ONNX, ONNX Runtime, median latency vs dense): " + ", ".join(speeds) + ".")
    if dense.get("bytes") and pruned.get("bytes"):
        mb = 2**20
        lines.append(
            f"Size: {dense['bytes'] / mb:.1f} MiB -> {pruned['bytes'] / mb:.1f} MiB "
            f"({pruned['bytes'] / dense['bytes'] - 1:+.0%}); parameters {dense['params'] / 1e6:.1f}M -> "
            f"{pruned['params'] / 1e6:.1f}M."
        )
    splits = f"Heads were selected on {summary.get('select_split')}"
    if summary.get("recover_split"):
        splits += f", recovery trained on {summary['recover_split']}"
    if search is not None:
        lines.append(f"{splits}; the search decided on {split}'s decision rows, so the figures above on {split} are "
                     "not the promise: the promise is the first lines', on rows no decision saw.")
    else:
        lines.append(f"{splits}; accuracy is measured on {split}, which neither saw.")
    return lines


def _mac_step(search: dict[str, Any]) -> float:
    ks = search.get("candidates_k") or [100, 95]
    return (ks[0] - ks[1]) / 100 if len(ks) > 1 else 0.05


def _aligned_words(search: dict[str, Any]) -> str:
    multiple = search.get("neuron_multiple") or 1
    return f"; each layer's FFN width a multiple of {multiple}, which ONNX Runtime's INT8 GEMM runs faster" \
        if multiple > 1 else ""


def _ladder_words(search: dict[str, Any]) -> str:
    """How the ladder was made, in one sentence."""
    ks = ", ".join(map(str, search["candidates_k"]))
    if search.get("ladder") == "macs":
        return (f"The ladder, fixed before any decision row was seen: rungs k = {ks} percent of the dense MACs "
                f"(seq 128), each removing a further ~{_mac_step(search):.0%} from heads (CAHP's order) and FFN neurons "
                f"(the FFN ranking's order{_aligned_words(search)}) together, nested so a removed unit never returns; "
                "each step's move (heads, neurons or both) is the one whose masked logits stay closest to dense on "
                "calibration rows of the selection split (`search/schedule.json`). Tested in that order and stopped at "
                "the first miss")
    return (f"The ladder, fixed before any accuracy was seen: k = {ks} (every head first, CAHP's knee last), tested in "
            "that order and stopped at the first miss")


def _candidates_table(search: dict[str, Any]) -> list[str]:
    """Every rung tested: what it removed, how it was recovered, how far it moved from dense, its bound."""
    out = [
        "| order | k | heads | MACs removed | before recovery | after (how) | agreement with dense | discordant "
        "(only dense right / only it right) | drop vs dense, points (upper bound) | speedup ceiling (MACs) | seconds | |",
        "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for i, c in enumerate(search["tried"], 1):
        drop, d = c.get("drop"), c.get("details") or {}
        meets = drop["upper"] <= search["max_drop_points"] + 1e-9 if drop else c["accuracy"] >= search["threshold"] - 1e-9
        mark = "**chosen**" if c["k"] == search.get("chosen_k") else ("meets budget" if meets else "misses budget")
        bound = "—" if not drop else f"{drop['drop']:+.2f} (upper {drop['upper']:+.2f})"
        neurons = d.get("neurons_kept")
        how = "dense itself" if d.get("dense_anchor") else (d.get("recovery") or c.get("judged", "recovered"))
        if d.get("move"):
            how += f"; step: {d['move']}"
        dist = d.get("distill")
        if dist and not dist.get("kept"):
            how += (f"; distillation not kept: held-out agreement {dist['agreement_before']:.1%} -> "
                    f"{dist['agreement_after']:.1%}")
        agree = d.get("agreement_after") if c.get("accuracy_after") is not None else d.get("agreement_before")
        macs = d.get("macs_removed")
        out.append(
            f"| {i} | {c['k']} | {d['heads_kept']}{'' if neurons is None else f' (+{neurons} neurons)'} | "
            f"{'—' if macs is None else f'{macs:.0%}'} | {_pct(c['accuracy_before'])} | "
            f"{_pct(c['accuracy_after'])} ({how}) | {'—' if agree is None else f'{agree:.1%}'} | "
            f"{'—' if not drop else '{} / {}'.format(drop['ref_only'], drop['new_only'])} | {bound} | "
            f"{d['flop_ceiling_speedup']:.2f}x | {c['seconds']:.0f} | {mark} |"
        )
    return out


def _rows_section(summary: dict[str, Any]) -> list[str]:
    """What the rows could show, the run's one error rate and its one max length."""
    from cahp_deploy.run.promise import power_words
    from cahp_deploy.serving_length import words as length_words

    out = []
    if summary.get("power"):
        line = power_words(summary["power"])
        out.append(f"- {line[0].upper()}{line[1:]}.")
    rates = (summary.get("confirm") or {}).get("error_rates")
    if rates:
        out.append(f"- One error rate for the whole run, {rates['alpha']:.0%}: {rates['search_alpha']:.0%} for the "
                   f"search's ladder and {rates['ship_alpha']:.0%} for the shipping sequence, both on the decision "
                   f"rows; the confirmation is judged at {rates['confirmation_confidence']:.0%}.")
    if summary.get("max_length"):
        out.append(f"- Every accuracy above was measured at the {length_words(summary['max_length'])}; the "
                   "artifact serves that length (manifest `max_length`).")
    confirm = summary.get("confirm") or {}
    if "int8" in (confirm.get("variants") or {}) or confirm.get("dense_int8"):
        from cahp_deploy.bench.accuracy import SCORING_BATCH

        out.append(f"- INT8 graphs were scored in length-bucketed batches of {SCORING_BATCH}. Dynamic INT8 scales each "
                   "MatMul's input by the whole batch, so a row's label can change with its batch-mates: served in "
                   "other batches, an INT8 graph's accuracy moves by a few tenths of a point (MNLI: 4-5% of labels, "
                   "the drop by up to 0.5; experiments/results/int8 in the cahp-deploy repository).")
    return ["## The rows, the error rate, the length", "", *out, ""] if out else []


def markdown(summary: dict[str, Any]) -> str:
    """``OUT/summary.md``: the headline, the budget search (when there was one), where everything is."""
    lines = ["# cahp-deploy run", ""]
    if summary.get("model"):
        lines += [f"Model: `{summary['model']}`", ""]
    lines += [f"- {line}" for line in headline(summary)] + [""]
    search = summary.get("search")
    if search is not None:
        lines += [
            "## Accuracy budget search",
            "",
            f"Dense (PyTorch) {_pct(search['dense_accuracy'])} on the decision rows; budget "
            f"{points_word(search['max_drop_points'])}: a candidate passes when the {search.get('confidence', 0.9):.0%} "
            f"upper confidence bound of its paired drop vs dense is within it (not the point estimate). "
            f"{_ladder_words(search)}, so that its many looks at the same rows do not inflate the chance of a false pass. The first rung "
            f"removes nothing: it is dense itself, not recovered, and passes any budget the rows can resolve. "
            f"Tested ({search['seconds']:.0f} s in all):",
            "",
            *_candidates_table(search),
            "",
            f"![accuracy vs speedup of every candidate]({search['plot']})",
            "",
            "The speedup ceiling is the dense/pruned ratio of multiply-accumulates at 128 tokens; the "
            "measured speedup of the chosen candidate is in the headline and in report/report.md.",
            "",
        ]
    lines += _rows_section(summary)
    lines += [
        "## Where things are",
        "",
        f"- final pruned model (Hugging Face dir): `{summary.get('final_model')}`",
        "- ONNX artifacts: `artifacts/dense/`, `artifacts/pruned/` (each with manifest.json)",
        "- every benchmark number and plot: `report/report.md`, `report/report.json`",
        "- the shipped variant, its confirmed accuracy change and measured speed: `confirm.json`, `pareto.png`",
        "- what each stage saw and made: `run.json`",
        "",
    ]
    return "\n".join(lines)


__all__ = ["headline", "markdown", "points_word"]
