"""Exact one-sided coverage of the paired drop's upper bound, against the Wald bound it replaced.

Usage: python experiments/paired_coverage.py [--out-dir experiments/results/promise]

No Monte Carlo. n rows; a row is discordant with probability q, and a discordant row is one only the
reference gets right with probability p, so m = b + c ~ Binomial(n, q), b | m ~ Binomial(m, p) and
the true drop is q (2p - 1). Coverage = P(upper >= true drop), summed over every m whose Binomial
mass is not in the 1e-12 tails (what is left out changes a coverage by at most 2e-12) and every b.
The bound depends on (n, b, c) only, so each bound is computed once per n for every count pair.

Three bounds: :func:`cahp_deploy.paired.drop_upper` (Tango's score bound, one row of continuity
correction), the same without the correction, and the old Wald bound (its formula is copied below).
The grid (confidence 0.90): n in {300, 1000, 3000, 10000}, expected discordant rows n*q in
{0.5, 2, 5, 20, 50, 200}, p in {0.3, 0.5, 0.7, 0.9}; then a finer grid (minimum only), and the
minimum at the stricter levels that split error rates give (0.95, 0.975, 0.99), over all drops and
over drops >= 0 (the only ones a false pass of a budget >= 0 can come from). Writes coverage.md and
coverage.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy.stats import beta, binom, norm

from cahp_deploy.paired import METHOD, drop_upper

CONFIDENCE = 0.90
NS = (300, 1000, 3000, 10000)
EXPECTED_DISCORDANT = (0.5, 2, 5, 20, 50, 200)
SHARES = (0.3, 0.5, 0.7, 0.9)
#: the finer grid: minimum coverage only
FINE_NS = (300, 1101, 3000, 10000)
FINE_EXPECTED = tuple(float(x) for x in np.geomspace(0.1, 250, 40).round(3))
FINE_SHARES = tuple(float(x) for x in np.linspace(0.025, 0.975, 39).round(3))
TAIL = 1e-12
#: stricter levels (the finer grid, minimum only): the search and shipping sequences, the INT8 gate's looks
LEVELS = (0.95, 0.975, 0.99)


def wald_upper(n, b, c, confidence):
    """The old bound (points): the paired mean + z * se, se = 1/n when no row disagrees."""
    n, b, c = (np.asarray(v, dtype=float) for v in (n, b, c))
    mean = (b - c) / n
    var = np.maximum((b + c) / n - mean * mean, 0.0)
    se = np.where(b + c > 0, np.sqrt(var / n), 1.0 / n)
    return 100.0 * (mean + float(norm.ppf(confidence)) * se)


BOUNDS = {
    "new": lambda n, b, c, conf: drop_upper(n, b, c, conf),
    "score_uncorrected": lambda n, b, c, conf: drop_upper(n, b, c, conf, continuity=0.0),
    "wald": wald_upper,
}


def _m_range(n: int, q: float) -> tuple[int, int]:
    return int(binom.ppf(TAIL, n, q)), int(binom.isf(TAIL, n, q)) + 1


def bound_tables(n: int, max_m: int, confidence: float) -> dict[str, np.ndarray]:
    """name -> (max_m + 1, max_m + 1) upper bounds in points at [b, c] (b + c <= max_m; 0 elsewhere)."""
    b, c = np.meshgrid(np.arange(max_m + 1), np.arange(max_m + 1), indexing="ij")
    ok = b + c <= min(max_m, n)
    bb, cc = b[ok], c[ok]
    out = {}
    for name, fn in BOUNDS.items():
        table = np.zeros(b.shape)
        table[ok] = fn(n, bb, cc, confidence)
        out[name] = table
    return out


def coverage(n: int, nq: float, p: float, tables: dict[str, np.ndarray]) -> tuple[float, dict[str, float]]:
    """(true drop in points, name -> exact P(upper >= true drop))."""
    q = nq / n
    delta = 100.0 * q * (2.0 * p - 1.0)
    lo, hi = _m_range(n, q)
    m = np.arange(lo, min(hi, n) + 1)[:, None]
    b = np.arange(m.max() + 1)[None, :]
    valid = b <= m
    weight = binom.pmf(m, n, q) * np.where(valid, binom.pmf(b, m, p), 0.0)
    bi, ci = np.broadcast_arrays(b, np.where(valid, m - b, 0))
    return delta, {name: float(weight[(t[bi, ci] >= delta) & valid].sum()) for name, t in tables.items()}


def _max_m(ns, expected) -> dict[int, int]:
    return {n: max(min(_m_range(n, min(e / n, 1.0))[1], n) for e in expected) for n in ns}


def run_grid(ns, expected, shares, confidence) -> list[dict]:
    rows = []
    for n, max_m in _max_m(ns, expected).items():
        tables = bound_tables(n, max_m, confidence)
        for nq in expected:
            for p in shares:
                delta, cov = coverage(n, nq, p, tables)
                rows.append({"n": n, "nq": nq, "p": p, "true_drop": delta,
                             **{f"coverage_{k}": v for k, v in cov.items()}})
    return rows


def minimum(rows: list[dict], name: str) -> dict:
    worst = min(rows, key=lambda r: r[f"coverage_{name}"])
    return {"coverage": worst[f"coverage_{name}"], "n": worst["n"], "nq": worst["nq"], "p": worst["p"],
            "true_drop": worst["true_drop"]}


def examples() -> list[dict]:
    """The bounds (points, 90%) the issue quotes: 0 and 1 disagreement in 1,101 rows, and 46 vs 34."""
    out = []
    for b, c in ((0, 0), (1, 0), (46, 34)):
        out.append({
            "n": 1101, "ref_only": b, "new_only": c,
            "wald": float(wald_upper(1101, b, c, CONFIDENCE)), "new": drop_upper(1101, b, c, CONFIDENCE),
            # the exact (Clopper-Pearson) bound of the only-reference-right rate, which caps the drop
            "exact_ref_only_rate": float(100 * beta.ppf(CONFIDENCE, b + 1, 1101 - b)),
        })
    return out


def _markdown(result: dict) -> str:
    lines = [
        "# Exact one-sided coverage of the paired drop's upper bound",
        "",
        f"`python experiments/paired_coverage.py` ({result['seconds']:.0f} s on one core). Confidence "
        f"{CONFIDENCE:.0%}; `new` is `{METHOD}` (`cahp_deploy.paired.drop_upper`: Tango's score bound, "
        "one row of continuity correction), `score` the same bound uncorrected, `wald` the bound it "
        "replaced (paired mean + z * se, se = 1/n with no disagreement). n rows, n*q expected discordant "
        "rows, p the share of discordant rows only the reference gets right; true drop = q (2p - 1), in "
        "points. Coverage = P(upper >= true drop), exact (enumerated, no simulation).",
        "",
        "| n | n*q | p | true drop | coverage new | coverage Wald | coverage score (uncorrected) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["grid"]:
        lines.append(f"| {r['n']} | {r['nq']:g} | {r['p']:g} | {r['true_drop']:+.4f} | {r['coverage_new']:.4f} | "
                     f"{r['coverage_wald']:.4f} | {r['coverage_score_uncorrected']:.4f} |")
    lines.append("")

    def worst(m: dict) -> str:
        return f"**{m['coverage']:.4f}** (n={m['n']}, n*q={m['nq']:g}, p={m['p']:g}, true drop {m['true_drop']:+.3f})"

    for key, label in (("minimum", "this grid"), ("minimum_fine", "the finer grid")):
        m = result[key]
        lines.append(f"Minimum coverage on {label}: new {worst(m['new'])}; Wald {worst(m['wald'])}; "
                     f"uncorrected score {worst(m['score_uncorrected'])}.")
        lines.append("")
    fine = result["fine_grid"]
    lines.append(f"The finer grid: n in {fine['ns']}, {len(fine['expected'])} values of n*q from "
                 f"{fine['expected'][0]:g} to {fine['expected'][-1]:g} (log-spaced), p from {fine['shares'][0]:g} "
                 f"to {fine['shares'][-1]:g} in steps of 0.025.")
    lines.append("")
    lines.append("Stricter levels (the search's and the shipping sequence's share of the error rate, the "
                 "INT8 gate's looks), on the finer grid; a false pass of a budget >= 0 needs a true drop >= 0:")
    lines.append("")
    for level, m in result["minimum_levels"].items():
        lines.append(f"- {float(level):.1%}: new {worst(m['all']['new'])}, over drops >= 0 "
                     f"{worst(m['drops_at_least_0']['new'])}; Wald {worst(m['all']['wald'])}.")
    lines += ["", "Example upper bounds (points, 90%, 1,101 rows):", "",
              "| only ref right | only new right | Wald (old) | new | exact bound of the only-ref-right rate |",
              "|---|---|---|---|---|"]
    for e in result["examples"]:
        lines.append(f"| {e['ref_only']} | {e['new_only']} | {e['wald']:.3f} | {e['new']:.3f} | "
                     f"{e['exact_ref_only_rate']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results" / "promise")
    args = ap.parse_args()
    start = time.perf_counter()
    names = list(BOUNDS)
    grid = run_grid(NS, EXPECTED_DISCORDANT, SHARES, CONFIDENCE)
    fine = run_grid(FINE_NS, FINE_EXPECTED, FINE_SHARES, CONFIDENCE)
    levels = {}
    for level in LEVELS:
        rows = run_grid(FINE_NS, FINE_EXPECTED, FINE_SHARES, level)
        worse = [r for r in rows if r["true_drop"] >= 0]
        levels[str(level)] = {"all": {k: minimum(rows, k) for k in names},
                              "drops_at_least_0": {k: minimum(worse, k) for k in names}}
    result = {
        "confidence": CONFIDENCE, "method": METHOD, "tail_left_out": TAIL,
        "grid": grid, "minimum": {k: minimum(grid, k) for k in names},
        "fine_grid": {"ns": list(FINE_NS), "expected": list(FINE_EXPECTED), "shares": list(FINE_SHARES)},
        "minimum_fine": {k: minimum(fine, k) for k in names},
        "minimum_levels": levels, "examples": examples(),
    }
    result["seconds"] = time.perf_counter() - start
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "coverage.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out_dir / "coverage.md").write_text(_markdown(result))
    for key in ("minimum", "minimum_fine"):
        print(key, {k: round(v["coverage"], 4) for k, v in result[key].items()})
    for e in result["examples"]:
        print(f"b={e['ref_only']} c={e['new_only']} of 1101: Wald {e['wald']:.3f}, new {e['new']:.3f} points "
              f"(exact bound of the only-ref-right rate {e['exact_ref_only_rate']:.3f})")
    print(f"{result['seconds']:.0f} s -> {args.out_dir}")


if __name__ == "__main__":
    main()
