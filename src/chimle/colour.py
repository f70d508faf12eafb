"""sRGB <-> CIE Lab (D65 white, 2° observer), differentiable, for colourization (DESIGN.md §2.3).

Images are (N, 3, H, W) tensors: sRGB in [0, 1]; Lab with L in [0, 100] and a, b roughly in [-128, 127].
The constants are the sRGB standard's (IEC 61966-2-1) primaries and transfer curve and the CIE 1976 L*a*b*
definition, so the values match the usual reference tables (white -> (100, 0, 0), pure red -> (53.24, 80.09,
67.20), ...).
"""

from __future__ import annotations

import torch

# Linear sRGB -> XYZ (D65), rows X, Y, Z; and the D65 reference white.
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_WHITE = (0.950456, 1.0, 1.088754)
_DELTA = 6 / 29  # where the CIE cube-root curve turns linear


def _matrix(x: torch.Tensor, rows) -> torch.Tensor:
    m = torch.tensor(rows, dtype=x.dtype, device=x.device)
    return torch.einsum("ij,njhw->nihw", m, x)


def _to_linear(c: torch.Tensor) -> torch.Tensor:
    return torch.where(c <= 0.04045, c / 12.92, ((c.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4)


def _to_gamma(c: torch.Tensor) -> torch.Tensor:
    return torch.where(c <= 0.0031308, 12.92 * c, 1.055 * c.clamp_min(0.0031308) ** (1 / 2.4) - 0.055)


def _f(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > _DELTA**3, t.clamp_min(_DELTA**3) ** (1 / 3), t / (3 * _DELTA**2) + 4 / 29)


def _f_inverse(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > _DELTA, t**3, 3 * _DELTA**2 * (t - 4 / 29))


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] -> Lab (L in [0, 100])."""
    xyz = _matrix(_to_linear(rgb.clamp(0, 1)), _RGB_TO_XYZ)
    white = torch.tensor(_WHITE, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    fx, fy, fz = _f(xyz / white).unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def _clip_to_gamut(linear: torch.Tensor) -> torch.Tensor:
    """Linear RGB clipped to [0, 1], gradient included: what the loss sees is the colour a user gets, and a colour
    beyond the gamut gets no gradient. (The official release clips only at 0 while training. Passing the gradient
    through the clip at 1 instead, straight-through, made the luminance-premultiplied chroma run away: the `small`
    recipe's loss rose from 2.9 to 3.2 over its first 60 steps instead of falling from 1.9 to 1.2, and a model
    trained for 24 rounds painted every sample saturated green. tests/test_tasks.py keeps that from coming back.)"""
    return linear.clamp(0, 1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Lab -> sRGB, clamped to [0, 1] (colours outside the sRGB gamut are clipped: `_clip_to_gamut`)."""
    L, a, b = lab.unbind(1)
    fy = (L + 16) / 116
    f = torch.stack([fy + a / 500, fy, fy - b / 200], dim=1)
    white = torch.tensor(_WHITE, dtype=lab.dtype, device=lab.device).view(1, 3, 1, 1)
    xyz = _f_inverse(f) * white
    inverse = torch.linalg.inv(torch.tensor(_RGB_TO_XYZ, dtype=torch.float64)).to(lab.dtype).tolist()
    return _to_gamma(_clip_to_gamut(_matrix(xyz, inverse)))


def lightness(rgb: torch.Tensor) -> torch.Tensor:
    """The L channel of sRGB images, (N, 1, H, W) in [0, 100]; a 1-channel input is read as grey sRGB."""
    if rgb.shape[1] == 1:
        rgb = rgb.expand(-1, 3, -1, -1)
    return rgb_to_lab(rgb)[:, :1]


def grey(rgb: torch.Tensor) -> torch.Tensor:
    """The grey sRGB image (N, 3, H, W) with the same L channel: what a colourization model is given."""
    L = lightness(rgb)
    return lab_to_rgb(torch.cat([L, torch.zeros_like(L), torch.zeros_like(L)], dim=1))
