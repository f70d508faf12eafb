"""Several processes, one run: torchrun's environment, the process group and the collectives training needs.

    torchrun --standalone --nproc_per_node=4 -m chimle train --preset paper --data DIR --out runs/sr   # 4 GPUs
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 \\
        -m chimle train --preset paper --data DIR --out runs/sr      # on node HOST; node_rank=1 on the other
    torchrun --standalone --nproc_per_node=2 -m chimle train --preset tiny --device cpu --out runs/t  # CPU, gloo

A process started by torchrun (RANK, WORLD_SIZE and LOCAL_RANK in its environment) joins the process group:
NCCL when it trains on CUDA, gloo otherwise, so the multi-process path runs, and is tested, on CPUs. Without
those variables there is one process, no group and no collective.

How chimle.train shares a round among W ranks: every rank draws the whole round; rank r searches the codes of
its contiguous block of round_size / W examples and the blocks' results are gathered, so every rank holds the
round's codes. A step takes a global batch of W x batch_size examples; rank r computes the loss of its
batch_size of them and the gradients are averaged over the ranks. An example's candidate pools are seeded by the
example's number, not by the rank, so each rank draws different pools for different examples, and W ranks at
batch b follow the path of one process at batch W x b up to float rounding. Only rank 0 writes files.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes."""

    rank: int = 0  # 0 .. size-1 over all nodes
    size: int = 1  # number of processes
    local_rank: int = 0  # index on this node: the GPU it uses

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return self.rank == 0


def launched_world() -> World | None:
    """The World torchrun describes in the environment, or None when not started by torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


_joined = False  # whether init() created the process group (and cleanup() should end it)


def init(device: str | None = None) -> tuple[World, torch.device]:
    """This process's World and device, joining the process group of a torchrun launch: NCCL on CUDA, gloo
    otherwise. `device` is a name; a bare "cuda" means this rank's GPU (LOCAL_RANK); by default that GPU if
    there is one, else the CPU."""
    global _joined
    world = launched_world() or World()
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(name)
    if chosen.type == "cuda" and chosen.index is None:
        chosen = torch.device("cuda", world.local_rank)
    if launched_world() is not None and not dist.is_initialized():
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
        _joined = True
    return world, chosen


def cleanup() -> None:
    """Leave the process group that init() joined, if any, all processes together: a process tearing down its
    gloo connections while a peer is still writing the model once aborted the run at exit ("terminate called
    without an active exception", seen under heavy load)."""
    global _joined
    if _joined and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _joined = False


def active() -> bool:
    """Whether this process is one of several (collectives run only then)."""
    return dist.is_available() and dist.is_initialized() and launched_world() is not None


def _device() -> torch.device:
    """Where tensors must be for the group's collectives (NCCL works on the GPU only)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def share_from_main(compute: Callable[[], T]) -> T:
    """Run `compute` on rank 0 only and give its result, or raise its error, on every rank. The objects travel
    pickled, but only between the processes of this run."""
    if not active():
        return compute()
    message: list = [None]
    error = None
    if dist.get_rank() == 0:
        try:
            message[0] = ("ok", compute())
        except Exception as raised:  # noqa: BLE001 - every rank must learn of the failure, or the others hang
            error = raised
            try:
                pickle.dumps(raised)
                message[0] = ("error", raised)
            except Exception:  # noqa: BLE001 - an exception that does not pickle is sent as text
                message[0] = ("error", RuntimeError(f"rank 0 failed: {raised!r}"))
    dist.broadcast_object_list(message, src=0, device=_device())
    if error is not None:
        raise error
    kind, value = message[0]
    if kind == "error":
        raise value
    return value


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` (same shape on all ranks) stacked along dim 0 in rank order, on the CPU."""
    if not active():
        return tensor
    local = tensor.to(_device()).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).cpu()


def average_gradients(parameters: list[torch.nn.Parameter], losses: torch.Tensor) -> torch.Tensor:
    """Average the gradients of `parameters` and the detached `losses` over the ranks, in one all-reduce.

    Each rank's loss is a mean over its part of the global batch, so the average of the ranks' gradients is the
    gradient of the mean over the whole batch. A rank that skipped backward (non-finite loss) sends zeros, and
    its non-finite loss makes the averaged loss non-finite, so every rank skips the step together. Returns the
    averaged losses."""
    if not active():
        return losses
    parameters = [p for p in parameters if p.requires_grad]
    grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device, dtype=p.dtype)
             for p in parameters]
    flat = torch.cat([losses.detach().reshape(-1).to(grads[0].dtype), *grads]).to(_device())
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    flat = flat.to(losses.device)
    offset = losses.numel()
    for p in parameters:
        if p.grad is not None:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()
    return flat[: losses.numel()].view_as(losses).to(losses.dtype)


def digest(module: torch.nn.Module) -> int:
    """A 63-bit fingerprint of the module's parameters and buffers, bit for bit."""
    h = hashlib.sha256()
    for name, value in module.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def check_same(module: torch.nn.Module, what: str = "weights") -> None:
    """Raise if the ranks' copies of `module` differ in any bit (they must stay identical: only rank 0 saves)."""
    if not active():
        return
    prints = gather_rows(torch.tensor([digest(module)], dtype=torch.int64))
    if (prints != prints[0]).any():
        ranks = [r for r, p in enumerate(prints.tolist()) if p != prints[0]]
        raise RuntimeError(f"the {what} of rank(s) {ranks} differ from rank 0's: the processes have diverged "
                           "(a non-deterministic operation, or different code or data on the nodes)")
