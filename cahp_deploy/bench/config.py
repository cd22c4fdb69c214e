"""The bench stage's options, declared once (:mod:`cahp_deploy.config`): ``cahp-deploy bench`` and ``run``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cahp_deploy.config import StageConfig, int_tuple, option

#: every variant an artifact can have; what a deployment chooses between (the plain fp32 graph computes
#: what the optimized one does, slower)
VARIANTS: tuple[str, ...] = ("fp32", "optimized", "int8", "fp16")
DEPLOYED: tuple[str, ...] = ("optimized", "int8", "fp16")
DEFAULT_MIN_SECONDS = 1.0
DEFAULT_MIN_REPS = 10
DEFAULT_WARMUP = 3
DEFAULT_TRAFFIC_SEQUENCES = 512
#: one latency-bound and one throughput-bound shape at a typical length
DEFAULT_BATCHES = (1, 32)
DEFAULT_SEQS = (128,)


@dataclass(frozen=True)
class BenchConfig(StageConfig):
    """Where and what to time, and how long."""

    provider: str = option("cpu", "ONNX Runtime execution provider.", choices=("cpu", "cuda", "tensorrt"))
    variants: tuple[str, ...] = option((), "Variant to time (repeatable) [what a deployment chooses between: "
                                       "optimized and int8 where present, fp16 off the CPU; the baseline's fp32 always].",
                                       name="--variant", dest="variants", choices=VARIANTS,
                                       multiple=True)
    batch: tuple[int, ...] = option(DEFAULT_BATCHES, "Batch sizes of the fixed grid, e.g. 1,8,32.", parse=int_tuple)
    seq: tuple[int, ...] = option(DEFAULT_SEQS, "Sequence lengths of the fixed grid, e.g. 32,128,512.", parse=int_tuple)
    traffic: bool = option(True, "Skip real-traffic mode (batches drawn from --data).", only_off="--no-traffic")
    traffic_sequences: int = option(DEFAULT_TRAFFIC_SEQUENCES, "Real traffic: sequences drawn from --data per batch "
                                    "size.", type=int, run_name=None)
    threads: int | None = option(None, "ONNX Runtime intra-op threads [one per physical core].", type=int)
    min_seconds: float = option(DEFAULT_MIN_SECONDS, "Timed seconds per session per cell, at least.", type=float)
    min_reps: int = option(DEFAULT_MIN_REPS, "Timed repetitions per session per cell, at least.", type=int)
    warmup: int = option(DEFAULT_WARMUP, "Untimed runs per session per cell.", type=int)
    seed: int = 0

    def check(self) -> None:
        self._positive("threads", "min_reps", "traffic_sequences")
        self._at_least_zero("min_seconds", "warmup")

    def kwargs(self) -> dict[str, Any]:
        """:func:`cahp_deploy.bench.bench`'s options."""
        return {"provider": self.provider, "variants": list(self.variants) or None, "batches": self.batch,
                "seqs": self.seq, "traffic": self.traffic, "traffic_sequences": self.traffic_sequences,
                "threads": self.threads, "min_seconds": self.min_seconds, "min_reps": self.min_reps,
                "warmup": self.warmup, "seed": self.seed}


__all__ = ["DEPLOYED", "VARIANTS", "BenchConfig", "DEFAULT_BATCHES", "DEFAULT_MIN_REPS", "DEFAULT_MIN_SECONDS", "DEFAULT_SEQS",
           "DEFAULT_TRAFFIC_SEQUENCES", "DEFAULT_WARMUP"]
