"""Shared helpers for the tests: tiny models, deterministic random inputs, comparing two training runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chimle import files
from chimle.config import resolve
from chimle.generator import Generator


def tiny_config(task: str = "super-resolution", *overrides: str):
    return resolve(task=task, preset="tiny", overrides=list(overrides))


def randomize(generator: Generator, seed: int = 0) -> Generator:
    """Give every parameter non-trivial values (weight_g away from ||v||, biases non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in generator.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return generator


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


def model_vector(run: Path) -> torch.Tensor:
    """A run's model weights as one float32 vector (tensors in name order)."""
    return state_vector(load_file(str(run / "model.safetensors")))


def state_vector(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """A state dict as one float32 vector (tensors in name order)."""
    return torch.cat([state[k].flatten().float() for k in sorted(state)])


def weight_agreement(a: Path, b: Path) -> tuple[float, float]:
    """How close two runs' weights are (the same tensors by name): the fraction of elements within rtol 1e-4,
    atol 1e-6, and the largest difference. Runs equal up to float rounding agree on nearly all elements, and
    differ by at most lr per step elsewhere: Adam divides each gradient by its running RMS, so an element whose
    gradient is itself at rounding level may move by up to lr per step either way."""
    sa, sb = (load_file(str(run / "model.safetensors")) for run in (a, b))
    assert sa.keys() == sb.keys()
    wa, wb = state_vector(sa), state_vector(sb)
    return torch.isclose(wb, wa, rtol=1e-4, atol=1e-6).float().mean().item(), (wa - wb).abs().max().item()


def metric_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_searches_and_losses(a: Path, b: Path) -> None:
    """The two runs logged the same events at the same steps, with search distances and losses per level equal
    up to float rounding."""
    for x, y in zip(metric_records(a), metric_records(b)):
        assert x["event"] == y["event"] and x["step"] == y["step"]
        key = "distance_per_level" if x["event"] == "search" else "loss_per_level"
        torch.testing.assert_close(torch.tensor(y[key]), torch.tensor(x[key]), rtol=1e-4, atol=1e-5)


def run_killed(out: Path, crash_at: str, settings: list[str], resume: bool = False) -> None:
    """`chimle train --preset tiny` with `settings` in a subprocess that SIGKILLs itself at the crash point
    (chimle.files.CRASH_VARIABLE); check that it died there."""
    command = [sys.executable, "-m", "chimle", "train", "--preset", "tiny", "--out", str(out),
               *[f"-o{s}" for s in settings], *(["--resume"] if resume else [])]
    # Same thread count as this process, so the float arithmetic matches bit for bit.
    env = {**os.environ, files.CRASH_VARIABLE: crash_at, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, f"not killed at {crash_at}:\n{result.stderr[-3000:]}"
    assert "done:" not in (out / "log.txt").read_text()
