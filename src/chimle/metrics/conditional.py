"""Do the outputs follow their input? Consistent share, consistent diversity, Fréchet Joint Distance (DESIGN.md §2.6).

    ok = consistent(agreement, tolerance=45.0, higher_is_better=True)   # (K,) which samples agree with the input
    ok.float().mean()                                                   # the input's consistent share
    consistent_diversity(pairwise_lpips(lpips, features), ok)           # LPIPS diversity among those samples only
    fjd(real, real_inputs, fake, fake_inputs)                           # (FJD, alpha) on Inception features

A model can look diverse by ignoring its input. Consistency asks of each sample whether it could have produced
the input: degraded again as the input was made (for super-resolution, downsampled), it must land within a
tolerance of the input (`agreement` is that measurement, e.g. PSNR in dB against the input). Per input, the share
of consistent samples says how often the model respects its input, and the LPIPS diversity among the consistent
samples alone says how much variety is left once outputs that contradict the input are set aside (None where
fewer than two are consistent).

The Fréchet Joint Distance (DeVries et al., "On the Evaluation of Conditional GANs", 2019) is FID on joint
embeddings: each image's Inception features concatenated with α times those of the input it belongs to, real
pairs (x_i, y_i) against generated pairs (x_i, ŷ_ij). FID only compares the two sets of images, so it cannot see
outputs that are realistic but belong to another input; FJD can, because it also compares how image features
vary with input features. α, the mean norm of the real images' features over that of their inputs', makes both
halves weigh alike (as DeVries et al. set it); reports record it. Where a method has more samples per input than the
real set has pairs, each input appears once per sample, as FJD's reference code does for several samples per
condition. Like FID it is biased by the number of images: compare only FJDs from the same counts.
"""

from __future__ import annotations

import numpy as np
import torch

from chimle.metrics.fid import fid


def consistent(agreement: torch.Tensor, tolerance: float, higher_is_better: bool) -> torch.Tensor:
    """(K,) bool: which samples agree with their input within `tolerance` (at least it, or at most it)."""
    agreement = torch.as_tensor(agreement)
    return agreement >= tolerance if higher_is_better else agreement <= tolerance


def consistent_diversity(pair_distances: torch.Tensor, mask: torch.Tensor) -> float | None:
    """Mean of the pairwise distances (K(K-1)/2,), in `torch.combinations` order, over the pairs whose two
    samples are both consistent (`mask`, (K,)); None with fewer than two consistent samples."""
    mask = torch.as_tensor(mask, dtype=torch.bool)
    if int(mask.sum()) < 2:
        return None
    i, j = torch.combinations(torch.arange(len(mask))).unbind(1)
    return float(torch.as_tensor(pair_distances)[mask[i] & mask[j]].double().mean())


def joint_alpha(image_features: np.ndarray, input_features: np.ndarray) -> float:
    """FJD's α: the mean L2 norm of the image features over the mean norm of their inputs' features."""
    image_norm = np.linalg.norm(np.asarray(image_features, dtype=np.float64), axis=1).mean()
    input_norm = np.linalg.norm(np.asarray(input_features, dtype=np.float64), axis=1).mean()
    if input_norm == 0:
        raise ValueError("the input features are all zero: FJD's scale α is undefined")
    return float(image_norm / input_norm)


def fjd(real: np.ndarray, real_inputs: np.ndarray, fake: np.ndarray, fake_inputs: np.ndarray,
        alpha: float | None = None) -> tuple[float, float]:
    """Fréchet Joint Distance and its α (computed from the real pairs unless given): FID between the real joint
    features [φ(y_i), α φ(x_i)] (N, 2D) and the generated ones [φ(ŷ_j), α φ(x of ŷ_j)] (M, 2D)."""
    if len(real) != len(real_inputs) or len(fake) != len(fake_inputs):
        raise ValueError(f"one input per image: {len(real)} real images with {len(real_inputs)} inputs, "
                         f"{len(fake)} generated images with {len(fake_inputs)} inputs")
    alpha = joint_alpha(real, real_inputs) if alpha is None else alpha
    joint_real = np.concatenate([real, alpha * np.asarray(real_inputs, dtype=np.float64)], axis=1)
    joint_fake = np.concatenate([fake, alpha * np.asarray(fake_inputs, dtype=np.float64)], axis=1)
    return fid(joint_real, joint_fake), alpha
