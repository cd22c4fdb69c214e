"""FFN neuron selection (``--ffn-method``): which intermediate units of each layer to keep.

Three methods over the same evidence (:class:`cahp_deploy.signals.ffn.FfnStats`):

* ``cahp``: complementary neurons (:mod:`cahp_deploy.selection.neurons`): per layer, cluster the JM
  profiles, keep the most salient neuron of each cluster. Budget shares per layer come from salience;
  without a budget, each layer's MSS knee decides.
* ``gradient``: the global top-N by first-order Taylor salience.
* ``random``: N neurons uniformly at random (seeded), with the same one-per-layer guard.

All three keep at least one neuron per layer unless ``allow_empty_layers``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from cahp_deploy.errors import CahpError
from cahp_deploy.selection import neurons as nsel
from cahp_deploy.selection.separability import jm_profiles

FFN_METHODS = ("cahp", "gradient", "random")


def needs_evidence(method: str) -> bool:
    return method in ("cahp", "gradient")


def check_method(method: str, budget: int | None) -> None:
    if method not in FFN_METHODS:
        raise CahpError(f"unknown --ffn-method {method!r}; choose from {', '.join(FFN_METHODS)}")
    if budget is None and method != "cahp":
        raise CahpError(f"--ffn-method {method} needs a budget: give --ffn-neurons or --ffn-keep-ratio")


def select_neurons(stats, method: str, budget: int | None, num_layers: int, intermediate: int, seed: int,
                   allow_empty_layers: bool = False, degree: int = 6) -> tuple[list[list[int]], dict[str, Any]]:
    """Kept neurons per layer (original indices, ascending) and the evidence behind them.

    ``stats`` is an :class:`~cahp_deploy.signals.ffn.FfnStats` (None is fine for ``random``).
    """
    check_method(method, budget)
    start = time.perf_counter()
    details: dict[str, Any] = {"method": method, "budget": budget, "allow_empty_layers": bool(allow_empty_layers),
                               "seed": int(seed)}
    if method == "random":
        scores = np.random.default_rng(seed).random((num_layers, intermediate))
        kept = nsel.allocate(scores, budget, allow_empty_layers)
        details["timings"] = {"select": time.perf_counter() - start}
        return kept, details
    if stats is None or stats.salience is None:
        raise CahpError(f"--ffn-method {method} needs FFN salience; it was not collected")
    salience = np.asarray(stats.salience, dtype=np.float64).reshape(num_layers, intermediate)
    details["salience_examples"] = int(stats.salience_examples)
    details["salience_per_layer"] = [round(float(s), 6) for s in salience.sum(axis=1)]
    if method == "gradient":
        kept = nsel.allocate(salience, budget, allow_empty_layers)
        details["timings"] = {"select": time.perf_counter() - start}
        return kept, details

    profiles = jm_profiles(stats.mean, stats.var, stats.counts).reshape(num_layers, intermediate, -1)
    details["profile_dim"] = int(profiles.shape[-1])
    if budget is not None:
        counts = [len(k) for k in nsel.allocate(salience, budget, allow_empty_layers)]
        details["k_from"] = "budget"
    else:
        knees = [nsel.layer_knee(profiles[i], seed, degree) for i in range(num_layers)]
        counts = [k.k for k in knees]
        details["k_from"] = "knee"
        details["layer_knees"] = [k.to_dict() for k in knees]
    kept = [nsel.complementary(profiles[i], salience[i], counts[i], seed) for i in range(num_layers)]
    if not allow_empty_layers:
        kept = [k if k else [int(np.argmax(salience[i]))] for i, k in enumerate(kept)]
    details["clusters_per_layer"] = counts
    details["timings"] = {"select": time.perf_counter() - start}
    return kept, details


__all__ = ["FFN_METHODS", "check_method", "needs_evidence", "select_neurons"]
