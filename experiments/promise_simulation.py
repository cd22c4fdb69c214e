"""The whole run's false-pass rate, simulated (issue #27): the complete decision logic, today's and the old.

Every candidate rung and both INT8 graphs sit exactly at the budget (the worst case), so anything
shipped but the exact dense graph is a false pass; its rate must be at most alpha = 1 - confidence.
Writes experiments/results/promise/simulation.md.

    python experiments/promise_simulation.py [TRIALS]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from cahp_deploy.run.promise_simulation import Scenario, false_pass_rate

SCENARIOS = {
    "SST-5 decision rows (1,101), 8% disagreement, budget 1": Scenario(),
    "MNLI decision rows (5,000), 10% disagreement, budget 1": Scenario(rows=5000, dense_accuracy=0.67, disagreement=0.10),
    "a held-out 62% of SST-5 validation (683), 6% disagreement, budget 2": Scenario(rows=683, disagreement=0.06, max_drop=2.0),
    "SST-5, 4% disagreement, budget 0.5": Scenario(disagreement=0.04, max_drop=0.5),
}


def main(trials: int) -> None:
    lines = ["# The whole run's false-pass rate, simulated", "",
             f"`python experiments/promise_simulation.py {trials}`: {trials:,} simulated runs per cell "
             "(`cahp_deploy/run/promise_simulation.py`), confidence 0.9 (alpha 10%). Every rung below the dense "
             "anchor and both INT8 graphs lose exactly the budget; a run that ships anything but the exact dense "
             "graph is a false pass. *Today*: the ladder and the shipping sequence each at alpha/2; *old*: each at "
             "alpha (two fixed sequences on the same decision rows).", "",
             "| scenario | today | old (two sequences) | simulation standard error |", "|---|---:|---:|---:|"]
    start = time.perf_counter()
    for name, s in SCENARIOS.items():
        now, old = false_pass_rate(trials, s, seed=1), false_pass_rate(trials, s, two_sequences=True, seed=1)
        se = (max(now, 1e-9) * (1 - now) / trials) ** 0.5
        lines.append(f"| {name} | **{now:.2%}** | {old:.2%} | {se:.2%} |")
        print(lines[-1], flush=True)
    lines += ["", f"({time.perf_counter() - start:.0f} s)", ""]
    out = Path(__file__).parent / "results" / "promise" / "simulation.md"
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
