"""Several processes (gloo on the CPU): the collectives, and a 2-process run against a 1-process run."""

import copy
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from chimle import distributed
from chimle.checkpoint import CheckpointError, load_state
from chimle.files import CRASH_VARIABLE
from chimle.config import ConfigError
from chimle.distributed import World
from chimle.generator import Generator
from chimle.train import _check_world, batch_indices, train
from conftest import (assert_same_searches_and_losses, metric_records, model_vector, state_vector, tiny_config,
                      weight_agreement)

SETTINGS = ["train.rounds=2", "train.round_size=4", "train.steps_per_round=3", "train.checkpoint_every=2",
            "train.grid_every=100", "train.log_every=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collectives(rank: int, port: int) -> None:
    """What each of 2 processes checks (run by torch.multiprocessing.spawn)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    world, device = distributed.init("cpu")
    assert world == World(rank, 2, rank) and device == torch.device("cpu") and dist.get_backend() == "gloo"

    # Gathering: every rank's block, in rank order.
    rows = distributed.gather_rows(torch.full((2, 3), rank, dtype=torch.int64))
    assert rows[:, 0].tolist() == [0, 0, 1, 1]

    # Averaged gradients of each rank's half of a batch == the gradient of the mean over the whole batch.
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    unused = torch.nn.Parameter(torch.zeros(2))
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    full = torch.nn.Linear(3, 2)
    full.load_state_dict(model.state_dict())
    ((full(x) - y) ** 2).mean().backward()
    mine = slice(2 * rank, 2 * rank + 2)
    loss = ((model(x[mine]) - y[mine]) ** 2).mean()
    loss.backward()
    averaged = distributed.average_gradients([*model.parameters(), unused], loss.detach().view(1))
    torch.testing.assert_close(averaged, ((full(x) - y) ** 2).mean().detach().view(1))
    torch.testing.assert_close(model.weight.grad, full.weight.grad)
    torch.testing.assert_close(model.bias.grad, full.bias.grad)
    assert unused.grad is None

    # A non-finite loss on one rank (which then skips backward) is non-finite on every rank.
    model.zero_grad(set_to_none=True)
    loss = torch.tensor([float("nan") if rank == 1 else 0.5])
    assert not torch.isfinite(distributed.average_gradients(list(model.parameters()), loss)).all()

    # Gradients go to the all-reduce in buckets while backward still runs (here 4 buckets, of one tensor each).
    sent, phase = [], ["backward"]
    all_reduce = dist.all_reduce

    def recording(tensor, *args, **kwargs):
        sent.append(phase[0])
        return all_reduce(tensor, *args, **kwargs)

    deep = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Linear(8, 2))
    whole = copy.deepcopy(deep)
    ((whole(x) - y) ** 2).mean().backward()
    buckets = distributed.GradientBuckets(list(deep.parameters()), bucket_bytes=64)
    dist.all_reduce = recording
    try:
        loss = ((deep(x[mine]) - y[mine]) ** 2).mean()
        loss.backward()
        phase[0] = "after"
        buckets.average(loss.detach().view(1))
    finally:
        dist.all_reduce = all_reduce
        buckets.remove()
    assert sent == ["backward"] * 4 + ["after"]  # the last: the losses
    for a, b in zip(deep.parameters(), whole.parameters()):
        torch.testing.assert_close(a.grad, b.grad)

    # Rank 0 computes, everyone gets the result or the error.
    assert distributed.share_from_main(lambda: ("from", dist.get_rank())) == ("from", 0)
    # Tensors travel as tensors: only the small rest is pickled.
    state = {"generator": {"w": torch.arange(300_000.0).view(600, 500), "flag": torch.tensor(True)}, "step": 7,
             "optimizer": {"state": {0: {"step": torch.tensor(3.0), "m": torch.ones(5, 3, dtype=torch.float64).t()}},
                           "groups": [(1, 2)]}}
    pickled, broadcast_object_list = [], dist.broadcast_object_list

    def measuring(objects, *args, **kwargs):
        pickled.append(len(pickle.dumps(objects)))
        return broadcast_object_list(objects, *args, **kwargs)

    dist.broadcast_object_list = measuring
    try:
        got = distributed.share_from_main(lambda: ("config", state))
    finally:
        dist.broadcast_object_list = broadcast_object_list
    assert got[0] == "config" and got[1]["step"] == 7 and got[1]["optimizer"]["groups"] == [(1, 2)]
    assert torch.equal(got[1]["generator"]["w"], state["generator"]["w"]) and got[1]["generator"]["flag"].item()
    moment = got[1]["optimizer"]["state"][0]["m"]
    assert moment.dtype == torch.float64 and torch.equal(moment, torch.ones(3, 5, dtype=torch.float64))
    if rank == 0:
        assert pickled[0] < 2000  # the 1.2 MB of tensors went by broadcast
    with pytest.raises(CheckpointError, match="only rank 0 looked"):
        distributed.share_from_main(lambda: (_ for _ in ()).throw(CheckpointError("only rank 0 looked")))

    # Weights that drift apart on one rank are caught on every rank.
    distributed.check_same(model)
    if rank == 1:
        with torch.no_grad():
            model.bias[0] = torch.nextafter(model.bias[0], torch.tensor(1.0))
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] differ from rank 0's"):
        distributed.check_same(model)
    distributed.cleanup()
    assert not dist.is_initialized()


def test_collectives_on_two_processes():
    mp.spawn(_collectives, args=(free_port(),), nprocs=2, join=True)


def test_without_torchrun_there_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.init("cpu") == (World(), torch.device("cpu"))
    assert not dist.is_initialized()


def test_steps_split_the_global_batch_between_processes():
    config = tiny_config("super-resolution", "train.round_size=6", "train.batch_size=2")
    one = tiny_config("super-resolution", "train.round_size=6", "train.batch_size=4")
    for step in range(5):
        halves = [batch_indices(config, step, World(r, 2)) for r in range(2)]
        assert torch.cat(halves).tolist() == batch_indices(one, step).tolist()
    with pytest.raises(ConfigError, match="train.round_size=6 must be a multiple of the number of processes \\(4\\)"):
        _check_world(config, World(0, 4))


def torchrun(out: Path, *extra: str, crash_at: str = "") -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 -m chimle train` of the tiny preset at batch 1 per process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "chimle", "train", "--preset", "tiny", "--out", str(out),
               *[f"-o{s}" for s in SETTINGS], "-otrain.batch_size=1", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", CRASH_VARIABLE: crash_at}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Path:
    """A run of 2 processes at batch 1 each."""
    out = tmp_path_factory.mktemp("two") / "run"
    result = torchrun(out)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def test_two_processes_at_batch_b_match_one_process_at_batch_2b(two, tmp_path):
    """The same examples, codes and averaged gradients: the same weights up to float rounding. Each rank checks
    at every checkpoint that its weights equal rank 0's bit for bit, so the run finishing shows that too."""
    one = tmp_path / "one"
    train(tiny_config("super-resolution", *SETTINGS, "train.batch_size=2"), one)

    # The same codes: round 2's search result, kept in the state of step 4, is identical.
    s1, s2 = (load_state(run / "state-000000004.pt")["search"] for run in (one, two))
    assert torch.equal(s1["seeds"], s2["seeds"]) and torch.equal(s1["winners"], s2["winners"])

    # The same weights up to rounding (see weight_agreement).
    tight, largest = weight_agreement(one, two)
    assert tight > 0.995
    assert largest < 6 * 1e-3  # steps x train.lr of the tiny preset
    initial = state_vector(_initial())
    assert not torch.isclose(model_vector(one), initial, rtol=1e-4, atol=1e-6).all(), \
        "training should have moved the weights"

    # Rank 0 alone wrote the logs: one record per step, the same searches and losses as one process.
    assert [r["step"] for r in metric_records(two) if r["event"] == "train"] == list(range(1, 7))
    assert_same_searches_and_losses(one, two)
    assert (two / "log.txt").read_text().count("done: 6 steps") == 1


def _initial() -> dict[str, torch.Tensor]:
    """The weights a run of seed 0 starts from."""
    torch.manual_seed(0)
    return Generator(tiny_config("super-resolution", *SETTINGS).model).state_dict()


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_identical_weights(two, tmp_path):
    """Rank 0 killed while writing a checkpoint (torchrun then stops rank 1), resumed by a new torchrun."""
    out = tmp_path / "run"
    assert torchrun(out, crash_at="write:state-000000004.pt").returncode != 0
    assert sorted(p.name for p in out.glob("state-*.pt"))[-1] == "state-000000003.pt"
    result = torchrun(out, "--resume")
    assert result.returncode == 0, result.stderr[-4000:]
    a, b = load_file(str(two / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
