"""Data-parallel ``select``, ``recover`` and ``run`` on torch.distributed: everything rank-aware lives here.

Why on torch.distributed: the jobs people already launch (``torchrun``, ``accelerate launch``) set
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env`
joins that job (gloo on CPU, NCCL when CUDA is there). Without those variables (or with
``WORLD_SIZE=1``) nothing is initialised and every helper is the identity: a single-process run is
unchanged.

Why sharding by *batches*: CAHP's evidence is a sum over examples, but float32 results of a forward
pass depend slightly on which examples share a batch (padding length, matmul shapes). So each rank
takes whole batches of the single-process, length-bucketed batch order (batch i goes to rank
i mod world): every batch is computed exactly as one process would, and only the float64 merges of
their results run in another order. The merged statistics then match one process to ~1e-15, and
the selection is identical.

Merges (:func:`merge_welford`, :func:`sum_over_ranks`) all-gather the per-rank states and combine them
in rank order, so every rank ends with the same numbers. Only rank 0 (:func:`is_main`) clusters and
writes; the others raise :class:`NotMainRank` out of the method, which the stage turns into a
silent exit 0.

``run`` under a launcher: rank 0 walks the stages and sends each data-parallel call to the other
ranks (:func:`leading`, :func:`collective`, :func:`serve`, :func:`release`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from cahp_deploy.errors import CahpError

_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
T = TypeVar("T")


class NotMainRank(Exception):
    """Raised on ranks other than 0 after the evidence is merged: they have nothing left to do."""


def launched() -> bool:
    """True when a launcher (torchrun, accelerate) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(timeout_s: float = 1800.0) -> bool:
    """Join the launched job's process group once; return whether this is a multi-rank job.

    gloo on CPU, NCCL when CUDA is available (each rank on ``cuda:LOCAL_RANK``). A no-op when the
    group already exists or the process was not launched as one of several ranks.
    """
    if is_distributed():
        return True
    if not launched():
        return False
    missing = [k for k in (*_ENV, "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise CahpError(f"WORLD_SIZE > 1 but {', '.join(missing)} not set; launch with torchrun or accelerate launch")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    atexit.register(shutdown)
    return True


def shutdown() -> None:
    """Leave the process group (at exit; safe to call twice)."""
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """A process group of more than one rank is initialised (only then does anything shard)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def device() -> torch.device:
    """Where collective tensors must live: this rank's GPU under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_batches(batches: Sequence[np.ndarray], pad: bool = False) -> list[np.ndarray]:
    """This rank's batches: batch i goes to rank i mod world.

    ``pad``: repeat the first batches so every rank gets the same number (training under DDP must
    run the same number of steps on every rank, else the gradient all-reduce waits for ever).
    """
    batches = list(batches)
    w, r = world_size(), rank()
    if w == 1:
        return batches
    if pad and batches and len(batches) % w:
        batches = batches + batches[: w - len(batches) % w]
    return batches[r::w]


def shard_examples(data, tokenizer, batch_size: int, max_length: int):
    """This rank's rows of ``data`` (a LabelledData), whole batches of the single-process bucket order.

    The rows stay in bucket order, so ``iter_batches`` over the shard rebuilds exactly those batches
    (every batch but the last is full, and the stable sort of already sorted lengths is the identity).
    The data itself when not distributed.
    """
    if not is_distributed() or len(data) == 0:
        return data
    from cahp_deploy.data import bucket_order, token_lengths

    order = bucket_order(token_lengths(tokenizer, data, max_length))
    mine = shard_batches([order[i : i + batch_size] for i in range(0, len(order), batch_size)])
    return data.subset(np.concatenate(mine) if mine else np.zeros(0, dtype=np.int64))


def _all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    t = t.contiguous().to(device())
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t)
    return [o.cpu() for o in out]


def merge_welford(accumulators: Sequence) -> None:
    """Merge every rank's accumulators into each one, in place, exactly (Chan et al., rank order).

    Works for any list of objects with float64 ``count`` (C,), ``mean`` and ``m2`` (C, ...) tensors and
    a ``merge(count, mean, m2)`` method (:class:`~cahp_deploy.signals.signatures.WelfordAccumulator`),
    e.g. the attention-signature one and FFN-neuron ones; every rank must pass the same list.
    """
    if not is_distributed():
        return
    for acc in accumulators:
        counts, means, m2s = _all_gather(acc.count), _all_gather(acc.mean), _all_gather(acc.m2)
        acc.count.zero_()
        acc.mean.zero_()
        acc.m2.zero_()
        for c, m, s in zip(counts, means, m2s):
            acc.merge(c, m, s)


def sum_over_ranks(values: Sequence[torch.Tensor | np.ndarray]) -> list:
    """Each tensor (or array) summed over ranks, in rank order (float64 in, the same on every rank).

    Summed in rank order after an all-gather rather than with ``all_reduce``, whose reduction order
    is the backend's: here the result is the same on every rank and every run.
    """
    if not is_distributed():
        return list(values)
    out = []
    for v in values:
        is_np = isinstance(v, np.ndarray)
        t = torch.as_tensor(v)
        parts = _all_gather(t)
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        out.append(total.numpy() if is_np else total)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (e.g. a time budget ran out on one)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# --------------------------------------------------------------------------------------------------
# `run` under a launcher: rank 0 drives every stage; the other ranks serve its collective calls.

_serving = False  # on rank 0: the other ranks are in serve(), waiting for its next call


def _broadcast(message: tuple) -> tuple:
    box = [message]
    dist.broadcast_object_list(box, src=0, device=device() if device().type == "cuda" else None)
    return box[0]


def _one_line(e: BaseException) -> str:
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    text = str(e).strip().splitlines()
    return text[0] if isinstance(e, CahpError) and text else f"{type(e).__name__}: {text[0] if text else ''}"


@contextlib.contextmanager
def leading() -> Iterator[None]:
    """Rank 0 of a multi-rank ``run``: the other ranks serve its :func:`collective` calls inside this block.

    They are let go by :func:`release` (as soon as no collective stage is left, so that they do not
    wait out the process-group timeout while rank 0 exports and benchmarks) or at the end of the block.
    An error on rank 0 stops them too, each with rank 0's message in one line. Elsewhere a no-op.
    """
    global _serving
    if not (is_distributed() and is_main()):
        yield
        return
    _serving = True
    try:
        yield
    except BaseException as e:
        if _serving:
            _serving = False
            with contextlib.suppress(Exception):  # a rank already gone must not hide rank 0's own error
                _broadcast(("stop", _one_line(e)))
        raise
    release()


def release() -> None:
    """Rank 0: no collective stage is left; the serving ranks return from :func:`serve` (a no-op elsewhere)."""
    global _serving
    if _serving:
        _serving = False
        _broadcast(("stop", None))


def collective(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on every rank: what rank 0 calls, the serving ranks call too.

    Why rank 0 sends the call rather than every rank walking the stages itself: which stage runs at
    all (a rerun skips what is up to date) and which budget-search candidate comes next are decided
    by rank 0 from its files and measurements; sending the call is one rule that keeps the ranks in
    step for every path. ``fn`` must be a module-level function (it is pickled by name) that takes
    part in the collectives itself (``select``, ``recover``); on the serving ranks it returns nothing
    that is used (they raise :class:`NotMainRank` or return after rank 0 wrote). In one process, or
    outside :func:`leading`, this is the plain call.
    """
    if _serving:
        _broadcast(("call", fn, args, kwargs))
    return fn(*args, **kwargs)


def serve() -> None:
    """Ranks other than 0 of a multi-rank ``run``: make each call rank 0 sends until it releases them.

    Raises a one-line :class:`CahpError` when rank 0 stopped on an error, or when a call failed here
    (the same inputs fail on rank 0 too, which then stops; this rank waits for that, then raises).
    """
    failed: CahpError | None = None
    while True:
        message = _broadcast(("", None))
        if message[0] == "stop":
            if failed is not None:
                raise failed
            if message[1] is not None:
                raise CahpError(f"rank 0 stopped: {message[1]}")
            return
        if failed is not None:  # rank 0 went on where this rank failed: stop rather than diverge
            raise failed
        _, fn, args, kwargs = message
        try:
            fn(*args, **kwargs)
        except NotMainRank:
            pass
        except CahpError as e:
            failed = e


__all__ = [
    "NotMainRank", "any_rank", "barrier", "collective", "device", "init_from_env",
    "is_distributed", "is_main", "launched", "leading", "merge_welford", "rank", "release", "serve",
    "shard_batches", "shard_examples", "shutdown", "sum_over_ranks", "world_size",
]
