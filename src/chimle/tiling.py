"""Tiled inference: inputs larger than the training crops rendered in bounded memory.

    chimle sample --model runs/sr --input big.png -n 4 --tile 32 --overlap 8 --out samples/
    model = chimle.load("runs/sr", tile=32, overlap=8)        # every render larger than a tile is tiled

The input is cut into tiles of `size` x `size` input pixels, neighbours sharing `overlap` pixels (the last tile
of a row or column is moved back to end at the border, so it may share more). Every tile runs through the
whole tower, and the outputs are blended with a raised-cosine ramp across each shared band, so the weights of
two neighbours add up to one there.

Codes: exactly the untiled ones. A level's code is its mapping-network part (the style, global: used as it
is) and a noise map of `noise_channels` x h x w at that level's resolution. The noise map is drawn at the whole
image's size from the same seeded stream as without tiles, and each tile takes its own window of it, so
neighbouring tiles see the same noise where they overlap and the tiled render approximates the untiled one,
not some other sample.

Instance norm: every style block normalises its features by their mean and variance over the image. A tile
alone would use its own statistics, a global difference that no overlap removes (measured below). With
`stats="image"` (the default) the statistics are those of the whole image, found in bounded memory by extra
passes: pass j renders every tile up to the j-th instance norm (the earlier ones already using whole-image
statistics), adds up that layer's sums over the part of the tile it owns (tiles own disjoint regions split
in the middle of each overlap, away from the zero padding at tile edges) and stops there; a last pass renders
the outputs. That costs about (norm layers / 2 + 1) renders; `stats="tile"` renders once with per-tile
statistics.

What remains different from the untiled render is the receptive field: near a tile's edge the convolutions
see zero padding instead of the neighbouring pixels; the ramp gives those pixels little weight, and the overlap
lets the neighbour's interior take over. Measured with `python benchmarks/tiling.py --model runs/demo` (the
`small` x16 super-resolution model of `make demo`, a 32 x 32 input -> 512 x 512; mean, 99th percentile and
largest absolute difference to the untiled render, images in [0, 1]; two different samples differ by 0.039 on
average; seconds per sample on a shared 2-core CPU, untiled 1.6 s):

    tile/overlap (input px)          8/0              8/4              16/4             16/8
    stats="tile"    mean/p99/max     .045 .25 .76     .032 .15 .69     .018 .11 .51     .016 .10 .57
                    seconds          1.9              6.5              2.9              3.1
    stats="image"   mean/p99/max     .038 .24 .79     .0077 .055 .31   .0029 .028 .17   .0013 .011 .08
                    seconds          10               31               13               14

So per-tile statistics leave the tiled render about as far from the untiled one as a different sample is
(at the 8 px training input size) or a third of that (16 px tiles); whole-image statistics bring it 4 to 12
times closer, at 4.5 to 5.5 times the time. Without overlap the owned regions reach the zero-padded tile edges
and the statistics suffer too: give an overlap.

Peak memory of the network is that of one tile (times the batch of samples); the input pyramid, the codes and
the output are held at full size (a noise map holds `noise_channels` numbers per pixel of its level; for
super-resolution that is less than the output image).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from chimle.blocks import INSTANCE_NORM_EPS, instance_norm_statistics
from chimle.config import ConfigError
from chimle.generator import Generator
from chimle.tasks import Task, TaskError

STATS = ("image", "tile")


@dataclass(frozen=True)
class Tiling:
    size: int  # tile side, in pixels of the model's input (super-resolution: of the low-resolution image)
    overlap: int = 8  # pixels shared by neighbouring tiles, in the same units
    stats: str = "image"  # instance-norm statistics: of the whole image (extra passes) or of each tile

    def __post_init__(self):
        if self.size < 1:
            raise ConfigError(f"--tile {self.size}: the tile side must be at least 1 px")
        if not 0 <= self.overlap < self.size:
            raise ConfigError(f"--overlap {self.overlap}: must be at least 0 and less than the tile side {self.size}")
        if self.stats not in STATS:
            raise ConfigError(f"tile statistics {self.stats!r}: choose one of {', '.join(STATS)}")


def starts(length: int, size: int, overlap: int) -> list[int]:
    """First pixel of each tile along one side: a step of size - overlap, the last tile ending at the border."""
    if length <= size:
        return [0]
    return [*range(0, length - size, size - overlap), length - size]


def owned(first: list[int], length: int, size: int) -> list[tuple[Fraction, Fraction]]:
    """The disjoint part of the side each tile owns: up to the middle of its overlap with the next one."""
    cuts = [Fraction(a + size + b, 2) for a, b in zip(first[:-1], first[1:])]
    return list(zip([Fraction(0), *cuts], [*cuts, Fraction(length)]))


def ramp(length: int, before: int, after: int) -> torch.Tensor:
    """Weights (length,): a raised-cosine rise over the first `before` pixels, a fall over the last `after`,
    1 between. Two neighbours' ramps over the same band add up to 1 (w(i) + w(band - 1 - i) = 1)."""
    weights = torch.ones(length)
    for band, flip in ((before, False), (after, True)):
        if band:
            rise = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(band) + 0.5) / band)
            if flip:
                weights[-band:] *= rise.flip(0)
            else:
                weights[:band] *= rise
    return weights


def _scale(size: tuple[int, int], reference: tuple[int, int], what: str) -> Fraction:
    """The factor between a level's resolution and the input's, checked to be the same on both sides."""
    fy, fx = Fraction(size[0], reference[0]), Fraction(size[1], reference[1])
    if fy != fx:
        raise TaskError(f"{what} is {size[1]}x{size[0]} px for an input of {reference[1]}x{reference[0]} px: "
                        "its two sides are not scaled alike, so it cannot be cut into tiles")
    return fy


@dataclass
class _Tile:
    top: int
    left: int
    height: int
    width: int
    rows: tuple[Fraction, Fraction]  # the rows it owns, input px (whole-image coordinates)
    cols: tuple[Fraction, Fraction]

    def window(self, x: torch.Tensor, scale: Fraction) -> torch.Tensor:
        """The part of x (N, C, h, w), at `scale` times the input's resolution, under this tile."""
        top, left, height, width = (int(v * scale) for v in (self.top, self.left, self.height, self.width))
        return x[..., top : top + height, left : left + width]

    def own(self, x: torch.Tensor) -> torch.Tensor:
        """The part of a tile's activation x (N, C, h, w) that lies in the region this tile owns."""
        scale = Fraction(x.shape[-2], self.height)
        (r0, r1), (c0, c1) = ((round((a - o) * scale), round((b - o) * scale))
                              for (a, b), o in ((self.rows, self.top), (self.cols, self.left)))
        return x[..., r0:r1, c0:c1]


class _Collected(Exception):
    """Raised to stop a tile's render once the instance norm being measured has been reached."""


class _ImageStatistics:
    """Instance norm with whole-image statistics (see chimle.blocks.instance_norm_statistics): the first
    len(stats) calls use them; the next one adds its sums over the tile's own region to `sums` and stops the
    render (raises _Collected)."""

    def __init__(self, stats: list[tuple[torch.Tensor, torch.Tensor]], tile: _Tile, sums: list):
        self.stats, self.tile, self.sums, self.calls = stats, tile, sums, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        call = self.calls
        self.calls += 1
        if call < len(self.stats):
            mean, var = self.stats[call]
            return (x - mean) * torch.rsqrt(var + INSTANCE_NORM_EPS)
        part = self.tile.own(x).double()
        sums = torch.stack([part.sum((2, 3)), part.pow(2).sum((2, 3))])
        count = part.shape[-2] * part.shape[-1]
        if self.sums:
            self.sums[0] += sums
            self.sums[1] += count
        else:
            self.sums.extend([sums, count])
        raise _Collected


def render_tiled(generator: Generator, task: Task, inputs: list[torch.Tensor], codes: list[torch.Tensor],
                 tiling: Tiling, size: tuple[int, int]) -> torch.Tensor:
    """Final images (N, 3, H', W') in [0, 1] of a batch of codes for one input pyramid, rendered tile by tile.

    `inputs` is the untiled input pyramid (batch N), `codes` the untiled codes (N, code size) per level, `size`
    the (H, W) of the input image that tiles are measured in."""
    cfg, levels = generator.cfg, generator.cfg.levels
    full = generator.start(inputs)
    input_scales = [_scale(tuple(x.shape[-2:]), size, f"input {i}") for i, x in enumerate(inputs)]
    noise_sizes = [generator.input_size(full, level) for level in range(levels)]
    noise_scales = [_scale(hw, size, f"the noise of level {level}") for level, hw in enumerate(noise_sizes)]
    align = math.lcm(*(s.denominator for s in input_scales + noise_scales))
    if tiling.size % align or tiling.overlap % align:
        raise TaskError(f"--tile {tiling.size} --overlap {tiling.overlap}: this model sees the input at 1/{align} "
                        f"of its size at its coarsest level, so both must be multiples of {align} px")

    n = codes[0].shape[0]
    noise = [c[:, cfg.code_dim :].reshape(n, cfg.noise_channels, *hw) for c, hw in zip(codes, noise_sizes)]
    height, width = size
    along = [(starts(side, tiling.size, tiling.overlap), side) for side in size]
    tiles = [_Tile(top, left, min(tiling.size, height - top), min(tiling.size, width - left), rows, cols)
             for top, rows in zip(along[0][0], owned(*along[0], tiling.size))
             for left, cols in zip(along[1][0], owned(*along[1], tiling.size))]

    def render(tile: _Tile) -> torch.Tensor:
        tile_inputs = [tile.window(x, s) for x, s in zip(inputs, input_scales)]
        tile_codes = [torch.cat([c[:, : cfg.code_dim], tile.window(z, s).flatten(1)], dim=1)
                      for c, z, s in zip(codes, noise, noise_scales)]
        raw = generator(tile_inputs, tile_codes)[-1]
        return task.image(raw, tile_inputs, levels - 1)

    # Pass j measures the whole-image statistics of the j-th instance norm (each tile stops there); the first
    # pass that meets no unmeasured instance norm renders the outputs, which are blended.
    stats: list[tuple[torch.Tensor, torch.Tensor]] = []
    scale = task.output_scale(levels)
    band = tiling.overlap * scale
    while True:
        sums: list = []
        out = weight = None
        for tile in tiles:
            try:
                with (instance_norm_statistics(_ImageStatistics(stats, tile, sums)) if tiling.stats == "image"
                      else contextlib.nullcontext()):
                    image = render(tile)
            except _Collected:
                continue
            if out is None:
                out = image.new_zeros(n, image.shape[1], height * scale, width * scale)
                weight = image.new_zeros(height * scale, width * scale)
            wy = ramp(tile.height * scale, band if tile.top > 0 else 0, band if tile.top + tile.height < height else 0)
            wx = ramp(tile.width * scale, band if tile.left > 0 else 0, band if tile.left + tile.width < width else 0)
            w = (wy[:, None] * wx[None, :]).to(image)
            rows = slice(tile.top * scale, (tile.top + tile.height) * scale)
            cols = slice(tile.left * scale, (tile.left + tile.width) * scale)
            out[..., rows, cols] += image * w
            weight[rows, cols] += w
        if not sums:
            return out / weight
        (total, squares), count = sums[0], sums[1]
        mean = total / count
        var = (squares / count - mean.pow(2)).clamp_min(0)
        stats.append((mean.to(codes[0].dtype)[..., None, None], var.to(codes[0].dtype)[..., None, None]))
