"""Several processes as one run, launched by torchrun: who is who, how work is split, how results meet.

`torchrun --nproc_per_node N -m vitbudget train|eval|bench ...` sets RANK, WORLD_SIZE and
LOCAL_RANK; `session(device)` joins the process group they describe (gloo for a CPU device, nccl
for CUDA, each rank on GPU LOCAL_RANK). Without torchrun every helper here is the identity and a
run is the plain single-process one. Everything is arranged so that N processes compute what one
process computes: evaluation keeps the single-process batches (whole batches are dealt to ranks),
training splits each global batch into per-rank slices, and losses that are statistics of the
whole batch are taken over the global batch (`global_mean`, `global_sum`).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .errors import ConfigError

T = TypeVar("T")
TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("VITBUDGET_DIST_TIMEOUT_MIN", "60")))  # rank 0 may time speed while others wait


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that prints, writes files and times speed."""
        return self.rank == 0


def context() -> Context:
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def launched() -> bool:
    """Started by torchrun (or anything that sets its environment)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@contextlib.contextmanager
def session(device: str) -> Iterator[str]:
    """Join torchrun's process group for the block, if launched by it; yields this rank's device.

    gloo serves CPU devices, nccl CUDA ones; with CUDA each process takes GPU LOCAL_RANK (an
    explicit index in `device` is ignored under torchrun: one GPU per process).
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield device
        return
    kind = torch.device(device).type
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available in this process")
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local} has no GPU (this machine has {torch.cuda.device_count()}); lower --nproc_per_node")
        torch.cuda.set_device(local)
        device, backend = f"cuda:{local}", "nccl"
    elif kind == "cpu":
        backend = "gloo"
    else:
        raise ConfigError(f"--device {device}: distributed runs support cpu (gloo) and cuda (nccl)")
    dist.init_process_group(backend, timeout=TIMEOUT)
    try:
        yield device
    except BaseException as exc:
        if not broken_by_peer(exc):
            record_failure()  # before the group closes, so the ranks whose collectives that breaks know why
        raise
    finally:
        dist.destroy_process_group()


def rank_label() -> str:
    """'(rank 1/4) ' in a process torchrun started as a rank other than 0, else '' (for error lines)."""
    rank, world = int(os.environ.get("RANK", 0)), os.environ.get("WORLD_SIZE", "1")
    return f"(rank {rank}/{world}) " if launched() and rank else ""


# -- one error line per run -----------------------------------------------------------------------
FAILURE_WAIT_S = float(os.environ.get("VITBUDGET_FAILURE_WAIT_S", "10"))  # how long a rank other than 0 waits for rank 0's verdict


def _failure_store() -> Any:
    """A client of the torchrun agent's key-value store, which outlives every rank; None outside torchrun."""
    if not launched() or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    try:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=datetime.timedelta(seconds=FAILURE_WAIT_S))
    except (KeyError, ValueError, RuntimeError):
        return None


def _failure_key(rank: int) -> str:
    return f"vitbudget/failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{rank}"


def reports_failure() -> bool:
    """Record that this process failed; True if it should print its error line (one line per run, not per rank).

    Every rank meets the same bad input (a flag, a path, a config) at about the same point, so rank 0
    reports and the others stay silent once rank 0 has recorded a failure too. A rank other than 0
    whose failure rank 0 does not share within FAILURE_WAIT_S (an unreadable image in its own share
    of the data) reports it itself, labelled with its rank.
    """
    store = record_failure()
    deadline = time.monotonic() + FAILURE_WAIT_S
    try:
        while store is not None and int(os.environ["RANK"]) and time.monotonic() < deadline:
            if store.check([_failure_key(0)]):
                return False
            time.sleep(0.05)
    except RuntimeError:  # the store went away: torchrun is ending the run
        pass
    return True


def record_failure() -> Any:
    """Note in torchrun's store that this rank failed; returns the store (None outside torchrun or if unreachable)."""
    store = _failure_store()
    try:
        if store is not None:
            store.set(_failure_key(int(os.environ["RANK"])), "1")
    except RuntimeError:
        return None
    return store


def broken_by_peer(exc: BaseException) -> bool:
    """Whether `exc` is a collective that broke because another rank failed (and recorded it): that rank reports why."""
    store = _failure_store() if isinstance(exc, RuntimeError) else None
    if store is None:
        return False
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        return any(store.check([_failure_key(r)]) for r in range(world) if r != rank)
    except RuntimeError:
        return False


@contextlib.contextmanager
def local_main_first() -> Iterator[None]:
    """Run the block on each machine's local rank 0 first, then on its other ranks (e.g. unpacking a
    dataset archive into the machine's cache once, not concurrently)."""
    ctx = context()
    if ctx.world > 1 and ctx.local_rank:
        dist.barrier()
    yield
    if ctx.world > 1 and not ctx.local_rank:
        dist.barrier()


# -- splitting work ------------------------------------------------------------------------------
def deal_batches(indices: Sequence[int], batch_size: int, ctx: Context | None = None) -> list[tuple[int, list[int]]]:
    """(number, indices) of the evaluation batches this rank runs: batches r, r + W, ... of the
    single-process order, so every batch holds exactly the images it holds in one process."""
    ctx = ctx or context()
    batches = [list(indices[i : i + batch_size]) for i in range(0, len(indices), batch_size)]
    return [(number, batch) for number, batch in enumerate(batches) if number % ctx.world == ctx.rank]


def local_batch_size(global_batch: int, ctx: Context | None = None) -> int:
    ctx = ctx or context()
    if global_batch % ctx.world:
        raise ConfigError(f"the global batch {global_batch} does not split over {ctx.world} processes; "
                          f"pass --batch-size as a multiple of {ctx.world}")
    return global_batch // ctx.world


def shard_steps(order: Sequence[int], global_batch: int, ctx: Context | None = None) -> list[int]:
    """This rank's share of a training order: its slice of every global batch, step after step.

    Rank r takes samples [r*b, (r+1)*b) of each global batch of B = W*b, so the W local batches
    of a step are exactly the single-process batch of that step.
    """
    ctx = ctx or context()
    b = local_batch_size(global_batch, ctx)
    return [order[start + ctx.rank * b + j] for start in range(0, len(order) - global_batch + 1, global_batch) for j in range(b)]


def rank_seed(seed: int, ctx: Context | None = None) -> int:
    """Seed of a rank's own random stream (dropout, Gumbel noise): different per rank, fixed by (seed, rank)."""
    ctx = ctx or context()
    return int(np.random.SeedSequence([seed, ctx.rank, 0xD15]).generate_state(1)[0])


# -- results meeting -----------------------------------------------------------------------------
def all_gather(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank (picklable objects)."""
    ctx = context()
    if ctx.world == 1:
        return [obj]
    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank."""
    if context().world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if context().world > 1:
        dist.barrier()


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Per-rank numbers (losses of local batches) averaged over ranks: the global batch's, for logging."""
    if context().world == 1 or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return dict(zip(values, (t / context().world).tolist()))


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# -- losses over the global batch ----------------------------------------------------------------
def global_sum(t: Tensor) -> Tensor:
    """Sum of `t` over ranks, differentiable. Under DDP (which averages gradients over ranks), a
    loss computed on every rank from global sums has exactly the single-process gradient."""
    if context().world == 1:
        return t
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t)


def global_mean(t: Tensor) -> Tensor:
    """Mean over ranks of a per-rank mean over equal local batches = the mean over the global batch."""
    return t if context().world == 1 else global_sum(t) / context().world


def rng_states() -> dict[str, Tensor]:
    """This process's random streams (CPU, and the current GPU's when CUDA is in use)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_states(state: dict[str, Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
