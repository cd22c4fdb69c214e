"""How stable is CAHP's knee? k* and the kept heads under other polynomial degrees and seeds.

The paper leaves this open; the study answers it from one :class:`~cahp_deploy.methods.cahp.CahpEvidence`
(signatures and salience are collected once, the model is never run again):

* degree d: same clustering space and sweep, knee refitted with a degree-d polynomial;
* seed s: the clustering space (t-SNE) *and* the FasterPAM sweep redone with seed s, as
  ``cahp-deploy select --seed s`` would do; in ``full`` space there is no t-SNE, so s only moves
  FasterPAM's initial medoids;
* ``full`` space: the same two scans with clustering on the JM profiles themselves.

Each variant is compared with its space's default (the evidence's degree and seed) by k*, heads kept
and the Jaccard overlap |A ∩ B| / |A ∪ B| of the kept (layer, head) sets.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from cahp_deploy.methods.cahp import CahpEvidence, select_at
from cahp_deploy.selection.clustering import distance_matrix, mss_sweep
from cahp_deploy.selection.embedding import clustering_space
from cahp_deploy.selection.knee import find_knee


def jaccard(a: list[list[int]], b: list[list[int]]) -> float:
    """Jaccard overlap of two kept-head layouts (per layer lists of head indices); 1.0 if both empty."""
    sa = {(layer, h) for layer, heads in enumerate(a) for h in heads}
    sb = {(layer, h) for layer, heads in enumerate(b) for h in heads}
    union = sa | sb
    return 1.0 if not union else len(sa & sb) / len(union)


def with_degree(evidence: CahpEvidence, degree: int) -> CahpEvidence:
    """The same evidence with the knee refitted at ``degree`` (the sweep is reused)."""
    knee = find_knee(evidence.sweep.ks, evidence.sweep.mss, degree)
    return replace(evidence, knee=knee, options={**evidence.options, "degree": int(degree)})


def with_space_and_seed(evidence: CahpEvidence, space: str, seed: int) -> CahpEvidence:
    """The evidence re-embedded in ``space`` with ``seed`` and re-swept (profiles and salience reused)."""
    points = clustering_space(evidence.profiles, space, seed)
    distances = distance_matrix(points)
    sweep = mss_sweep(distances, seed)
    knee = find_knee(sweep.ks, sweep.mss, evidence.options["degree"])
    return replace(evidence, points=points, distances=distances, sweep=sweep, knee=knee, seed=int(seed),
                   options={**evidence.options, "space": space})


def _row(variant: CahpEvidence, reference_kept: list[list[int]], **what) -> dict[str, Any]:
    sel = select_at(variant, variant.knee.k)
    return {
        **what,
        "k_star": int(variant.knee.k),
        "knee_method": variant.knee.method,
        "heads_kept": sel.num_heads_kept,
        "heads_per_layer_kept": [len(k) for k in sel.kept_heads],
        "kept_heads": sel.kept_heads,
        "jaccard_vs_default": jaccard(sel.kept_heads, reference_kept),
    }


def knee_sensitivity(
    evidence: CahpEvidence,
    degrees: list[int],
    seeds: list[int],
    spaces: tuple[str, ...] = ("tsne", "full"),
) -> dict[str, Any]:
    """k* and the kept set for each degree and each seed, in each space, against that space's default.

    Returns ``{"default": {...}, "<space>": {"default": row, "degree": [rows], "seed": [rows]},
    "jaccard_between_space_defaults": float | None}``.
    """
    base_space = evidence.options["space"]
    out: dict[str, Any] = {
        "default": {"space": base_space, "degree": int(evidence.options["degree"]), "seed": int(evidence.seed)},
    }
    defaults: dict[str, list[list[int]]] = {}
    for space in spaces:
        base = evidence if space == base_space else with_space_and_seed(evidence, space, evidence.seed)
        ref = select_at(base, base.knee.k).kept_heads
        defaults[space] = ref
        out[space] = {
            "default": _row(base, ref, space=space, degree=int(base.options["degree"]), seed=int(base.seed)),
            "degree": [_row(with_degree(base, d), ref, space=space, degree=int(d), seed=int(base.seed))
                       for d in degrees],
            "seed": [_row(with_space_and_seed(base, space, s), ref, space=space,
                          degree=int(base.options["degree"]), seed=int(s)) for s in seeds],
        }
    out["jaccard_between_space_defaults"] = (
        jaccard(defaults["tsne"], defaults["full"]) if {"tsne", "full"} <= defaults.keys() else None
    )
    return out


__all__ = ["jaccard", "knee_sensitivity", "with_degree", "with_space_and_seed"]
