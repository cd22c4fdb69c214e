"""The ``Selection`` result: which heads (and FFN neurons) to keep, and why. Serialized as selection.json."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from cahp_deploy import schema
from cahp_deploy.errors import CahpError


@dataclass
class Selection:
    """What a selection method decided.

    Attributes
    ----------
    method : registry name of the method (``cahp``, ``gradient``, ...).
    kept_heads : per layer, the kept head indices (original numbering, ascending).
    num_heads_total : heads in the dense model (layers x heads).
    heads_per_layer : heads per layer in the dense model.
    knee : CAHP's k* (None for methods without a knee).
    mss_curve : {k: Mean Simplified Silhouette} of the clustering sweep (empty for baselines).
    seed : the seed every random step used.
    scores : per layer, per head importance (salience for cahp/gradient, attribution, gate
        probabilities...), or None.
    details : method-specific evidence (fitted polynomial, knee fallback, rescued layers, ...).
    params : the options the method ran with.
    timings : seconds per phase.
    provenance : model path and hash, data file hashes, split, number of examples, ranks (``world_size``).
    kept_neurons : per layer, the kept FFN neuron indices (original numbering, ascending), or None
        when the FFN is not pruned.
    neurons_per_layer : FFN neurons per layer in the dense model (None when the FFN is not pruned).
    ffn : how the neurons were chosen (method, budget, per-layer curves and knees, salience summary).
    """

    method: str
    kept_heads: list[list[int]]
    num_heads_total: int
    heads_per_layer: int
    seed: int = 0
    knee: int | None = None
    mss_curve: dict[int, float] = field(default_factory=dict)
    scores: list[list[float]] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    kept_neurons: list[list[int]] | None = None
    neurons_per_layer: int | None = None
    ffn: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kept_heads = [sorted(int(h) for h in layer) for layer in self.kept_heads]
        if self.kept_neurons is not None:
            self.kept_neurons = [sorted(int(n) for n in layer) for layer in self.kept_neurons]
            if self.neurons_per_layer is None:
                raise CahpError("a selection with kept_neurons needs neurons_per_layer (the dense FFN width)")

    @property
    def num_layers(self) -> int:
        return len(self.kept_heads)

    @property
    def num_heads_kept(self) -> int:
        return sum(len(k) for k in self.kept_heads)

    @property
    def num_neurons_kept(self) -> int | None:
        return None if self.kept_neurons is None else sum(len(k) for k in self.kept_neurons)

    @property
    def num_neurons_total(self) -> int | None:
        return None if self.neurons_per_layer is None else self.num_layers * int(self.neurons_per_layer)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        neurons = {
            "kept_neurons": d.pop("kept_neurons"),
            "num_neurons_kept": self.num_neurons_kept,
            "num_neurons_total": self.num_neurons_total,
            "neurons_per_layer": d.pop("neurons_per_layer"),
            "ffn": d.pop("ffn"),
        }
        d = {
            "schema": schema.SELECTION,
            "method": d.pop("method"),
            "num_heads_kept": self.num_heads_kept,
            "num_heads_total": d.pop("num_heads_total"),
            "num_layers": self.num_layers,
            "heads_per_layer": d.pop("heads_per_layer"),
            "kept_heads": d.pop("kept_heads"),
            "knee": d.pop("knee"),
            "seed": d.pop("seed"),
            "mss_curve": {str(k): float(v) for k, v in d.pop("mss_curve").items()},
            **d,
            **neurons,
        }
        return d

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "selection") -> Selection:
        schema.check_schema(d, schema.SELECTION_READABLE, source)
        try:
            return cls(
                method=d["method"],
                kept_heads=d["kept_heads"],
                num_heads_total=int(d["num_heads_total"]),
                heads_per_layer=int(d["heads_per_layer"]),
                seed=int(d.get("seed", 0)),
                knee=d.get("knee"),
                mss_curve={int(k): float(v) for k, v in d.get("mss_curve", {}).items()},
                scores=d.get("scores"),
                details=d.get("details", {}),
                params=d.get("params", {}),
                timings=d.get("timings", {}),
                provenance=d.get("provenance", {}),
                kept_neurons=d.get("kept_neurons"),
                neurons_per_layer=d.get("neurons_per_layer"),
                ffn=d.get("ffn") or {},
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CahpError(f"{source}: malformed selection file ({e})") from e

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Selection:
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise CahpError(f"selection file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise CahpError(f"selection file {path} is not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))
