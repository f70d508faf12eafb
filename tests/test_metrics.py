"""Metrics: FID and KID against reference computations, the TF resize, PSNR and SSIM against published values and
a loop-by-loop reference, LPIPS diversity and FWV on hand-computed examples."""

import io
import math
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from chimle import weights
from chimle.metrics import conditional, diversity, fid, manifold
from chimle.metrics.image import batched, gaussian_window, psnr, ssim
from chimle.metrics.inception import clean_resize, pil_bicubic_matrix, preprocess, tf_bilinear_matrix
from chimle.perceptual import LPIPS


def random_features(n, d, seed, shift=0.0):
    """Correlated, non-Gaussian features (like ReLU activations)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / math.sqrt(d)
    return np.maximum(rng.normal(size=(n, d)) @ mix + shift, 0) + 0.1 * rng.random((n, d))


def reference_fid(x, y):
    """FID as in the reference TF/pytorch-fid code: scipy's general matrix square root of S1 S2."""
    from scipy import linalg

    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))


# FID -------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [300, 20])  # more images than dimensions, and fewer (singular covariance)
def test_fid_of_a_set_with_itself_is_zero(n):
    x = random_features(n, 64, seed=1)
    assert abs(fid.fid(x, x)) < 1e-8 * np.trace(np.cov(x, rowvar=False))
    mu, sigma = fid.statistics(x)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


@pytest.mark.parametrize("n1, n2", [(400, 300), (40, 30), (500, 20)])
def test_fid_matches_scipy_sqrtm(n1, n2):
    x, y = random_features(n1, 64, seed=2), random_features(n2, 64, seed=3, shift=0.3)
    ours, ref = fid.fid(x, y), reference_fid(x, y)
    assert ref > 1  # a real distance, not a degenerate case
    assert abs(ours - ref) < 1e-6 * ref


def test_fid_routes_agree_and_frechet_is_float64():
    """The covariance route and the few-images route give the same number."""
    x, y = random_features(30, 64, seed=4), random_features(50, 64, seed=5, shift=0.2)
    by_features = fid.fid(x, y)
    by_statistics = fid.frechet_distance(*fid.statistics(x), *fid.statistics(y))
    assert abs(by_features - by_statistics) < 1e-8 * by_statistics
    assert fid.statistics(x.astype(np.float32))[1].dtype == np.float64


def test_fid_input_errors():
    with pytest.raises(ValueError, match="at least 2"):
        fid.fid(np.zeros((1, 8)), np.zeros((5, 8)))
    with pytest.raises(ValueError, match="dimensions"):
        fid.fid(np.zeros((3, 8)), np.zeros((3, 9)))


# KID -------------------------------------------------------------------------------------------------------------

def loop_mmd2(x, y):
    """Unbiased MMD² with k(a, b) = (a·b/d + 1)³, term by term."""
    d, m = x.shape[1], len(x)
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_mmd():
    x, y = random_features(6, 16, seed=6), random_features(6, 16, seed=7, shift=0.5)
    value, std = fid.kid(x, y)
    assert value == pytest.approx(loop_mmd2(x, y), rel=1e-10) and std == 0.0


def test_kid_subsets_are_seeded_and_near_zero_for_one_distribution():
    x, y = random_features(200, 16, seed=8), random_features(200, 16, seed=9)
    far = random_features(200, 16, seed=10, shift=1.0)
    same = fid.kid(x, y, subset_size=50, subsets=20)
    assert same == fid.kid(x, y, subset_size=50, subsets=20) and same[1] > 0
    assert abs(same[0]) < 3 * same[1] + 1e-3  # unbiased: zero on average for one distribution
    assert fid.kid(x, far, subset_size=50, subsets=20)[0] > 10 * abs(same[0])


# The TF resize ---------------------------------------------------------------------------------------------------

def test_tf_bilinear_matrix_legacy_grid():
    # Upsampling 2 -> 4: output i samples input i/2 (no half-pixel offset), the last pixel repeats.
    assert torch.allclose(tf_bilinear_matrix(2, 4), torch.tensor([[1, 0], [0.5, 0.5], [0, 1], [0, 1]]))
    # Shrinking 4 -> 2 picks pixels 0 and 2, with no anti-aliasing.
    assert torch.equal(tf_bilinear_matrix(4, 2), torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 0]]))
    assert torch.allclose(tf_bilinear_matrix(64, 299).sum(1), torch.ones(299))


def test_preprocess_resizes_like_tf():
    x = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).expand(1, 3, 2, 2)  # levels 0 and 255
    out = preprocess(x) * 128 + 128
    # Row 0 of the 299 x 299 output samples input row 0 at columns 0, 2/299, 4/299, ...
    expected = 255 * torch.clamp(torch.arange(299) * (2 / 299), max=1.0)
    assert torch.allclose(out[0, 0, 0], expected, atol=1e-3)
    assert out[0, 0, 0, 0] == 0 and out[0, 0, -1, -1] < 1e-3


# The clean-fid resize ---------------------------------------------------------------------------------------------

def test_pil_bicubic_matrix_hand_worked():
    # Enlarging 2 -> 4: output 0 is centred at 0.25; Keys' kernel (a = -0.5) gives pixel 0 the weight
    # k(0.25) = 0.8671875 and pixel 1 k(1.25) = -0.0703125, renormalised over the two: 37/34 and -3/34.
    m = pil_bicubic_matrix(2, 4)
    assert m[0].tolist() == pytest.approx([37 / 34, -3 / 34], abs=1e-15)
    assert torch.allclose(m.flip(0).flip(1), m)  # symmetric about the centre
    # Shrinking 8 -> 2 stretches the kernel x4 (anti-aliasing): every input pixel contributes.
    assert (pil_bicubic_matrix(8, 2).abs() > 0).all()
    assert torch.allclose(pil_bicubic_matrix(600, 299).sum(1), torch.ones(299, dtype=torch.float64))


@pytest.mark.parametrize("height, width", [(37, 23), (400, 350), (299, 180), (1000, 640)])
def test_clean_resize_matches_pillow(height, width):
    """clean-fid's recipe done with Pillow itself: every channel as a 32-bit float image, BICUBIC to 299 x 299,
    clipped to [0, 255]."""
    image = np.random.default_rng(height).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    expected = np.stack([np.asarray(Image.fromarray(image[:, :, c].astype(np.float32)).resize(
        (299, 299), resample=Image.BICUBIC)).clip(0, 255) for c in range(3)])
    ours = clean_resize(torch.from_numpy(image).permute(2, 0, 1)[None].float())[0]
    assert ours.dtype == torch.float32 and ours.shape == (3, 299, 299)
    assert np.abs(ours.numpy() - expected).max() <= 1e-4  # 255 x float32 epsilon at most
    levels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    assert torch.allclose(preprocess(levels, resize="clean") * 128 + 128, ours[None], atol=1e-4)


def test_clean_and_tf_resizes_differ_when_shrinking():
    stripes = torch.zeros(1, 3, 598, 598)
    stripes[..., 1::2] = 1.0  # one-pixel stripes, halved: TF's bilinear samples the even (black) columns only,
    tf, clean = preprocess(stripes, "tf") * 128 + 128, preprocess(stripes, "clean") * 128 + 128
    assert tf.max() == 0 and (clean[..., 2:-2] - 127.5).abs().max() < 1  # the anti-aliased filter: grey (edges aside)
    with pytest.raises(ValueError, match="unknown FID resize"):
        preprocess(stripes, "bilinear")


# PSNR and SSIM ---------------------------------------------------------------------------------------------------

TID_PAIRS = ["I03", "I04", "I06", "I08", "I19"]
# IQA-PyTorch's calibration table (ResultsCalibra/calibration_summary.csv), reference (MATLAB) rows: PSNR on RGB,
# and SSIM on the greyscale images of MATLAB's rgb2gray.
PUBLISHED_PSNR = [21.11, 20.99, 27.01, 23.30, 21.62]
PUBLISHED_SSIM = [0.6993, 0.9978, 0.9989, 0.9669, 0.6519]


@pytest.fixture(scope="module")
def tid_pairs():
    """The five TID2013 (distorted, reference) pairs as uint8-valued float tensors (5, 3, 384, 512), 0..255."""
    def read(z, name):
        return torch.from_numpy(np.asarray(Image.open(io.BytesIO(z.read(name))).convert("RGB"), dtype=np.float64))

    with zipfile.ZipFile(weights.download("pyiqa")) as z:
        dist = torch.stack([read(z, f"ResultsCalibra/dist_dir/{n}.bmp") for n in TID_PAIRS]).permute(0, 3, 1, 2)
        ref = torch.stack([read(z, f"ResultsCalibra/ref_dir/{n}.bmp") for n in TID_PAIRS]).permute(0, 3, 1, 2)
    return dist, ref


def test_psnr_matches_published_values(tid_pairs):
    dist, ref = tid_pairs
    assert psnr(dist / 255, ref / 255).tolist() == pytest.approx(PUBLISHED_PSNR, abs=0.006)


def test_ssim_matches_published_values(tid_pairs):
    rgb2gray = torch.tensor([0.298936021293775, 0.587043074451121, 0.114020904255103], dtype=torch.float64)
    grey = [(x * rgb2gray.view(1, 3, 1, 1)).sum(1, keepdim=True).round() / 255 for x in tid_pairs]
    assert ssim(*grey).tolist() == pytest.approx(PUBLISHED_SSIM, abs=1e-4)


def loop_ssim(x, y):
    """SSIM of two (C, H, W) float64 arrays by the definition, one window position at a time."""
    t = np.arange(11) - 5.0
    g = np.exp(-t * t / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for a, b in zip(x, y):
        for i in range(a.shape[0] - 10):
            for j in range(a.shape[1] - 10):
                pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
                ma, mb = (window * pa).sum(), (window * pb).sum()
                va, vb = (window * (pa - ma) ** 2).sum(), (window * (pb - mb) ** 2).sum()
                cov = (window * (pa - ma) * (pb - mb)).sum()
                values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_ssim_matches_the_definition_loop_by_loop(rng):
    x = torch.rand(2, 3, 18, 23, generator=rng)
    y = (x + 0.2 * torch.randn(2, 3, 18, 23, generator=rng)).clamp(0, 1)
    ours = ssim(x, y)
    ref = [loop_ssim(a.double().numpy(), b.double().numpy()) for a, b in zip(x, y)]
    assert ours.tolist() == pytest.approx(ref, abs=1e-5)
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


def test_image_metrics_broadcast_and_batch(rng):
    x, target = torch.rand(5, 3, 16, 16, generator=rng), torch.rand(1, 3, 16, 16, generator=rng)
    for metric in (psnr, ssim):
        whole = metric(x, target)
        assert whole.shape == (5,)
        assert torch.allclose(batched(metric, x, target, batch=2), whole)
        assert torch.allclose(metric(x, target.expand(5, -1, -1, -1)), whole)
    assert psnr(x, x).tolist() == pytest.approx([100.0] * 5)
    assert psnr(torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.1)).item() == pytest.approx(20.0)
    assert gaussian_window().sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="same size"):
        psnr(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 9))


# Diversity and FWV -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def alex():
    return LPIPS("alex")


def test_diversity_and_spread_hand_computed():
    """One 1x1 feature layer with weight 1 and values 0, 1, 3: pairwise distances are squared differences."""
    lpips = LPIPS.__new__(LPIPS)
    torch.nn.Module.__init__(lpips)
    lpips.lin = torch.nn.ParameterList([torch.nn.Parameter(torch.ones(1))])
    features = [torch.tensor([0.0, 1.0, 3.0]).view(3, 1, 1, 1)]
    pairs = diversity.pairwise_lpips(lpips, features, batch=2)
    assert pairs.tolist() == pytest.approx([1.0, 9.0, 4.0])  # (0,1), (0,2), (1,2)
    group = diversity.SampleGroup(torch.zeros(3, 3, 4, 4), torch.zeros(1, 3, 4, 4), lpips, features, features[:1])
    # The mean is 4/3: squared deviations 16/9, 1/9, 25/9, whose mean is (K-1)/(2K) x the mean pairwise distance.
    assert diversity.lpips_spread(group).tolist() == pytest.approx([16 / 9, 1 / 9, 25 / 9])
    assert diversity.lpips_spread(group).mean().item() == pytest.approx((3 - 1) / (2 * 3) * pairs.mean().item())


def test_pixel_spread_and_rmse_hand_computed():
    samples = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])
    group = diversity.SampleGroup(samples, torch.full((1, 3, 4, 4), 0.25), None, [], [])
    assert diversity.pixel_spread(group).tolist() == pytest.approx([0.25, 0.25])
    assert diversity.rmse_to_target(group).tolist() == pytest.approx([0.25, 0.75])


def test_fwv_hand_computed():
    d = [[0.0, 0.3], [0.15, 0.6]]
    s = [[1.0, 2.0], [3.0, 4.0]]
    out = diversity.fwv(d, s, sigmas=(0.3, 0.15))
    w = lambda dist, sigma: math.exp(-dist * dist / (2 * sigma * sigma))  # noqa: E731
    for sigma in (0.3, 0.15):
        expected = (w(0, sigma) * 1 + w(0.3, sigma) * 2 + w(0.15, sigma) * 3 + w(0.6, sigma) * 4) / 4
        assert out[sigma] == pytest.approx(expected)
    assert out[0.3] == pytest.approx((1 + 2 * math.exp(-0.5) + 3 * math.exp(-0.125) + 4 * math.exp(-2)) / 4)
    with pytest.raises(ValueError, match="one distance and one spread"):
        diversity.fwv([0.1, 0.2], [1.0])


def test_lpips_group_agrees_with_direct_lpips(alex, rng):
    samples, target = torch.rand(4, 3, 32, 32, generator=rng), torch.rand(1, 3, 32, 32, generator=rng)
    group = diversity.SampleGroup.of(alex, samples, target, batch=3)
    with torch.no_grad():
        assert torch.allclose(group.lpips_to_target(), alex(samples, target), atol=1e-6)
        pairs = diversity.pairwise_lpips(alex, group.features, batch=4)
        direct = [alex(samples[i : i + 1], samples[j : j + 1]).item() for i, j in torch.combinations(torch.arange(4))]
    assert pairs.tolist() == pytest.approx(direct, abs=1e-6)
    spread = diversity.SPREADS["lpips"].measure(group)
    assert spread.mean().item() == pytest.approx(3 / 8 * pairs.mean().item(), rel=1e-5)
    assert torch.equal(diversity.DISTANCES["lpips"].measure(group), group.lpips_to_target())


def test_inception_features_batching():
    extract = fid.InceptionFeatures(batch=1)
    images = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    features = extract(images)
    assert features.shape == (2, 2048) and features.dtype == np.float64 and features.std() > 0.01
    extract.batch = 2
    assert np.abs(features - extract(images)).max() < 1e-5
    assert fid.small_sample_warning(3, 3) is not None and fid.small_sample_warning(5000, 2048) is None


# Precision, recall, density, coverage ----------------------------------------------------------------------------

def loop_prdc(real, fake, k_pr, k_dc):
    """The four definitions written out point by point (Kynkäänniemi et al. 2019, Naeem et al. 2020)."""
    def distance(a, b):
        return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))

    def kth_neighbour(points, i, k):
        return sorted(distance(points[i], q) for j, q in enumerate(points) if j != i)[k - 1]

    def inside(point, centres, radii):
        return [distance(point, c) <= r for c, r in zip(centres, radii)]

    real_pr = [kth_neighbour(real, i, k_pr) for i in range(len(real))]
    fake_pr = [kth_neighbour(fake, j, k_pr) for j in range(len(fake))]
    real_dc = [kth_neighbour(real, i, k_dc) for i in range(len(real))]
    precision = sum(any(inside(y, real, real_pr)) for y in fake) / len(fake)
    recall = sum(any(inside(x, fake, fake_pr)) for x in real) / len(real)
    density = sum(sum(inside(y, real, real_dc)) for y in fake) / (k_dc * len(fake))
    coverage = sum(any(distance(x, y) <= r for y in fake) for x, r in zip(real, real_dc)) / len(real)
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


def test_prdc_hand_worked():
    # Real 0, 1, 2, 4 with k = 1: balls of radius 1, 1, 1, 2. Generated 0.5, 3, 7: balls of radius 2.5, 2.5, 4.
    real, fake = np.array([[0.0], [1], [2], [4]]), np.array([[0.5], [3], [7]])
    # 0.5 lies in the balls of 0 and 1, 3 in those of 2 and 4, 7 in none: precision 2/3, density 4 / (1 x 3);
    # every real ball holds a generated point (coverage 1) and every real point is within 2.5 of 0.5 or 3.
    assert manifold.prdc(real, fake, 1, 1) == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "density": 4 / 3, "coverage": 1.0})
    # k = 2: the second nearest other point of 0, 1, 2, 4 is 2, 1, 2, 3 away (radii are kept squared).
    assert manifold.radii(real, 2).tolist() == [4.0, 1.0, 4.0, 9.0]
    # Balls are closed: 3 lies on the ball of 2 (radius 1) and inside that of 4 (radius 2).
    assert manifold.density_coverage(real, np.array([[3.0]]), 1) == (2.0, 0.5)


@pytest.mark.parametrize("n, m, d", [(30, 40, 5), (25, 12, 3)])
def test_prdc_matches_a_direct_loop(n, m, d):
    rng = np.random.default_rng(n)
    real, fake = rng.normal(size=(n, d)), rng.normal(0.3, 1.2, size=(m, d))
    assert manifold.prdc(real, fake, 3, 5) == pytest.approx(loop_prdc(real, fake, 3, 5), abs=1e-12)
    assert manifold.prdc(real, fake, 2, 2) == pytest.approx(loop_prdc(real, fake, 2, 2), abs=1e-12)


def test_prdc_blocks_give_the_same_numbers(monkeypatch):
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(50, 8)), rng.normal(size=(70, 8))
    whole = manifold.prdc(real, fake)
    monkeypatch.setattr(manifold, "BLOCK_BYTES", 8 * 70 * 3)  # blocks of 3 rows
    assert manifold.prdc(real, fake) == whole


def test_prdc_of_a_set_with_itself_and_with_a_collapsed_set():
    rng = np.random.default_rng(4)
    real = random_features(200, 16, seed=6)
    same = manifold.prdc(real, real)
    # Every point lies in its own ball (precision, recall, coverage 1); every ball holds its centre and k others.
    assert same == pytest.approx({"precision": 1, "recall": 1, "density": 6 / 5, "coverage": 1}, abs=1e-12)
    # Duplicated points: ties, settled as inside (closed balls) whatever the rounding of each distance.
    doubled = np.concatenate([real, real])
    assert manifold.prdc(doubled, doubled)["precision"] == 1.0
    collapsed = np.repeat(real[rng.integers(200)][None], 50, axis=0)
    c = manifold.prdc(real, collapsed)
    assert c["precision"] == 1.0 and c["recall"] == 1 / 200 and c["coverage"] < 0.05
    # Two samples of one distribution: density ~1, coverage ~1 - 2^-5 (the expected values Naeem et al. 2020 derive).
    a, b = rng.normal(size=(2000, 4)), rng.normal(size=(2000, 4))
    density, coverage = manifold.density_coverage(a, b)
    assert density == pytest.approx(1.0, abs=0.05) and coverage == pytest.approx(1 - 2**-5, abs=0.02)


def test_prdc_input_errors():
    with pytest.raises(ValueError, match="at least 4 images"):
        manifold.prdc(np.zeros((10, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="at least 6 images"):
        manifold.density_coverage(np.zeros((5, 3)), np.zeros((10, 3)))
    with pytest.raises(ValueError, match="different dimensions"):
        manifold.prdc(np.zeros((10, 3)), np.zeros((10, 4)))


# Conditional scores ----------------------------------------------------------------------------------------------

def test_consistent_share_and_diversity_hand_worked():
    psnr_again = torch.tensor([50.0, 44.9, 45.0, 60.0])  # dB: the samples degraded again against the input
    ok = conditional.consistent(psnr_again, 45.0, higher_is_better=True)
    assert ok.tolist() == [True, False, True, True]  # the bound itself is consistent
    assert conditional.consistent(torch.tensor([1.0, 2.3, 2.4]), 2.3, higher_is_better=False).tolist() == [
        True, True, False]
    # Pairs in torch.combinations order: (0,1) (0,2) (0,3) (1,2) (1,3) (2,3); samples 0, 2, 3 are consistent.
    pairs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert conditional.consistent_diversity(pairs, ok) == pytest.approx((0.2 + 0.3 + 0.6) / 3)
    assert conditional.consistent_diversity(pairs, torch.tensor([False, True, False, False])) is None


def test_consecutive_pairs():
    mask = diversity.consecutive_pairs(4, 3)  # (0,1) (1,2) (2,3) among the 6 pairs of 4 samples
    assert mask.tolist() == [True, False, False, True, False, True]
    assert diversity.consecutive_pairs(20, 19).sum() == 19
    with pytest.raises(ValueError, match="at least 5 samples"):
        diversity.consecutive_pairs(4, 4)


def test_fjd_sees_outputs_that_belong_to_another_input():
    rng = np.random.default_rng(7)
    inputs = rng.normal(size=(400, 6))
    images = inputs @ rng.normal(size=(6, 6)) + 0.3 * rng.normal(size=(400, 6))  # images follow their inputs
    # The same images given to the wrong inputs: FID sees nothing, FJD does.
    shuffled = rng.permutation(400)
    assert fid.fid(images, images[shuffled]) == pytest.approx(0, abs=1e-9)
    right, alpha = conditional.fjd(images, inputs, images, inputs)
    wrong, _ = conditional.fjd(images, inputs, images[shuffled], inputs)
    assert right == pytest.approx(0, abs=1e-9) and wrong > 1
    # α makes the input half as large as the image half; FJD is FID on the concatenation.
    assert alpha == pytest.approx(np.linalg.norm(images, axis=1).mean() / np.linalg.norm(inputs, axis=1).mean())
    joint = np.concatenate([images, alpha * inputs], 1)
    assert wrong == pytest.approx(fid.fid(joint, np.concatenate([images[shuffled], alpha * inputs], 1)), rel=1e-12)
    with pytest.raises(ValueError, match="one input per image"):
        conditional.fjd(images, inputs[:3], images, inputs)
