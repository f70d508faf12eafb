"""Fidelity and coverage as separate numbers: precision, recall, density, coverage (DESIGN.md §2.6).

    from chimle.metrics.manifold import prdc
    prdc(real_features, fake_features)    # {"precision": .., "recall": .., "density": .., "coverage": ..}

FID folds realism and variety into one number. These four estimate where each set lies in feature space and
ask separately whether generated images fall where real ones do (fidelity) and whether real images have
generated ones near them (coverage). Each set's support is a union of balls: around every point, the closed ball
whose radius is the distance to its k-th nearest *other* point of the same set (NND_k).

- precision: the share of generated points inside at least one real ball; recall: the share of real points
  inside at least one generated ball; k = 3. Kynkäänniemi et al., "Improved Precision and Recall Metric for
  Assessing Generative Models", NeurIPS 2019.
- density: the number of real balls that hold a generated point, summed over the generated points and divided by
  k x (their number); it is not capped at 1 (points crowded where real data is dense score above 1). coverage:
  the share of real points whose ball holds at least one generated point; k = 5. Naeem et al., "Reliable
  Fidelity and Diversity Metrics for Generative Models", ICML 2020. Both use only the real balls, so a few
  generated outliers, whose balls are large, cannot inflate them as they inflate recall.

For two samples of one distribution, density is about 1 and coverage about 1 - 2^-k (0.97 at k = 5), as Naeem et al.
derive; a set against itself scores precision = recall = coverage = 1 and density = (k + 1) / k (every ball
holds its centre and k neighbours). A generated set of one real image repeated has balls of radius 0 and
precision 1: its recall is 1/N (it reaches only that image) and its coverage, the share of real balls that
hold that image, is (k + 1) / N on average over which image is repeated.

Exact: distances are computed in float64 between all pairs, a block of rows at a time (no approximate index).
Balls are closed, as Kynkäänniemi et al. define them: a point at exactly the radius is inside, and distances
equal up to rounding count as equal (TIE). The prdc reference code compares with < instead; the two differ only
at ties, as between duplicated images.
"""

from __future__ import annotations

import numpy as np

PRECISION_RECALL_K = 3  # neighbours behind each ball, precision and recall (Kynkäänniemi et al. 2019)
DENSITY_COVERAGE_K = 5  # neighbours behind each ball, density and coverage (Naeem et al. 2020)
BLOCK_BYTES = 2**27  # memory of one block of pairwise distances (128 MiB of float64)
TIE = 1e-9  # squared distances closer than this times ||a||² + ||b||² count as equal (far above float64 rounding)


def _features(features, name: str) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"{name} features must be an array (N, D), got shape {features.shape}")
    return features


def _blocks(rows: int, columns: int):
    """Row ranges whose distance blocks (rows x columns) stay within BLOCK_BYTES."""
    step = max(1, BLOCK_BYTES // (8 * max(columns, 1)))
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) squared Euclidean distances in float64, ||a||² + ||b||² - 2 a·b, clipped at 0."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T
    return np.maximum(d, 0.0)


def radii(features: np.ndarray, k: int) -> np.ndarray:
    """(N,) squared distance of every point to its k-th nearest other point of the same set."""
    if len(features) <= k:
        raise ValueError(f"{k} nearest neighbours need at least {k + 1} images per set, got {len(features)}")
    out = np.empty(len(features))
    for start, end in _blocks(len(features), len(features)):
        d = squared_distances(features[start:end], features)
        d[np.arange(end - start), np.arange(start, end)] = 0.0  # a point's distance to itself, exactly
        # Sorted positions 0..k include the point itself (distance 0), so position k is its k-th neighbour.
        out[start:end] = np.partition(d, k, axis=1)[:, k]
    return out


def in_balls(points: np.ndarray, centres: np.ndarray, squared_radii: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How many balls (centres, squared radii) hold each point (P,), and whether each ball holds a point (C,).

    A ball is closed, and a distance that equals its radius up to rounding (TIE) is on it: the neighbour that
    sets a radius, or a duplicate of it, must count as inside however the two distances were rounded."""
    counts = np.zeros(len(points), dtype=np.int64)
    held = np.zeros(len(centres), dtype=bool)
    centre_norms = (centres * centres).sum(1)
    for start, end in _blocks(len(points), len(centres)):
        block = points[start:end]
        slack = TIE * ((block * block).sum(1)[:, None] + centre_norms[None])
        inside = squared_distances(block, centres) <= squared_radii[None] + slack
        counts[start:end] = inside.sum(1)
        held |= inside.any(0)
    return counts, held


def _pair(real, fake) -> tuple[np.ndarray, np.ndarray]:
    """Both feature sets as float64, centred on the real mean: distances are unchanged, and the norms, hence the
    rounding of ||a||² + ||b||² - 2 a·b, stay small."""
    real, fake = _features(real, "real"), _features(fake, "generated")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"features of different dimensions: {real.shape[1]} and {fake.shape[1]}")
    if not len(fake):
        raise ValueError("no generated features")
    centre = real.mean(0)
    return real - centre, fake - centre


def precision_recall(real, fake, k: int = PRECISION_RECALL_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of generated features `fake` (M, D) against
    real features `real` (N, D); both sets need more than k points."""
    real, fake = _pair(real, fake)
    fake_in_real, _ = in_balls(fake, real, radii(real, k))
    real_in_fake, _ = in_balls(real, fake, radii(fake, k))
    return float((fake_in_real > 0).mean()), float((real_in_fake > 0).mean())


def density_coverage(real, fake, k: int = DENSITY_COVERAGE_K) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020) of generated features `fake` (M, D) against real features
    `real` (N, D); the real set needs more than k points."""
    real, fake = _pair(real, fake)
    counts, held = in_balls(fake, real, radii(real, k))
    return float(counts.sum() / (k * len(fake))), float(held.mean())


def prdc(real, fake, precision_recall_k: int = PRECISION_RECALL_K,
         density_coverage_k: int = DENSITY_COVERAGE_K) -> dict[str, float]:
    """All four: precision and recall with `precision_recall_k`, density and coverage with `density_coverage_k`."""
    precision, recall = precision_recall(real, fake, precision_recall_k)
    density, coverage = density_coverage(real, fake, density_coverage_k)
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}
