"""Fidelity to a reference image: PSNR and SSIM per image, batched.

    from chimle.metrics.image import psnr, ssim
    psnr(samples, target)        # (N, 3, H, W) vs (N or 1, 3, H, W), in [0, 1] -> (N,) dB
    ssim(samples, target)        # -> (N,)

Both take RGB images in [0, 1] (data range 1) and average over the three channels; `target` may have one row,
compared with every row of `x`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11  # side of the Gaussian window, px (Wang et al. 2004)
SSIM_SIGMA = 1.5  # its standard deviation, px (Wang et al. 2004)
SSIM_K1, SSIM_K2 = 0.01, 0.03  # stabilising constants, times the data range (Wang et al. 2004)
PSNR_MAX = 100.0  # dB reported for identical images (the MSE is floored at 1e-10)


def _check(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 4 or y.ndim != 4 or x.shape[1:] != y.shape[1:] or len(y) not in (1, len(x)):
        raise ValueError(f"expected images (N, C, H, W) and (N or 1, C, H, W) of the same size, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of images in [0, 1], per image (N,): 10 log10(1 / MSE)."""
    _check(x, y)
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(10 ** (-PSNR_MAX / 10)))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalised 1-D Gaussian (size,) whose outer product with itself is SSIM's 2-D window."""
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-t * t / (2 * sigma * sigma))
    return (g / g.sum()).float()


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) of images in [0, 1], per image (N,).

    The original definition: local means, variances and covariance under an 11x11 Gaussian window (sigma 1.5)
    at every position where the window fits inside the image (no padding), population statistics,
    C1 = (0.01)^2 and C2 = (0.03)^2 for a data range of 1; the SSIM map averaged over positions and channels.
    """
    _check(x, y)
    h, w = x.shape[-2:]
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} px, got {w}x{h}")
    x, y = x.float(), y.float().expand_as(x)
    channels = x.shape[1]
    g = gaussian_window().to(x.device)
    # One depthwise, separable Gaussian filter over the five maps x, y, x², y², xy at once.
    maps = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    maps = F.conv2d(maps, g.view(1, 1, -1, 1).expand(5 * channels, 1, -1, 1), groups=5 * channels)
    maps = F.conv2d(maps, g.view(1, 1, 1, -1).expand(5 * channels, 1, 1, -1), groups=5 * channels)
    mx, my, xx, yy, xy = maps.split(channels, dim=1)
    vx, vy, cov = xx - mx * mx, yy - my * my, xy - mx * my
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    index = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return index.flatten(1).mean(1)


def batched(metric, x: torch.Tensor, y: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """`metric(x, y)` over rows of x in chunks of `batch` (y: one row, or as many as x), on the CPU."""
    out = []
    for start in range(0, len(x), batch):
        chunk_y = y if len(y) == 1 else y[start : start + batch]
        out.append(metric(x[start : start + batch], chunk_y).cpu())
    return torch.cat(out) if out else torch.zeros(0)

