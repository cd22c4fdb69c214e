"""Latency measurement: warm-up, then interleaved repetitions until enough samples and enough time.

Machine noise (another process, frequency scaling, a page-cache flush) comes in bursts. Timing every
session of one cell round-robin, rather than one session after another, spreads a burst over all of
them alike, so ratios between sessions (the speedups) stay honest even on a busy machine::

    round 0:  A B C      round 1:  B C A      round 2:  C A B   ...

The start rotates so that no session always runs right after the same neighbour (cache effects).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence

import numpy as np

from cahp_deploy.errors import CahpError


def check_budget(min_reps: int, min_seconds: float, warmup: int) -> None:
    if not isinstance(min_reps, int) or min_reps < 1:
        raise CahpError(f"min_reps must be a positive integer, got {min_reps!r}")
    if not min_seconds >= 0:
        raise CahpError(f"--min-seconds must be >= 0, got {min_seconds!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise CahpError(f"warmup must be a non-negative integer, got {warmup!r}")


def time_round_robin(
    runners: Sequence[Callable[[int], object]],
    num_feeds: int,
    *,
    warmup: int,
    min_reps: int,
    min_seconds: float,
    on_round: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Seconds of every repetition of every runner; ``runners[j](i)`` runs feed ``i``.

    Round ``k`` runs feed ``k % num_feeds`` on every runner, so all runners see the same inputs in
    the same order. It stops after the round in which every runner has at least ``min_reps``
    repetitions *and* at least ``min_seconds`` of timed work (the fastest runner decides, so each
    gets at least that much), and never before every feed has been timed once.

    The garbage collector is paused while timing: a collection inside one repetition would be
    charged to whichever session happened to be running.
    """
    n = len(runners)
    for w in range(warmup):
        for run in runners:
            run(w % num_feeds)
    samples: list[list[float]] = [[] for _ in range(n)]
    totals = [0.0] * n
    need_reps = max(min_reps, num_feeds)
    clock = time.perf_counter
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        k = 0
        while True:
            feed = k % num_feeds
            for j in range(n):
                idx = (j + k) % n
                start = clock()
                runners[idx](feed)
                dt = clock() - start
                samples[idx].append(dt)
                totals[idx] += dt
            k += 1
            if on_round is not None:
                on_round(k)
            if k >= need_reps and min(totals) >= min_seconds:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return [np.asarray(s, dtype=np.float64) for s in samples]


def summarize(seconds: np.ndarray, sequences: np.ndarray | int) -> dict:
    """Latency statistics in milliseconds and throughput in sequences per second.

    ``sequences`` is the batch size (fixed grid) or, per repetition, the number of sequences in the
    batch that was run (real traffic). Throughput is total sequences over total time, not the mean of
    per-repetition rates, which would overweight the fast small batches.
    """
    seconds = np.asarray(seconds, dtype=np.float64)
    seqs = np.broadcast_to(np.asarray(sequences, dtype=np.float64), seconds.shape)
    ms = seconds * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "reps": int(ms.size),
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "mean_ms": float(ms.mean()),
        "std_ms": float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        "throughput_seq_per_s": float(seqs.sum() / seconds.sum()) if seconds.sum() > 0 else float("inf"),
    }
