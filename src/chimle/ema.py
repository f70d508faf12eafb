"""An exponential moving average of the generator's weights, for sampling and evaluation (config `train.ema`).

The weights that training moves are noisy: each step pulls towards the few examples of its batch with codes
that were searched for an older model. Their running average is a better generator, the more so the shorter
the run and the higher the learning rate (the same observation as in Karras et al., EDM, and in most GAN and
diffusion training). The raw weights keep training; the average only follows them:

    average <- d_n * average + (1 - d_n) * weights,   d_n = min(decay, (1 + n) / (10 + n))

after the n-th optimisation step, so that the first steps, whose weights are far from the final ones, are
forgotten quickly (the warm-up of the decay keeps a short run from being dominated by its initialisation).
The code search uses the raw weights (it finds codes for the model being trained); model files hold the
average; training states hold both, so a resumed run continues exactly.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    """A copy of `module` whose parameters follow the module's by an exponential moving average."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"the decay of a weight average must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    def decay_at(self, updates: int) -> float:
        """The decay used for the update after `updates` earlier ones."""
        return min(self.decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self, module: nn.Module, updates: int) -> None:
        """Move the average towards `module`'s parameters; `updates` is the number of earlier updates."""
        ours = list(self.module.parameters())
        theirs = [p.detach() for p in module.parameters()]
        torch._foreach_lerp_(ours, theirs, 1 - self.decay_at(updates))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
