"""The TIM generator ("Tower Implicit Model"): a tower of levels, each rendering the image at twice the
resolution of the one before and depending only on the codes of the levels up to its own (DESIGN.md §2.3).

Level l (0-based here, `level_{l+1}` in the official release) takes
    its image input (see the wirings below)  ++  its code's noise map  ++  0.1 x the previous level's features
through a conv, a style block driven by the chained mapping network, and an upsampling block, and predicts a
tanh image. The three wirings:
    generic            level l sees the input downsampled by 2**(L-1-l); output, then upsample the features
    super-resolution   level 0 sees the low-resolution input, level l > 0 the previous raw tanh output in
                       [-1, 1]; upsample, then output (so outputs are 2x, 4x, ... the input)
    colourization      like generic, with the L channel as input and two chroma channels as output; the last
                       level refines its features without upsampling before its output

With `model.predict_residual` (not in the paper) each level's tanh output is a correction added to its image
input brought to the output's size: bicubic x2 of the low-resolution input or the previous output for
super-resolution, the level's own input for the generic wiring (so only where outputs are images like the
inputs). The correction's last convolution starts at zero, so an untrained tower outputs that input as it is.

Because level l depends on levels < l only through a small state (their styles, the upsampled features and
the last output), `start` + `render_level` render one level at a time from a cached `Prefix`: the code
search renders the prefix of an example once and only the current level for each candidate.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from chimle.blocks import MappingNetwork, StyleBlock, Upsample, WNConv2d, leaky
from chimle.config import ModelConfig

FEATURE_SCALE = 0.1  # scale of the previous level's features at the next level's input (official: 0.1)


@dataclass
class Prefix:
    """What levels 0..level-1 of a batch of examples leave for `level`."""

    inputs: list[torch.Tensor]  # the image inputs of the levels (one per level; super-resolution: one in all)
    styles: list[torch.Tensor]  # style vectors w_0..w_{level-1}, each (N, style_dim)
    features: torch.Tensor | None  # the previous level's upsampled features (N, C, H, W), unscaled
    output: torch.Tensor | None  # the previous level's raw tanh output (N, out_channels, H, W)
    level: int  # the next level to render

    @property
    def batch(self) -> int:
        return self.inputs[0].shape[0]

    def map(self, fn) -> Prefix:
        """Apply `fn` to every per-example tensor (e.g. to repeat or index the batch)."""
        return replace(
            self,
            inputs=[fn(t) for t in self.inputs],
            styles=[fn(t) for t in self.styles],
            features=None if self.features is None else fn(self.features),
            output=None if self.output is None else fn(self.output),
        )

    def repeat(self, n: int) -> Prefix:
        """Each example repeated n times in a row (n candidates per example)."""
        return self.map(lambda t: t.repeat_interleave(n, dim=0))

    def index(self, idx: torch.Tensor) -> Prefix:
        return self.map(lambda t: t[idx])


class Level(nn.Module):
    """One module of the tower. Attribute names mirror the official `level_{k}_{name}` modules."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        channels, growth = cfg.channels[index], cfg.growth[index]
        previous = cfg.channels[index - 1] if index > 0 else 0
        self.map_0 = nn.Linear(cfg.code_dim, cfg.style_dim)
        self.map = MappingNetwork(cfg.style_dim * (index + 1), cfg.style_dim, cfg.mapping_layers)
        self.feat = WNConv2d(cfg.in_channels + cfg.noise_channels + previous, channels)
        self.style = StyleBlock(channels, growth, cfg.blocks, cfg.style_dim)
        last = index == cfg.levels - 1
        if cfg.wiring == "colourization" and last:
            self.up = Upsample(channels, scale=1)  # refines its features without upsampling
        elif cfg.wiring == "generic" and last:
            self.up = None  # the generic tower's last features go nowhere; the official file has them, unused
        else:
            self.up = Upsample(channels)
        self.out = WNConv2d(channels, cfg.out_channels)
        if cfg.predict_residual:
            # The correction starts at zero (g = 0 makes the normalised weight zero and still gets a gradient), so
            # an untrained tower outputs its input brought to size: bicubic x2 per level for super-resolution.
            with torch.no_grad():
                self.out.weight_g.zero_()
                self.out.bias.zero_()


class Generator(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.levels = nn.ModuleList(Level(cfg, i) for i in range(cfg.levels))

    # Shapes -------------------------------------------------------------------------------------------------

    def input_size(self, prefix: Prefix, level: int) -> tuple[int, int]:
        """(H, W) at which `level`'s input, and so its noise map, is formed."""
        if self.cfg.wiring == "super-resolution":
            h, w = prefix.inputs[0].shape[-2:]
            return h * 2**level, w * 2**level
        return tuple(prefix.inputs[level].shape[-2:])

    def code_sizes(self, prefix: Prefix) -> list[int]:
        """Numbers in each level's code: code_dim for the mapping network + a noise map of noise_channels x H x W."""
        sizes = []
        for level in range(self.cfg.levels):
            h, w = self.input_size(prefix, level)
            sizes.append(self.cfg.code_dim + self.cfg.noise_channels * h * w)
        return sizes

    def check_inputs(self, inputs: list[torch.Tensor]) -> None:
        expected = 1 if self.cfg.wiring == "super-resolution" else self.cfg.levels
        if len(inputs) != expected:
            raise ValueError(f"the {self.cfg.wiring} wiring takes {expected} input image(s), got {len(inputs)}")
        for level, x in enumerate(inputs):
            if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
                raise ValueError(f"input {level} must be (N, {self.cfg.in_channels}, H, W), got {tuple(x.shape)}")

    # Rendering ----------------------------------------------------------------------------------------------

    def start(self, inputs: list[torch.Tensor]) -> Prefix:
        """The empty prefix of a batch: nothing rendered yet."""
        self.check_inputs(inputs)
        return Prefix(inputs=list(inputs), styles=[], features=None, output=None, level=0)

    def render_level(self, prefix: Prefix, code: torch.Tensor) -> tuple[torch.Tensor, Prefix]:
        """Render `prefix.level` for the batch with `code` (N, code size); return its raw tanh output and the
        prefix for the next level."""
        cfg, level = self.cfg, prefix.level
        module = self.levels[level]
        n = prefix.batch
        h, w = self.input_size(prefix, level)
        if code.shape != (n, cfg.code_dim + cfg.noise_channels * h * w):
            raise ValueError(
                f"level {level} needs codes of shape ({n}, {cfg.code_dim + cfg.noise_channels * h * w}), "
                f"got {tuple(code.shape)}"
            )

        # Chained mapping: this level's embedding, then the styles of all coarser levels (official order).
        embedded = leaky(module.map_0(code[:, : cfg.code_dim]))
        style = module.map(torch.cat([embedded, *prefix.styles], dim=1))

        if cfg.wiring == "super-resolution" and level > 0:
            image = prefix.output
        else:
            image = prefix.inputs[level]
        parts = [image, code[:, cfg.code_dim :].reshape(n, cfg.noise_channels, h, w)]
        if level > 0:
            parts.append(FEATURE_SCALE * prefix.features)
        features = module.style(module.feat(torch.cat(parts, dim=1)), style)

        last = level == cfg.levels - 1
        if cfg.wiring == "super-resolution" or (cfg.wiring == "colourization" and last):
            features = module.up(features)
            out = torch.tanh(module.out(features))
        else:
            out = torch.tanh(module.out(features))
            features = module.up(features) if not last else None
        if cfg.predict_residual:
            out = out + (upsample_image(image) if cfg.wiring == "super-resolution" else image)

        return out, Prefix(prefix.inputs, [*prefix.styles, style], features, out, level + 1)

    def forward(self, inputs: list[torch.Tensor], codes: list[torch.Tensor]) -> list[torch.Tensor]:
        """Raw tanh outputs of the first len(codes) levels."""
        prefix = self.start(inputs)
        outputs = []
        for code in codes:
            out, prefix = self.render_level(prefix, code)
            outputs.append(out)
        return outputs

    def mapping_parameters(self) -> list[nn.Parameter]:
        """Parameters of the mapping networks (trained at a lower rate, DESIGN.md §2.5)."""
        return [p for level in self.levels for m in (level.map_0, level.map) for p in m.parameters()]


def upsample_image(image: torch.Tensor) -> torch.Tensor:
    """An image at twice its size (bicubic): what a super-resolution level with model.predict_residual corrects."""
    return F.interpolate(image, scale_factor=2, mode="bicubic", align_corners=False)


def initialise(generator: Generator, scheme: str) -> Generator:
    """Set the initial weights of a freshly built generator by `scheme` (config `train.init`):

    pytorch   as constructed: PyTorch's default init (uniform conv and Linear weights and biases), the style
              heads zero, so that the style starts as a plain instance norm.
    official  what the official release effectively does (DESIGN.md §2.3): its kaiming-normal x 0.1 init is
              written into the convolutions' derived `weight`, which weight norm recomputes from (g, v) on every
              forward, so only its zero biases take effect there; every Linear (mapping networks, style heads)
              is kaiming-normal (fan-in) x 0.1 with zero bias, so the styles start small but not zero.

    `pytorch` is the default because it did at least as well: with the `small` recipe for x16 super-resolution at 8
    CPU-minutes (benchmarks/results/quality.md, seed 0), best-of-8 LPIPS / bicubic was 1.009 (built-in held-out
    tiles) and 0.921 (open photo set) with `pytorch` against 1.050 and 0.950 with `official`; the spread of
    `pytorch` over three seeds was 1.009-1.046 and 0.921-0.943.
    """
    if scheme == "official":
        with torch.no_grad():
            for module in generator.modules():
                if isinstance(module, WNConv2d):
                    module.bias.zero_()
                elif isinstance(module, nn.Linear):
                    nn.init.kaiming_normal_(module.weight, mode="fan_in")
                    module.weight.mul_(0.1)
                    module.bias.zero_()
    elif scheme != "pytorch":
        raise ValueError(f"unknown initialisation {scheme!r}; choose official or pytorch")
    return generator


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
