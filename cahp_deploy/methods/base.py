"""The contract every selection method meets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn

from cahp_deploy.data import LabelledData
from cahp_deploy.selection.result import Selection


@dataclass
class MethodContext:
    """Everything a method may use. The model is dense, float32, eval mode, eager attention.

    ``budget`` is the number of heads to keep (None: the method decides, as CAHP and L0 can).
    ``options`` holds method-specific CLI options (``degree``, ``pool_size``, ``steps``...), with the
    method supplying defaults for anything absent. ``progress`` is a ``rich.progress.Progress`` or None.
    """

    model: nn.Module
    tokenizer: Any
    data: LabelledData
    budget: int | None = None
    seed: int = 42
    options: dict[str, Any] = field(default_factory=dict)
    progress: Any = None


class Method(Protocol):
    def __call__(self, ctx: MethodContext) -> Selection: ...
