"""LPIPS v0.1 perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric") with a VGG16 or AlexNet ImageNet backbone, without torchvision.

    from chimle.perceptual import LPIPS
    lpips = LPIPS("vgg")                    # weights from `chimle weights fetch`, or LPIPS("vgg", "vgg16-397923af.pth")
    d = lpips(x, y)                         # x, y in [0, 1], (N, 3, H, W) -> (N,)

The code search (DESIGN.md 2.2) compares m candidates per target: compute the targets' features once and
call ``lpips.distance(lpips.features(candidates), target_features)`` with B·m candidate rows and B targets.
"""

from __future__ import annotations

from pathlib import Path

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from chimle import weights as weights_lib

# Input normalisation of LPIPS v0.1 (its ScalingLayer), applied after mapping [0, 1] to [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10  # of the channel-wise unit normalisation, as in the official code


def _vgg16() -> tuple[nn.Sequential, list[int]]:
    """torchvision's VGG16 ``features`` up to relu5_3, and the indices of relu1_2 .. relu5_3."""
    layers, channels = [], 3
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU(inplace=True)]
            channels = v
    return nn.Sequential(*layers), [3, 8, 15, 22, 29]


def _alexnet() -> tuple[nn.Sequential, list[int]]:
    """torchvision's AlexNet ``features`` up to relu5, and the indices of relu1 .. relu5."""
    layers = [
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True),
    ]
    return nn.Sequential(*layers), [1, 4, 7, 9, 11]


NETS = {"vgg": _vgg16, "alex": _alexnet}
FULL_DEPTH = {"vgg": 16, "alex": 31}  # smallest image side at which every tapped layer has pixels


def _fits(layer: nn.Module, h: torch.Tensor) -> bool:
    """Whether a conv or pooling window fits in the (padded) feature map, i.e. the output is not empty."""
    if not isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
        return True
    k, p = layer.kernel_size, layer.padding
    k, p = (k, k) if isinstance(k, int) else k, (p, p) if isinstance(p, int) else p
    return h.shape[-2] + 2 * p[0] >= k[0] and h.shape[-1] + 2 * p[1] >= k[1]


def unit_normalise(h: torch.Tensor) -> torch.Tensor:
    """Divide each pixel's feature vector by its length (plus EPS), over channels, in float32 (features computed
    under bfloat16 autocast are brought back to float32 here: the distances built on them stay float32)."""
    h = h.float()
    return h / (torch.linalg.vector_norm(h, dim=1, keepdim=True) + EPS)


class LPIPS(nn.Module):
    """LPIPS v0.1 distance between images in [0, 1], (N, 3, H, W), any H and W; returns (N,).

    Per layer: unit-normalised features, squared difference weighted by the non-negative linear weights per
    channel, averaged over the H·W positions (the official code divides by W², wrong for non-square
    images); summed over the layers (VGG16: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3; AlexNet: relu1..5).

    Small images: below `min_size` px (default: the smallest size at which every layer has pixels, 16 for
    VGG16 and 31 for AlexNet) both images are upsampled bilinearly, keeping the aspect ratio, so that all
    five layers, whose linear weights were calibrated together, take part. 8x8 targets occur in the
    generator's first level; the official code crashes there. With `min_size=0` nothing is upsampled and a
    layer whose input is smaller than its window is skipped with every later one (VGG16 keeps 4 layers below
    16 px and 3 below 8 px; AlexNet needs 7 px for its first layer, 15 for the second, 31 for the rest).
    Either way, distances are comparable only between images of the same size.

    The network is frozen (no parameter gradients, eval mode) but differentiable w.r.t. its inputs.
    """

    def __init__(self, net: str = "vgg", weights: str | Path | None = None, min_size: int | None = None):
        super().__init__()
        if net not in NETS:
            raise ValueError(f"unknown LPIPS backbone {net!r}; choose one of {', '.join(NETS)}")
        self.net = net
        self.min_size = FULL_DEPTH[net] if min_size is None else min_size
        self.backbone, taps = NETS[net]()
        self.taps = frozenset(taps)
        channels = [self.backbone[i - 1].out_channels for i in taps]  # the conv before each tapped ReLU
        self.lin = nn.ParameterList([nn.Parameter(torch.zeros(c)) for c in channels])
        # x*2-1 then (x-shift)/scale, folded into one multiply-add.
        scale, shift = torch.tensor(SCALE).view(1, 3, 1, 1), torch.tensor(SHIFT).view(1, 3, 1, 1)
        self.register_buffer("in_mul", 2 / scale, persistent=False)
        self.register_buffer("in_add", (-1 - shift) / scale, persistent=False)
        self.load_state_dict(weights_lib.load(f"lpips-{net}", weights))
        self.requires_grad_(False)
        self.eval()
        # oneDNN convolutions run 1.2-2x faster channels-last on CPU (more for large images); inputs follow
        # the module's layout in `features`, and `.to(memory_format=torch.contiguous_format)` undoes it.
        self.to(memory_format=torch.channels_last)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised feature maps of images ``x`` in [0, 1], one per layer that exists at this size."""
        side = min(x.shape[-2:])
        if side < self.min_size:
            size = [math.ceil(n * self.min_size / side) for n in x.shape[-2:]]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        h = torch.addcmul(self.in_add, x, self.in_mul)
        if self.backbone[0].weight.is_contiguous(memory_format=torch.channels_last):
            # Follow the module's layout: mixing layouts makes oneDNN reorder every activation.
            h = h.contiguous(memory_format=torch.channels_last)
        feats = []
        for i, layer in enumerate(self.backbone):
            if not _fits(layer, h):
                break  # and so would every later layer: the map only shrinks
            h = layer(h)
            if i in self.taps:
                feats.append(unit_normalise(h))
        if not feats:
            raise ValueError(f"images of {x.shape[-2]}x{x.shape[-1]} px are too small for LPIPS-{self.net}")
        return feats

    def distance(self, fx: list[torch.Tensor], fy: list[torch.Tensor]) -> torch.Tensor:
        """Distances (N,) from N = B·m feature rows ``fx`` to B rows ``fy``: block k of m rows goes with row k."""
        if len(fx) != len(fy):
            raise ValueError(f"feature lists differ in length ({len(fx)} vs {len(fy)}): images of different sizes?")
        n, b = fx[0].shape[0], fy[0].shape[0]
        if n % b:
            raise ValueError(f"{n} rows of fx cannot be split into blocks for {b} rows of fy")
        total = fx[0].new_zeros(b, n // b)
        with torch.autocast(fx[0].device.type, enabled=False):  # float32 under autocast too (see unit_normalise)
            for f, g, w in zip(fx, fy, self.lin):
                hh, ww = f.shape[-2:]
                # A broadcast view of g stands for its m-fold repeat.
                d = f.unflatten(0, (b, n // b)) - g.unsqueeze(1)
                total = total + torch.einsum("bmchw,c->bm", d * d, w / (hh * ww))
        return total.view(n)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS distances (N,) between images ``x`` and ``y`` (y has N rows, or N/m rows for blocks of m)."""
        return self.distance(self.features(x), self.features(y))


class Distance(nn.Module):
    """The distance the code search minimises and training pulls down (DESIGN.md §2.1): LPIPS, plus
    `pixel_weight` x the mean absolute difference of the images in [0, 1].

    The paper uses LPIPS alone (weight 0). LPIPS normalises features over channels and is nearly blind to
    smooth colour and brightness shifts; a large model trained for days learns colours anyway, but a CPU-sized
    one trained for minutes does not. A small pixel term fixes that without changing what is searched for.
    Same interface as `LPIPS` (features, distance in blocks, forward), so the search takes either.
    """

    def __init__(self, lpips: LPIPS, pixel_weight: float = 0.0):
        super().__init__()
        self.lpips, self.pixel_weight = lpips, pixel_weight

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """LPIPS features, then (with a pixel term) the images themselves."""
        features = self.lpips.features(x)
        return [*features, x] if self.pixel_weight else features

    def distance(self, fx: list[torch.Tensor], fy: list[torch.Tensor]) -> torch.Tensor:
        """Distances (N,) from N = B·m rows to B rows, in blocks of m as in `LPIPS.distance`."""
        if not self.pixel_weight:
            return self.lpips.distance(fx, fy)
        x, y = fx[-1].float(), fy[-1].float()  # float32 under autocast too
        n, b = x.shape[0], y.shape[0]
        pixel = (x.unflatten(0, (b, n // b)) - y.unsqueeze(1)).abs().mean((2, 3, 4)).view(n)
        return self.lpips.distance(fx[:-1], fy[:-1]) + self.pixel_weight * pixel

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.distance(self.features(x), self.features(y))
