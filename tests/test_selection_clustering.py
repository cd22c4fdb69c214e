"""FasterPAM sweep and the Mean Simplified Silhouette, on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from cahp_deploy.errors import CahpError
from cahp_deploy.selection.clustering import (
    Clustering,
    distance_matrix,
    fasterpam,
    mean_simplified_silhouette,
    mss_sweep,
)


def _line(*xs):
    return distance_matrix(np.array(xs, dtype=float)[:, None])


def test_mss_two_clusters_by_hand():
    # points 0, 1 | 10, 12 with medoids 0 and 10 (indices 0 and 2)
    # point 1: a = 1, b = 9  -> 8/9;  point 3: a = 2, b = 12 -> 10/12; medoids (a = 0) are left out
    d = _line(0, 1, 10, 12)
    c = Clustering(labels=np.array([0, 0, 1, 1]), medoids=np.array([0, 2]))
    assert mean_simplified_silhouette(d, c) == pytest.approx((8 / 9 + 10 / 12) / 2)


def test_mss_b_is_the_mean_over_other_medoids():
    # points 0, 1, 5, 10; medoids 0, 5, 10. point 1: a = 1, b = mean(4, 9) = 6.5 -> 5.5/6.5
    # (the nearest-medoid convention would give (4 - 1)/4 = 0.75)
    d = _line(0, 1, 5, 10)
    c = Clustering(labels=np.array([0, 0, 1, 2]), medoids=np.array([0, 2, 3]))
    assert mean_simplified_silhouette(d, c) == pytest.approx(5.5 / 6.5)


def test_mss_is_one_when_every_point_sits_on_its_medoid():
    d = _line(0, 0, 7, 7)
    c = Clustering(labels=np.array([0, 0, 1, 1]), medoids=np.array([0, 2]))
    assert mean_simplified_silhouette(d, c) == 1.0


def test_mss_needs_two_clusters():
    with pytest.raises(CahpError, match="at least 2 clusters"):
        mean_simplified_silhouette(_line(0, 1), Clustering(np.array([0, 0]), np.array([0])))


def test_fasterpam_finds_obvious_groups_and_is_seeded():
    d = _line(0, 0.1, 0.2, 50, 50.1, 100, 100.2)
    c = fasterpam(d, 3, seed=1)
    groups = [set(np.flatnonzero(c.labels == i)) for i in range(3)]
    assert sorted(map(sorted, groups)) == [[0, 1, 2], [3, 4], [5, 6]]
    again = fasterpam(d, 3, seed=1)
    assert np.array_equal(c.labels, again.labels) and np.array_equal(c.medoids, again.medoids)
    assert fasterpam(d, 7, seed=0).k == 7
    with pytest.raises(CahpError, match="cannot form 8 clusters"):
        fasterpam(d, 8, seed=0)


def test_sweep_stops_once_mss_reaches_one_and_fills_the_rest():
    # three exact duplicates groups: k = 3 puts every point on its medoid
    d = _line(0, 0, 0, 5, 5, 9, 9, 9)
    sweep = mss_sweep(d, seed=0)
    assert sweep.ks == list(range(2, 8))
    assert sweep.stopped_at == 3
    assert sweep.mss[0] < 1.0 and sweep.mss[1:] == [1.0] * 5
    assert set(sweep.clusterings) == {2, 3}


def test_sweep_rejects_too_few_points():
    with pytest.raises(CahpError, match="N-1"):
        mss_sweep(_line(0, 1), seed=0)
