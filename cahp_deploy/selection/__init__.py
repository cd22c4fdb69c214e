"""Pure selection math: numpy / scipy / scikit-learn / kmedoids / kneed, no torch, no file I/O.

Every method returns a :class:`Selection`. CAHP's steps (JM profiles, clustering sweep, MSS, knee,
representatives) are plain functions over arrays, tested without torch.
"""

from cahp_deploy.selection.result import Selection
from cahp_deploy.selection.topk import keep_top_k

__all__ = ["Selection", "keep_top_k"]
