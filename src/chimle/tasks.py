"""The task registry: one entry per task, saying how a training pair becomes input and target pyramids, how the
generator is wired, and how its raw outputs become images.

Every image tensor here is float, (N, C, H, W), in [0, 1]. A target pyramid has one image per generator level,
at that level's output resolution; an input pyramid is what `Generator.start` takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


class TaskError(ValueError):
    """An input does not suit the task (wrong size, channels, ...)."""


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Anti-aliased bicubic resize of images in [0, 1], clamped back to [0, 1]."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise TaskError(f"an image of {w}x{h} px cannot be downsampled by {factor}: both sides must be multiples of it")
    return resize(x, (h // factor, w // factor))


def pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """x at 1/2**(levels-1), ..., 1/2, 1 of its size: the target resolutions of a generic tower."""
    return [downsample(x, 2 ** (levels - 1 - level)) for level in range(levels)]


def tanh_to_unit(raw: torch.Tensor, level_input: torch.Tensor | None) -> torch.Tensor:
    return (raw + 1) / 2


@dataclass(frozen=True)
class Task:
    name: str
    wiring: str  # generator wiring, see chimle.generator
    in_channels: int  # image channels fed to each level
    out_channels: int  # channels each level predicts
    summary: str  # one line for help texts
    make_pair: Callable | None = None  # (target batch, config) -> (input pyramid, target pyramid)
    make_inputs: Callable | None = None  # (input batch as given by a user, config) -> input pyramid
    to_image: Callable = tanh_to_unit  # (raw tanh output of a level, that level's input) -> RGB image in [0, 1]

    def model_overrides(self) -> dict:
        return {"model": {"wiring": self.wiring, "in_channels": self.in_channels, "out_channels": self.out_channels}}

    def image(self, raw: torch.Tensor, inputs: list[torch.Tensor], level: int) -> torch.Tensor:
        """The RGB image in [0, 1] of a level's raw output (colourization needs the level's L input)."""
        return self.to_image(raw, None if self.wiring == "super-resolution" else inputs[level])

    def output_scale(self, levels: int) -> int:
        """How many times larger than the input the final output is."""
        return 2**levels if self.wiring == "super-resolution" else 1

    def pair(self, target: torch.Tensor, levels: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self.make_pair is None:
            raise TaskError(f"training data for the '{self.name}' task is not available in this version")
        return self.make_pair(target, levels)

    def inputs(self, image: torch.Tensor, levels: int) -> list[torch.Tensor]:
        if self.make_inputs is None:
            raise TaskError(f"sampling for the '{self.name}' task is not available in this version")
        return self.make_inputs(image, levels)


# Super-resolution -----------------------------------------------------------------------------------------------
# Level 0 sees the image downsampled by 2**levels (x16 with the paper's 4 levels); level l renders at 2**(l+1)
# times that, so the targets are the full image downsampled by 2**(levels-1-l).


def _sr_pair(target: torch.Tensor, levels: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [downsample(target, 2**levels)], pyramid(target, levels)


def _sr_inputs(image: torch.Tensor, levels: int) -> list[torch.Tensor]:
    return [image]


# Generic (decompression, paired translation): each level sees the input at its own resolution ---------------------


def _generic_inputs(image: torch.Tensor, levels: int) -> list[torch.Tensor]:
    return pyramid(image, levels)


TASKS: dict[str, Task] = {
    "super-resolution": Task(
        name="super-resolution",
        wiring="super-resolution",
        in_channels=3,
        out_channels=3,
        summary="a 2**levels times downsampled image -> the full image (paper: 32 px -> 512 px)",
        make_pair=_sr_pair,
        make_inputs=_sr_inputs,
    ),
    "colourization": Task(
        name="colourization",
        wiring="colourization",
        in_channels=1,
        out_channels=2,
        summary="L channel (Lab) -> colour image",
    ),
    "decompression": Task(
        name="decompression",
        wiring="generic",
        in_channels=3,
        out_channels=3,
        summary="JPEG at a very low quality -> clean image",
        make_inputs=_generic_inputs,
    ),
    "paired": Task(
        name="paired",
        wiring="generic",
        in_channels=3,
        out_channels=3,
        summary="any aligned pair of images, e.g. night -> day",
        make_inputs=_generic_inputs,
    ),
}


def get(name: str) -> Task:
    if name not in TASKS:
        raise TaskError(f"unknown task '{name}'; choose one of: {', '.join(TASKS)}")
    return TASKS[name]
