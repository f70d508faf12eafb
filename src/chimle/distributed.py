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
import math
import os
import pickle
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from chimle import devices

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
    chosen = devices.pick(device)
    devices.configure()
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
    global _joined, _buckets
    if _buckets is not None:
        _buckets.remove()
        _buckets = None
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
    """Run `compute` on rank 0 only and give its result, or raise its error, on every rank. The tensors of the
    result (a training state's weights and optimizer moments) travel as tensors, in buckets of bytes; only the
    rest (numbers, strings, where each tensor goes) is pickled, and only between the processes of this run."""
    if not active():
        return compute()
    message: list = [None]
    error, tensors = None, []
    if dist.get_rank() == 0:
        try:
            layout, tensors = _take_tensors(compute())
            message[0] = ("ok", layout)
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
    return _put_tensors(value, _broadcast_tensors(value, tensors))


@dataclass(frozen=True)
class _TensorSlot:
    """Where a tensor of a shared object was, and what it was: the object travels pickled with these instead."""

    index: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _take_tensors(value, tensors: list | None = None):
    """`value` with every tensor in its dicts, lists and tuples replaced by a _TensorSlot; and the tensors."""
    tensors = [] if tensors is None else tensors
    if isinstance(value, torch.Tensor):
        tensors.append(value.detach())
        return _TensorSlot(len(tensors) - 1, value.dtype, tuple(value.shape)), tensors
    if isinstance(value, dict):
        return {key: _take_tensors(item, tensors)[0] for key, item in value.items()}, tensors
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(_take_tensors(item, tensors)[0] for item in value), tensors
    return value, tensors


def _put_tensors(value, tensors: list[torch.Tensor]):
    """The inverse of `_take_tensors`."""
    if isinstance(value, _TensorSlot):
        return tensors[value.index]
    if isinstance(value, dict):
        return {key: _put_tensors(item, tensors) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(_put_tensors(item, tensors) for item in value)
    return value


def _slots(value) -> list[_TensorSlot]:
    if isinstance(value, _TensorSlot):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
    return [slot for item in items for slot in _slots(item)]


def _broadcast_tensors(layout, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rank 0's `tensors` on every rank (on the CPU), sent as raw bytes in buckets of at most BUCKET_BYTES."""
    slots = sorted(_slots(layout), key=lambda slot: slot.index)
    if dist.get_rank() == 0:
        received = tensors
    else:
        received = [None] * len(slots)
    for bucket in _bucketed(slots, lambda slot: slot.nbytes):
        if dist.get_rank() == 0:
            flat = torch.cat([tensors[slot.index].contiguous().reshape(-1).view(torch.uint8) for slot in bucket])
            dist.broadcast(flat.to(_device()), src=0)
            continue
        flat = torch.empty(sum(slot.nbytes for slot in bucket), dtype=torch.uint8, device=_device())
        dist.broadcast(flat, src=0)
        offset = 0
        for slot in bucket:
            part = flat[offset : offset + slot.nbytes].to("cpu", copy=True)  # a copy: aligned for its dtype
            received[slot.index] = part.view(slot.dtype).reshape(slot.shape)
            offset += slot.nbytes
    return received


BUCKET_BYTES = 25 * 2**20  # bytes sent in one collective (DDP's default bucket size)


def _bucketed(items: list, nbytes: Callable, limit: int | None = None) -> list[list]:
    """Consecutive runs of `items` of at most `limit` bytes each (an item larger than that alone)."""
    limit = BUCKET_BYTES if limit is None else limit
    buckets, size = [], 0
    for item in items:
        if not buckets or size + nbytes(item) > limit:
            buckets.append([])
            size = 0
        buckets[-1].append(item)
        size += nbytes(item)
    return buckets


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` (same shape on all ranks) stacked along dim 0 in rank order, on the CPU."""
    if not active():
        return tensor
    local = tensor.to(_device()).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).cpu()


class GradientBuckets:
    """The gradients of a list of parameters, averaged over the ranks in buckets while backward still runs (what
    DDP does): a hook on every parameter counts the gradients backward has finished, and each full bucket is sent
    to an asynchronous all-reduce, in a fixed order (the reverse of the parameters', roughly the order backward
    finishes them), so every rank issues the same collectives in the same order. `average` sends what backward
    did not fill (everything, after a backward a rank skipped), waits, and writes the averages into .grad.

    Every backward over these parameters must be followed by `average`, on every rank."""

    def __init__(self, parameters: list[torch.nn.Parameter], bucket_bytes: int | None = None):
        self.parameters = parameters
        order = list(reversed(parameters))
        kinds = sorted({(p.dtype, p.device) for p in order}, key=str)
        self.buckets = [bucket for kind in kinds for bucket in
                        _bucketed([p for p in order if (p.dtype, p.device) == kind],
                                  lambda p: p.numel() * p.element_size(), bucket_bytes)]
        self.bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        self.hooks = [p.register_post_accumulate_grad_hook(self._finished) for p in parameters]
        self._reset()

    def _reset(self) -> None:
        self.finished = [0] * len(self.buckets)  # gradients backward has finished, per bucket
        self.sent = 0  # buckets sent so far, in order
        self.work: list = [None] * len(self.buckets)  # (all-reduce handle, flat buffer) per sent bucket

    def _finished(self, parameter: torch.nn.Parameter) -> None:
        self.finished[self.bucket_of[id(parameter)]] += 1
        while self.sent < len(self.buckets) and self.finished[self.sent] >= len(self.buckets[self.sent]):
            self._send(self.sent)

    def _send(self, i: int) -> None:
        grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                 for p in self.buckets[i]]
        flat = torch.cat(grads).to(_device())
        self.work[i] = (dist.all_reduce(flat, async_op=True), flat)
        self.sent = i + 1

    def average(self, losses: torch.Tensor) -> torch.Tensor:
        """Wait for every bucket's average and write it into .grad (parameters without a gradient keep None);
        return `losses` averaged over the ranks too."""
        while self.sent < len(self.buckets):
            self._send(self.sent)
        size = dist.get_world_size()
        for bucket, (handle, flat) in zip(self.buckets, self.work):
            handle.wait()
            flat = flat.div_(size).to(bucket[0].device)
            offset = 0
            for p in bucket:
                if p.grad is not None:
                    p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
                offset += p.numel()
        self._reset()
        total = losses.detach().reshape(-1).double().to(_device())
        dist.all_reduce(total)
        return (total / size).to(losses.device).view_as(losses).to(losses.dtype)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def covers(self, parameters: list[torch.nn.Parameter]) -> bool:
        return len(parameters) == len(self.parameters) and all(a is b for a, b in zip(parameters, self.parameters))


_buckets: GradientBuckets | None = None  # those of the parameters being trained


def average_gradients(parameters: list[torch.nn.Parameter], losses: torch.Tensor) -> torch.Tensor:
    """Average the gradients of `parameters` and the detached `losses` over the ranks; returns the averaged
    losses. The first call sets up GradientBuckets for these parameters, so from the next step on the gradients
    are sent while backward runs.

    Each rank's loss is a mean over its part of the global batch, so the average of the ranks' gradients is the
    gradient of the mean over the whole batch. A rank that skipped backward (non-finite loss) sends zeros, and
    its non-finite loss makes the averaged loss non-finite, so every rank skips the step together."""
    global _buckets
    if not active():
        return losses
    parameters = [p for p in parameters if p.requires_grad]
    if _buckets is None or not _buckets.covers(parameters):
        if _buckets is not None:
            _buckets.remove()
        _buckets = GradientBuckets(parameters)
    return _buckets.average(losses)


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
