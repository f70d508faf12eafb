"""FID and KID on the pool3 features of the TF Inception-v3 (DESIGN.md §2.6).

    from chimle.metrics.fid import InceptionFeatures, fid, kid
    extract = InceptionFeatures(device="cpu")       # weights from `chimle weights fetch`; resize="clean" for clean-fid's
    real, fake = extract(real_images), extract(generated_images)   # [0, 1] images -> (N, 2048) float64
    fid(real, fake)                                  # Fréchet distance, float64
    kid(real, fake)                                  # (mean, std) of the unbiased MMD² over subsets

Protocol, that of the reference TensorFlow code (Heusel et al. 2017) so that numbers compare with papers:
images in [0, 1] are quantised to uint8 levels round(255 x) as if saved to PNG, resized to 299 x 299 by TF 1.x's
bilinear ResizeBilinear (see `chimle.metrics.inception.preprocess`), scaled as (v - 128) / 128, and passed
through the TF Inception-v3 of 2015-12-05 (`chimle.metrics.inception.FIDInception`) to its 2048-d pool3
features. The TF graph resizes inside the network; here the resize is a separate, documented step. clean-fid
(Parmar et al., "On Aliased Resizing and Surprising Subtleties in GAN Evaluation", CVPR 2022) keeps the network
and the scaling but resizes with Pillow's anti-aliased bicubic filter instead (`resize="clean"`): the two give
different FIDs for the same images, so a report names the one it used (`RESIZE`).

FID is ||mu_r - mu_g||² + tr(S_r + S_g - 2 (S_r S_g)^½) with the unbiased covariances (ddof = 1), computed in
float64 without a general matrix square root: tr (S_r S_g)^½ is the sum of the square roots of the eigenvalues
of the symmetric PSD matrix S_r^½ S_g S_r^½, which has the eigenvalues of S_r S_g, or, with fewer images than
dimensions, the sum of the singular values of a product of the centred features (see `fid`). No complex parts
to discard, and singular covariances are exact. FID is biased by the number of images: compare
only FIDs computed from the same counts. KID (Bińkowski et al. 2018) is unbiased: the MMD² with the kernel
k(x, y) = (x·y / 2048 + 1)³, estimated without the diagonal terms, averaged over random subsets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from chimle.metrics.inception import INPUT_SIZE, FIDInception, preprocess

MIN_IMAGES_FOR_FID = 2048  # below this many images per set the 2048-d covariance is singular and FID very biased
KID_SUBSET_SIZE = 1000  # images per KID subset (Bińkowski et al. 2018)
KID_SUBSETS = 100  # random subsets whose MMD² is averaged

RESIZE = {  # the two resize conventions of chimle.metrics.inception.RESIZES, as reports name them
    "tf": f"tf: to {INPUT_SIZE}x{INPUT_SIZE}, bilinear as TF 1.x ResizeBilinear (align_corners=False, "
          "half_pixel_centers=False, no anti-aliasing), on the uint8 levels, not re-rounded (the TF FID code's)",
    "clean": f"clean: to {INPUT_SIZE}x{INPUT_SIZE}, Pillow BICUBIC (anti-aliased) per channel on the uint8 levels "
             "as 32-bit floats, clipped to [0, 255], not re-rounded (clean-fid's, Parmar et al. 2022)",
}
PROTOCOL = {
    "network": "TF Inception-v3 2015-12-05, pool3 (2048-d), as chimle.metrics.inception.FIDInception",
    "quantisation": "round(255 x) to uint8 levels, as images saved to PNG",
    "resize": RESIZE["tf"],
    "scaling": "(v - 128) / 128",
    "frechet": "float64; unbiased covariances (ddof=1); tr sqrt(S1 S2) from the eigenvalues of S1^1/2 S2 S1^1/2, "
               "or with fewer images than dimensions from the singular values of A1 A2^T (centred features)",
    "kid": "unbiased MMD^2, kernel (x.y/2048 + 1)^3, mean and std over random subsets drawn with a fixed seed",
}


def load_inception(path=None, device="cpu") -> FIDInception:
    """The FID Inception in eval mode with frozen weights, from chimle's weight cache or a given file."""
    from chimle.weights import load  # lazy: weights.py pulls in the fetch-and-convert machinery

    model = FIDInception()
    model.load_state_dict(load("inception-fid", path))
    return model.eval().requires_grad_(False).to(device)


class InceptionFeatures:
    """Images in [0, 1] (N, 3, H, W) -> pool3 features (N, 2048) float64, `batch` images at a time, resized to
    299 x 299 by the convention `resize` names (a key of RESIZE)."""

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu", batch: int = 16,
                 resize: str = "tf"):
        from chimle.weights import resolve

        if resize not in RESIZE:
            raise ValueError(f"unknown FID resize {resize!r}; choose from {list(RESIZE)}")
        self.file = resolve("inception-fid", weights)
        self.model = load_inception(weights, device)
        self.device = torch.device(device)
        self.batch = batch
        self.resize = resize

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        chunks = [np.zeros((0, 2048))]
        for start in range(0, len(images), self.batch):
            x = preprocess(images[start : start + self.batch].to(self.device), self.resize)
            chunks.append(self.model(x).cpu().double().numpy())
        return np.concatenate(chunks)


def _features(features: np.ndarray) -> np.ndarray:
    """Features as float64 (N, D), N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"FID needs at least 2 feature vectors (N, D), got an array of shape {features.shape}")
    return features


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    features = _features(features)
    return features.mean(0), np.cov(features, rowvar=False, ddof=1)


def _denoised(values: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with those below the numerical-rank tolerance (numpy's matrix_rank: size x eps
    x the largest) set to 0: rounding noise there, which a square root would magnify to sqrt(eps)."""
    tolerance = len(values) * np.finfo(np.float64).eps * np.abs(values).max(initial=0)
    return np.where(values > tolerance, values, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(_denoised(values))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    root = _psd_sqrt(sigma1)
    middle = root @ sigma2 @ root
    trace_sqrt = np.sqrt(_denoised(np.linalg.eigvalsh((middle + middle.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def fid(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two sets of Inception features (N1, D) and (N2, D), in float64.

    With fewer images than dimensions it works on the images instead of the D x D covariances: with centred
    features A (so S = AᵀA / (N - 1)), the non-zero eigenvalues of S1 S2 are those of (A1 A2ᵀ)(A1 A2ᵀ)ᵀ / c,
    c = (N1 - 1)(N2 - 1), so tr (S1 S2)^½ is the sum of the singular values of A1 A2ᵀ over sqrt(c): exact, and
    an N1 x N2 problem instead of two D x D eigendecompositions."""
    x, y = _features(features1), _features(features2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"features of different dimensions: {x.shape[1]} and {y.shape[1]}")
    if min(len(x), len(y)) >= x.shape[1]:
        return frechet_distance(*statistics(x), *statistics(y))
    a, b = x - x.mean(0), y - y.mean(0)
    c1, c2 = len(x) - 1, len(y) - 1
    trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt(c1 * c2)
    diff = x.mean(0) - y.mean(0)
    return float(diff @ diff + (a * a).sum() / c1 + (b * b).sum() / c2 - 2 * trace_sqrt)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² of two equal-size sets with the cubic polynomial kernel of KID."""
    d, m = x.shape[1], len(x)
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    off_diagonal = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(off_diagonal - 2 * kxy.mean())


def kid(features1: np.ndarray, features2: np.ndarray, subset_size: int = KID_SUBSET_SIZE,
        subsets: int = KID_SUBSETS, seed: int = 0) -> tuple[float, float]:
    """KID: mean and standard deviation of the unbiased MMD² over random subsets of min(subset_size, N1, N2)
    images from each set (one subset, std 0, when both sets are that small)."""
    x, y = np.asarray(features1, dtype=np.float64), np.asarray(features2, dtype=np.float64)
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {len(x)} and {len(y)}")
    if len(x) == m and len(y) == m:
        return _mmd2_unbiased(x, y), 0.0
    rng = np.random.default_rng(seed)
    values = [_mmd2_unbiased(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


def small_sample_warning(real: int, generated: int) -> str | None:
    """A warning when either set is too small for FID to mean much, else None."""
    if min(real, generated) >= MIN_IMAGES_FOR_FID:
        return None
    return (f"FID from {real} real images and as few as {generated} generated ones: with fewer than "
            f"{MIN_IMAGES_FOR_FID} images per set the covariance of the 2048-d features is singular and FID is "
            "strongly biased upwards (published FIDs use 10,000-50,000). Compare it only with FIDs from the same "
            "numbers of images; KID, which is unbiased, means more at this size.")
