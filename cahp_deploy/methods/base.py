"""The contract every selection method meets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from torch import nn

from cahp_deploy.data import LabelledData
from cahp_deploy.errors import CahpError
from cahp_deploy.selection.result import Selection
from cahp_deploy.selection.topk import keep_top_k


@dataclass
class MethodContext:
    """Everything a method may use. The model is dense, float32, eval mode, eager attention.

    ``budget`` is the number of heads to keep (None: the method decides, as CAHP and L0 can).
    ``options`` holds method-specific CLI options (``degree``, ``pool_size``, ``steps``...), with the
    method supplying defaults for anything absent. ``progress`` is a ``rich.progress.Progress`` or None.
    ``ffn`` is an entered :class:`~cahp_deploy.signals.ffn.FfnCollector` or None: a method whose module
    sets ``FEEDS_FFN = True`` (CAHP) feeds it from its own passes over the data, so FFN neurons cost no
    extra pass.
    """

    model: nn.Module
    tokenizer: Any
    data: LabelledData
    budget: int | None = None
    seed: int = 42
    options: dict[str, Any] = field(default_factory=dict)
    progress: Any = None
    ffn: Any = None


class Method(Protocol):
    def __call__(self, ctx: MethodContext) -> Selection: ...


def top_k_selection(method: str, ctx: MethodContext, scores: np.ndarray, params: dict[str, Any] | None = None,
                    timings: dict[str, float] | None = None) -> Selection:
    """The budget's top-scoring heads of a (layers, heads) score grid, each layer keeping one unless
    ``allow_empty_layers``: how every score-ranking baseline turns its scores into a Selection."""
    if ctx.budget is None:
        raise CahpError(f"--method {method} needs a budget: give --heads, --keep-ratio or --budget-from")
    allow_empty = bool(ctx.options.get("allow_empty_layers", False))
    n_layers, n_heads = scores.shape
    return Selection(
        method=method,
        kept_heads=keep_top_k(scores, ctx.budget, min_per_layer=0 if allow_empty else 1),
        num_heads_total=n_layers * n_heads,
        heads_per_layer=n_heads,
        seed=ctx.seed,
        scores=scores.tolist(),
        details={"budget": int(ctx.budget)},
        params={**(params or {}), "allow_empty_layers": allow_empty},
        timings=timings or {},
    )
