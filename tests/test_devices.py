"""Devices: names checked with a message that says what to use, and the precision policy applied by every command
(IEEE float32, no TF32; deterministic cuDNN convolutions), checked on the flags since no GPU is needed for that."""

import pytest
import torch

from chimle import devices, distributed
from chimle.checkpoint import save_model
from chimle.config import ConfigError
from chimle.evaluate import Options, _device
from chimle.generator import Generator
from chimle.sample import Model
from conftest import tiny_config


NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")  # torch >= 2.9; the two must not be mixed


def loosen() -> None:
    """PyTorch's defaults on CUDA allow TF32 convolutions; allow them in matrix products too."""
    if NEW_API:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.deterministic = False


def strict() -> bool:
    b = torch.backends
    if NEW_API:
        ieee = b.cuda.matmul.fp32_precision == "ieee" and b.cudnn.conv.fp32_precision == "ieee"
    else:
        ieee = not b.cuda.matmul.allow_tf32 and not b.cudnn.allow_tf32
    return ieee and not b.cudnn.benchmark and b.cudnn.deterministic


def test_training_sampling_and_evaluation_compute_in_ieee_float32(tmp_path, monkeypatch):
    config = tiny_config()
    save_model(tmp_path / "model.safetensors", Generator(config.model), config)
    for monkey in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(monkey, raising=False)
    try:
        for start in (lambda: Model.load(tmp_path, device="cpu"),  # sample, serve, evaluate --model
                      lambda: distributed.init("cpu"),  # train
                      lambda: _device(Options(device="cpu"))):  # evaluate --samples
            loosen()
            start()
            assert strict()
    finally:
        torch.backends.cudnn.benchmark = False


def test_device_names_are_checked():
    assert devices.pick("cpu") == torch.device("cpu")
    assert devices.pick(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="'tpu' is not a device name: give cpu, cuda, cuda:N or mps"):
        devices.pick("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'cuda:1' is not available here.*use --device cpu"):
            devices.pick("cuda:1")
    else:
        with pytest.raises(ConfigError, match="does not exist"):
            devices.pick(f"cuda:{torch.cuda.device_count()}")


def test_the_search_precision_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    assert devices.compute_dtype("float32", cpu) is None
    assert devices.compute_dtype("bfloat16", cpu) is torch.bfloat16
    assert devices.compute_dtype("auto", cpu) is (torch.bfloat16 if devices.native_bf16(cpu) else None)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert devices.native_bf16(cpu) and devices.compute_dtype("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not devices.native_bf16(cpu) and devices.compute_dtype("auto", cpu) is None
