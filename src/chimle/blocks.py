"""Building blocks of the TIM generator: weight-normalised conv, residual dense blocks, the style block.

The structure follows DESIGN.md §2.3 (itself the official release's generator): every 3x3 convolution is
weight-normalised, residual-in-residual dense blocks (RRDB, from ESRGAN) carry the features, and each RRDB
is followed by an adaptive instance norm driven by the level's style vector.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

NEGATIVE_SLOPE = 0.2  # LeakyReLU slope everywhere in the generator (paper: 0.2)
RESIDUAL_SCALE = 0.2  # scale of the residual branch in RDB and RRDB (ESRGAN's 0.2)
INSTANCE_NORM_EPS = 1e-5  # F.instance_norm's

# What the style blocks' instance norms do instead of normalising each image by its own statistics, if set.
_normalise: ContextVar[Callable[[torch.Tensor], torch.Tensor] | None] = ContextVar("chimle_normalise", default=None)


@contextmanager
def instance_norm_statistics(normalise: Callable[[torch.Tensor], torch.Tensor]):
    """Within the block (in this thread), every instance norm of the style blocks calls `normalise(x)`, in the
    order the tower runs them, instead of using x's own mean and variance per image and channel. chimle.tiling
    uses it to give a tile the statistics of the whole image."""
    token = _normalise.set(normalise)
    try:
        yield
    finally:
        _normalise.reset(token)


def leaky(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, NEGATIVE_SLOPE)


class WNConv2d(nn.Module):
    """3x3 (by default) convolution with weight normalisation: weight = g * v / ||v||, norm per output channel.

    The parameter names (`weight_g`, `weight_v`, `bias`) are those of `torch.nn.utils.weight_norm`, which the
    official checkpoints use. `fold()` replaces the reparametrisation by a plain weight while the weights are
    fixed (search, sampling), which saves recomputing the norm on every forward.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.padding = kernel_size // 2
        v = torch.empty(out_channels, in_channels, kernel_size, kernel_size)
        nn.init.kaiming_uniform_(v, a=5**0.5)
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(v.flatten(1).norm(dim=1).view(-1, 1, 1, 1).clone())
        bound = 1 / (in_channels * kernel_size * kernel_size) ** 0.5
        self.bias = nn.Parameter(torch.empty(out_channels).uniform_(-bound, bound))
        self._folded: torch.Tensor | None = None

    def weight(self) -> torch.Tensor:
        if self._folded is not None:
            return self._folded
        # One fused op for g * v / ||v|| and its backward (the kernel torch.nn.utils.weight_norm runs): 2.5-3.5x
        # faster than building it from norm, divide and multiply, which over the paper model's 210 M weights is
        # a tenth of a batch-1 training step.
        weight = torch._weight_norm(self.weight_v, self.weight_g, 0)
        if self.weight_v.is_contiguous(memory_format=torch.channels_last) and not self.weight_v.is_contiguous():
            # The fused op returns the default layout; a channels-last tower needs channels-last weights, or every
            # convolution's output (and so the next one's input) falls back to NCHW.
            weight = weight.contiguous(memory_format=torch.channels_last)
        return weight

    def fold(self, enabled: bool = True) -> None:
        """Cache the normalised weight; call `fold(False)` before the parameters change again."""
        self._folded = None
        if enabled:
            with torch.no_grad():
                self._folded = self.weight().detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight(), self.bias, padding=self.padding)


def fold(module: nn.Module, enabled: bool = True) -> None:
    """Fold weight normalisation into plain weights in every convolution of `module` (or undo it)."""
    for conv in module.modules():
        if isinstance(conv, WNConv2d):
            conv.fold(enabled)


@contextmanager
def folded(module: nn.Module):
    """`module` (the generator, or a part of it such as one level) with its weight normalisation folded for the
    duration of a block in which the parameters do not change."""
    fold(module)
    try:
        yield module
    finally:
        fold(module, False)


class ResidualDenseBlock(nn.Module):
    """Five convolutions, each fed the block input and every earlier output; 0.2 * last + input."""

    def __init__(self, channels: int, growth: int):
        super().__init__()
        self.convs = nn.ModuleList(
            WNConv2d(channels + i * growth, growth if i < 4 else channels) for i in range(5)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in self.convs[:4]:
            features.append(leaky(conv(torch.cat(features, dim=1))))
        return RESIDUAL_SCALE * self.convs[4](torch.cat(features, dim=1)) + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three RDBs in sequence, 0.2 * result + input."""

    def __init__(self, channels: int, growth: int):
        super().__init__()
        self.rdbs = nn.Sequential(*(ResidualDenseBlock(channels, growth) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return RESIDUAL_SCALE * self.rdbs(x) + x


class StyleBlock(nn.Module):
    """RRDBs, each followed by h <- (1 + gamma) * InstanceNorm(h) + beta from the style; a final conv; a shortcut."""

    def __init__(self, channels: int, growth: int, blocks: int, style_dim: int):
        super().__init__()
        self.rrdbs = nn.ModuleList(RRDB(channels, growth) for _ in range(blocks))
        self.affine = nn.ModuleList(nn.Linear(style_dim, 2 * channels) for _ in range(blocks))
        for affine in self.affine:
            # Start as a plain instance norm (gamma = beta = 0): at first the output depends on the input
            # alone, and the code gains its influence as training finds it useful.
            nn.init.zeros_(affine.weight)
            nn.init.zeros_(affine.bias)
        self.conv = WNConv2d(channels, channels)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        h = x
        for rrdb, affine in zip(self.rrdbs, self.affine):
            gamma, beta = affine(style)[:, :, None, None].chunk(2, dim=1)
            h = (1 + gamma) * _instance_norm(rrdb(h)) + beta
        return self.conv(h) + x


def _instance_norm(x: torch.Tensor) -> torch.Tensor:
    """F.instance_norm (no affine; or what `instance_norm_statistics` set), in the memory layout of `x`: PyTorch
    returns the default layout, which would turn a channels-last tower (chimle.search.channels_last) back to NCHW
    after the first style block and make every later convolution and concatenation convert its input."""
    # torch.compile (train.compile) cannot trace a ContextVar read, and would split the graph at every style block:
    # a compiled step never runs inside instance_norm_statistics (tiling renders with eager weights).
    normalise = None if torch.compiler.is_compiling() else _normalise.get()
    y = F.instance_norm(x, eps=INSTANCE_NORM_EPS) if normalise is None else normalise(x)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = y.contiguous(memory_format=torch.channels_last)
    return y


class Upsample(nn.Module):
    """Nearest x`scale`, conv + LeakyReLU, conv + LeakyReLU (scale 1: the colourization tower's last level)."""

    def __init__(self, channels: int, scale: int = 2):
        super().__init__()
        self.scale = scale
        self.conv1 = WNConv2d(channels, channels)
        self.conv2 = WNConv2d(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale != 1:
            x = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        return leaky(self.conv2(leaky(self.conv1(x))))


class MappingNetwork(nn.Module):
    """Linear + LeakyReLU layers: `in_dim -> width`, then `width -> width`."""

    def __init__(self, in_dim: int, width: int, layers: int):
        super().__init__()
        dims = [in_dim] + [width] * layers
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for linear in self.linears:
            x = leaky(linear(x))
        return x
