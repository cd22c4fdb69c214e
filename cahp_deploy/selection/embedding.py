"""The space heads are clustered in: a 2-D t-SNE of their profiles (the paper) or the profiles themselves.

CAHP, step 3. The reference code embeds the (N, P*D) JM profiles with scikit-learn's t-SNE
(2 components, perplexity 10, 1000 iterations, fixed seed; other settings at scikit-learn's
defaults: PCA initialisation, automatic learning rate, Barnes-Hut). ``space="full"`` skips t-SNE and
clusters the profiles directly, for users who do not want t-SNE's dependence on its seed.
"""

from __future__ import annotations

import numpy as np

from cahp_deploy.errors import CahpError

SPACES = ("tsne", "full")
#: The reference code's t-SNE settings.
TSNE_PERPLEXITY = 10.0
TSNE_MAX_ITER = 1000


def tsne_perplexity(num_points: int, perplexity: float = TSNE_PERPLEXITY) -> float:
    """t-SNE needs perplexity < number of points; small models (< 11 heads) get N - 1."""
    return float(min(perplexity, num_points - 1))


def embed_tsne(profiles: np.ndarray, seed: int, perplexity: float = TSNE_PERPLEXITY) -> np.ndarray:
    """(N, F) profiles -> (N, 2) float64 t-SNE coordinates, deterministic for a given seed."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = profiles.shape[0]
    if n < 3:
        raise CahpError(f"t-SNE needs at least 3 heads, got {n}")
    tsne = TSNE(
        n_components=2,
        perplexity=tsne_perplexity(n, perplexity),
        max_iter=TSNE_MAX_ITER,
        random_state=seed,
    )
    # One thread: for ~100 points threads only add synchronisation (on a busy machine, seconds of
    # it), and the result then cannot depend on the machine's core count.
    with threadpool_limits(limits=1):
        return np.asarray(tsne.fit_transform(np.asarray(profiles, dtype=np.float32)), dtype=np.float64)


def clustering_space(profiles: np.ndarray, space: str, seed: int) -> np.ndarray:
    """The (N, dims) points the clustering sweep runs on, for ``space`` in :data:`SPACES`."""
    if space == "tsne":
        return embed_tsne(profiles, seed)
    if space == "full":
        return np.asarray(profiles, dtype=np.float64)
    raise CahpError(f"unknown clustering space {space!r}; choose from {', '.join(SPACES)}")


__all__ = ["SPACES", "TSNE_MAX_ITER", "TSNE_PERPLEXITY", "clustering_space", "embed_tsne", "tsne_perplexity"]
