"""torch.distributed set-up from torchrun's environment, and the few collectives the trainer uses.

Without torchrun (no WORLD_SIZE in the environment) everything runs in one process and the
collectives below are no-ops, so the same code path serves one GPU, the CPU demo and the tests.
Backend: NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_rank() -> int:
    """This process's rank before any process group exists (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def pick_device(preference: str) -> str:
    """'cuda' or 'cpu' for a config value of auto/cuda/cpu; raises ValueError if cuda is asked for but absent."""
    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device=cuda but torch sees no CUDA device (use --run.device=cpu or auto)")
    return preference


def init_distributed(device_type: str, timeout: datetime.timedelta | None = None) -> DistInfo:
    """This process's place; with torchrun, the process group too. `timeout`: how long a collective waits for
    the other ranks before raising (torch's default when None)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = env_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout,
                                store=round_store(timeout), device_id=device if device_type == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, local_world_size, device)


def round_store(timeout: datetime.timedelta | None = None) -> dist.Store | None:
    """The key-value store for this torchrun round, or None to let init_process_group make one.

    torchrun's agent serves the workers' store (TORCHELASTIC_USE_AGENT_STORE=True) and keeps the same one
    for every round of `--max-restarts`. Without a prefix of its own, a restarted round reads the keys that
    the dead round left: gloo connects to a dead rank's port ("Connection refused") or waits until the
    timeout (torch 2.14, `--standalone`, 2 CPU ranks: 5 of 6 restarts failed so; pytorch/pytorch#135712).
    The restart count keys the round: the same on every rank of a node (one agent); across nodes each
    agent counts its own restarts, which agree when every node restarts once per failure."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout or datetime.timedelta(minutes=30))
    return dist.PrefixStore(f"train.main/round-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


class CollectiveError(RuntimeError):
    """A collective that failed because another rank stopped answering (dead, hung, or its link broke)."""


_PEER_LOST = ("timed out", "timeout", "connection closed by peer", "connection reset", "broken pipe")


def lost_peer(exc: BaseException, name: str | None = None) -> CollectiveError | None:
    """A CollectiveError naming the operation when `exc` is gloo's/NCCL's error for a rank that stopped
    answering (else None). Without a name, one is read off the traceback: DDP's gradient all-reduce runs
    inside backward()."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or not any(f in text.lower() for f in _PEER_LOST):
        return None
    if name is None:
        frames = {frame.name for frame in traceback.extract_tb(exc.__traceback__)}
        name = "DDP's gradient all-reduce (backward)" if frames & {"backward", "_engine_run_backward"} \
            else "a collective"
    world = dist.get_world_size() if dist.is_initialized() else "?"
    return CollectiveError(f"{name} across {world} ranks failed waiting for another rank "
                           f"({text.strip().splitlines()[0][:160]})")


@contextlib.contextmanager
def _collective(name: str):
    try:
        yield
    except RuntimeError as exc:
        lost = lost_peer(exc, name)
        if lost is None:
            raise
        raise lost from exc


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place sum or max over ranks."""
    if _active():
        with _collective("all_reduce"):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def wrap_ddp(model: torch.nn.Module, device_type: str, local_rank: int) -> torch.nn.Module:
    """DDP without a buffer broadcast before every forward (BatchNorm statistics stay per rank during an
    epoch; `broadcast_buffers_` makes them equal before validation and saving) and with gradients that are
    views into DDP's communication buckets (no copy in and out of the buckets each step)."""
    ddp = torch.nn.parallel.DistributedDataParallel
    # torch >= 2.14 names the switch forward_sync_buffers (broadcast_buffers is deprecated there)
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else {"broadcast_buffers": False})
    return ddp(model, device_ids=[local_rank] if device_type == "cuda" else None, gradient_as_bucket_view=True,
               **no_sync)


def broadcast_buffers_(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank `src`'s BatchNorm running statistics (and any other buffers). DDP broadcasts them
    only at the start of a forward, so after the last step each rank holds its own: evaluate and save
    one model, not a mix of them."""
    if _active():
        with _collective("broadcast of the BatchNorm statistics"):
            for buffer in module.buffers():
                dist.broadcast(buffer, src=src)


def all_gather_object(obj) -> list:
    """One picklable object per rank, in rank order."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    with _collective("all_gather_object"):
        dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not _active():
        return obj
    box = [obj]
    with _collective("broadcast_object_list"):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if _active():
        with _collective("barrier"):
            dist.barrier()
