"""Shared helpers for the tests: tiny models and deterministic random inputs."""

from __future__ import annotations

import pytest
import torch

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
