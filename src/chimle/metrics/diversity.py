"""How different the samples of one input are, and faithfulness-weighted variance (DESIGN.md §2.6).

    lpips = LPIPS("vgg")
    group = SampleGroup.of(lpips, samples, target)       # the K samples of one input and its ground truth
    pairwise_lpips(lpips, group.features).mean()         # LPIPS diversity: mean over the K(K-1)/2 pairs
    d = DISTANCES["lpips"].measure(group)                # (K,) distance of each sample to the ground truth
    s = SPREADS["lpips"].measure(group)                  # (K,) deviation of each sample from the samples' mean
    fwv(d, s)                                            # {0.3: ..., 0.2: ..., 0.15: ...}

LPIPS diversity (Zhu et al. 2017, BicycleGAN; the common protocol takes 19 pairs of 100 inputs) is the mean
LPIPS between two samples of the same input; by default over all pairs of the K samples, or over a fixed set of
pairs (`consecutive_pairs`: samples (0, 1), (1, 2), ..., (N-1, N), so 19 pairs chain 20 samples, our reading of
the 19-pairs protocol).

Faithfulness-weighted variance counts only samples near the truth as diversity: for input i with samples
y_i1..y_iK and ground truth y_i, w_ij = exp(-d_ij² / (2 σ²)) and FWV_σ = mean over i, j of w_ij·s_ij. The
papers do not pin d and s down; the choices are named in DISTANCES and SPREADS and recorded in reports.
The defaults are LPIPS to the ground truth for d, and for s the squared deviation of the sample's LPIPS
features from the mean features of the input's samples, weighted as LPIPS weighs them: the variance LPIPS
itself sees, whose mean over the K samples is (K - 1) / (2K) times the mean pairwise LPIPS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from chimle.perceptual import LPIPS

SIGMAS = (0.3, 0.2, 0.15)  # FWV bandwidths reported by the papers


def pairwise_lpips(lpips: LPIPS, features: list[torch.Tensor], batch: int = 64) -> torch.Tensor:
    """LPIPS between every unordered pair of K images given their LPIPS features: (K(K-1)/2,), pairs in
    `torch.combinations` order, `batch` pairs at a time."""
    k = features[0].shape[0]
    pairs = torch.combinations(torch.arange(k, device=features[0].device))
    out = [torch.zeros(0)]
    for start in range(0, len(pairs), batch):
        i, j = pairs[start : start + batch].unbind(1)
        out.append(lpips.distance([f[i] for f in features], [f[j] for f in features]).cpu())
    return torch.cat(out)


def consecutive_pairs(k: int, n: int) -> torch.Tensor:
    """(K(K-1)/2,) bool mask, in `pairwise_lpips` order, of the n pairs of consecutive samples (0, 1) .. (n-1, n)."""
    if not 1 <= n <= k - 1:
        raise ValueError(f"{n} pairs of consecutive samples need at least {n + 1} samples per input, got {k}")
    i, j = torch.combinations(torch.arange(k)).unbind(1)
    return (j == i + 1) & (i < n)


@dataclass
class SampleGroup:
    """The K samples of one input with its ground truth, and their LPIPS features (computed once)."""

    samples: torch.Tensor  # (K, 3, H, W) in [0, 1]
    target: torch.Tensor  # (1, 3, H, W) in [0, 1]
    lpips: LPIPS
    features: list[torch.Tensor]  # LPIPS features of the samples
    target_features: list[torch.Tensor]  # LPIPS features of the target
    _to_target: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    @torch.no_grad()
    def of(cls, lpips: LPIPS, samples: torch.Tensor, target: torch.Tensor, batch: int = 16,
           target_features: list[torch.Tensor] | None = None) -> SampleGroup:
        """Compute the features, `batch` images at a time (the target's unless given)."""
        chunks = [lpips.features(samples[s : s + batch]) for s in range(0, len(samples), batch)]
        features = [torch.cat(layer) for layer in zip(*chunks)]
        return cls(samples, target, lpips, features, target_features or lpips.features(target))

    @torch.no_grad()
    def lpips_to_target(self) -> torch.Tensor:
        """LPIPS (K,) of each sample to the ground truth."""
        if self._to_target is None:
            self._to_target = self.lpips.distance(self.features, self.target_features)
        return self._to_target


@torch.no_grad()
def lpips_spread(group: SampleGroup) -> torch.Tensor:
    """(K,) squared deviation of each sample's LPIPS features from the mean features of the group, channel-
    weighted and averaged over positions exactly as LPIPS compares two images."""
    mean = [f.mean(0, keepdim=True) for f in group.features]
    return group.lpips.distance(group.features, mean)


def pixel_spread(group: SampleGroup) -> torch.Tensor:
    """(K,) mean squared deviation of each sample's RGB values in [0, 1] from the per-pixel mean of the group."""
    x = group.samples.float()
    return (x - x.mean(0, keepdim=True)).pow(2).flatten(1).mean(1)


def rmse_to_target(group: SampleGroup) -> torch.Tensor:
    """(K,) root-mean-square difference of RGB in [0, 1] between each sample and the ground truth."""
    return (group.samples.float() - group.target.float()).pow(2).flatten(1).mean(1).sqrt()


@dataclass(frozen=True)
class Choice:
    """A named way to measure d or s, with the sentence that documents it in reports."""

    description: str
    measure: Callable[[SampleGroup], torch.Tensor]


DISTANCES = {
    "lpips": Choice("LPIPS between the sample and the ground truth", lambda g: g.lpips_to_target()),
    "rmse": Choice("root-mean-square RGB difference (in [0, 1]) between the sample and the ground truth",
                   rmse_to_target),
}
SPREADS = {
    "lpips": Choice("squared deviation of the sample's LPIPS features from the mean features of the input's "
                    "samples, weighted and averaged as LPIPS does (its mean over K samples is (K-1)/(2K) x the "
                    "mean pairwise LPIPS)", lpips_spread),
    "pixel": Choice("mean squared deviation of the sample's RGB values (in [0, 1]) from the per-pixel mean of "
                    "the input's samples (its mean over samples is the per-pixel variance)", pixel_spread),
}


def fwv(distances, spreads, sigmas=SIGMAS) -> dict[float, float]:
    """Faithfulness-weighted variance: mean of exp(-d² / (2σ²))·s over all samples of all inputs, per σ.

    `distances` and `spreads` are matching arrays (one entry per sample, any shape)."""
    d = torch.as_tensor(distances, dtype=torch.float64).flatten()
    s = torch.as_tensor(spreads, dtype=torch.float64).flatten()
    if d.shape != s.shape or d.numel() == 0:
        raise ValueError(f"FWV needs one distance and one spread per sample, got {d.numel()} and {s.numel()}")
    return {sigma: float((torch.exp(-d * d / (2 * sigma * sigma)) * s).mean()) for sigma in sigmas}
