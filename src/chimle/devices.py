"""Devices: which one a command runs on, and the arithmetic it uses there.

    chimle sample --model runs/sr --input photo.png --device cuda:1 --out samples/   # any command's --device

Precision policy. Where chimle computes in float32 it means IEEE float32, on every device: training, the code
search and its float32 re-scoring of bfloat16 candidates (`search.precision`), sampling, LPIPS and the FID
features. On CUDA GPUs since Ampere, PyTorch by default runs float32 convolutions in TensorFloat-32 (a 10-bit
mantissa), and matrix products too where a library asks for it; `configure` switches TF32 off. bfloat16 is used
only where a setting asks for it: `search.precision` (candidate renders) and `train.precision` (the training
step's forward under autocast; the weights, their gradients, Adam and the LPIPS distances on the features stay
float32).

Determinism. `configure` also makes cuDNN choose its convolution algorithms deterministically (no benchmarking),
so a computation repeats its float arithmetic on the same GPU and software. What is exact where:
  - the codes: drawn on the CPU from their seeds, so the same on every device;
  - on the CPU, pixels and training: bit for bit for the same thread count, and a resumed run reaches the weights
    of an uninterrupted one bit for bit (tests/test_resume.py);
  - on a GPU, pixels are expected to agree with the CPU's to float rounding, not bit for bit, and a resumed run
    to match an uninterrupted one to float rounding too: some CUDA backward kernels (those that accumulate with
    atomic adds, e.g. of upsampling and indexing) add in a varying order, and chimle does not call
    `torch.use_deterministic_algorithms`, which would refuse them. (No GPU run of the tests has checked this yet.)
"""

from __future__ import annotations

import torch

from chimle.config import ConfigError


def pick(name: str | None = None) -> torch.device:
    """The device a user named (cpu, cuda, cuda:1, mps, ...), by default cuda if there is one, else the CPU; a
    name this PyTorch build or machine cannot use is an error that says what to use instead."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device {name!r} is not a device name: give cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        hint = ""
        if device.type == "cuda" and torch.version.cuda is None:
            hint = " (this build of PyTorch has no CUDA: install a CUDA build to use a GPU)"
        raise ConfigError(f"device {name!r} is not available here{hint}; use --device cpu")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise ConfigError(f"device {name!r} does not exist: this machine has {count} {device.type} device(s), "
                          f"{device.type}:0 to {device.type}:{count - 1}")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bfloat16 natively: a CUDA GPU that supports it, or a CPU with AVX512-BF16 or
    AMX. Elsewhere (e.g. AVX2-only CPUs) PyTorch emulates bfloat16, 5-40x slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def compute_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype that autocast computes in on `device` for a precision setting (`search.precision`,
    `train.precision`: auto | float32 | bfloat16); None: float32, no autocast."""
    if precision == "bfloat16" or (precision == "auto" and native_bf16(device)):
        return torch.bfloat16
    return None


def configure() -> None:
    """The precision and determinism policy above, for this process: IEEE float32 (no TF32) in matrix products
    and convolutions, deterministic cuDNN convolution algorithms. Harmless on a machine without CUDA."""
    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):  # the interface of torch >= 2.9
        matmul.fp32_precision = "ieee"
        conv.fp32_precision = "ieee"
    else:
        matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
