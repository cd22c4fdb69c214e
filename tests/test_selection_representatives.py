"""Representatives, the per-layer guard, and CAHP's pure core on planted structure."""

from __future__ import annotations

import numpy as np
import pytest

from cahp_deploy.errors import CahpError
from cahp_deploy.selection.clustering import Clustering, distance_matrix, mss_sweep
from cahp_deploy.selection.embedding import clustering_space
from cahp_deploy.selection.knee import find_knee
from cahp_deploy.selection.representatives import (
    cluster_representatives,
    guard_layers,
    split_by_layer,
    to_global,
)


def test_salience_representative_is_the_most_salient_member():
    c = Clustering(labels=np.array([0, 1, 0, 1, 0]), medoids=np.array([0, 3]))
    sal = np.array([0.1, 0.9, 0.5, 0.2, 0.5])
    assert cluster_representatives(c, sal) == [2, 1]  # tie 0.5 at heads 2 and 4: the lower index
    assert cluster_representatives(c, sal, "medoid") == [0, 3]
    with pytest.raises(CahpError, match="salience vector"):
        cluster_representatives(c, None)
    with pytest.raises(CahpError, match="unknown representative"):
        cluster_representatives(c, sal, "best")


def test_split_by_layer_and_global_numbering():
    assert split_by_layer([5, 0, 3, 11], [4, 4, 4]) == [[0, 3], [1], [3]]
    assert to_global(2, 1, [4, 4, 4]) == 9
    with pytest.raises(CahpError, match="outside"):
        split_by_layer([12], [4, 4, 4])


def test_guard_rescues_the_most_salient_head_of_empty_layers():
    kept, rescued = guard_layers([[1], [], [0, 2]], [[0.1, 0.9, 0.0], [0.3, 0.8, 0.8], [1, 1, 1]])
    assert kept == [[1], [1], [0, 2]] and rescued == [1]
    assert guard_layers([[0], [2]], [[1.0], [0, 0, 1]]) == ([[0], [2]], [])


@pytest.mark.parametrize("space", ["full", "tsne"])
@pytest.mark.parametrize("groups", [3, 4, 5])
def test_planted_groups_give_k_star_equal_to_the_number_of_groups(space, groups):
    """Profiles drawn from K well-separated groups: k* = K and one representative per group.

    Raw Kneedle (degree 0) recovers K exactly; the reference's degree-6 smoothing rounds the step
    and lands at most two k later (documented in selection/knee.py).
    """
    rng = np.random.default_rng(groups)
    n = 24
    group = rng.permutation(np.arange(n) % groups)
    centers = rng.normal(size=(groups, 64)) * 10
    profiles = (centers[group] + rng.normal(size=(n, 64)) * 0.3).astype(np.float32)
    points = clustering_space(profiles, space, seed=42)
    dist = distance_matrix(points)
    sweep = mss_sweep(dist, seed=42)
    knee = find_knee(sweep.ks, sweep.mss, degree=0)
    assert knee.k == groups
    assert groups <= find_knee(sweep.ks, sweep.mss, degree=6).k <= groups + 2
    salience = rng.random(n)
    reps = cluster_representatives(sweep.clusterings[knee.k], salience)
    assert sorted(group[reps]) == list(range(groups))  # one per planted group
    for r in reps:  # and it is that group's most salient head
        assert salience[r] == salience[group == group[r]].max()
