"""Files on disk: model weights for sharing (`.safetensors` + the resolved config) and atomic writes.

A model file holds the generator's tensors and, in its metadata, the format tag, the resolved config as YAML and
the package version, so `load_model` rebuilds the exact model from the file alone. Resumable training state is
a separate file (see chimle.train).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, safe_open

from chimle import __version__
from chimle.config import Config, ConfigError, from_dict, validate
from chimle.generator import Generator

FORMAT = "chimle-generator/1"
MODEL_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted, foreign or does not fit what it is used for."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write through `write(temporary path)`, fsync, then rename over `path`: readers see the old or the new
    file, never a partial one, even if the process is killed or the disk fills up."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_model(path: str | Path, generator: Generator, config: Config) -> None:
    """Write the generator's weights with the resolved config (atomically)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in generator.state_dict().items()}
    metadata = {"format": FORMAT, "config": config.to_yaml(), "chimle_version": __version__}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def model_path(path: str | Path) -> Path:
    """A model file, or a run directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"no model at {path}: give a run directory or a .safetensors file written by chimle")
    return path


def read_config(path: str | Path) -> Config:
    """The resolved config stored in a model file."""
    path = model_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}); it may be truncated") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a chimle model (format {metadata.get('format')!r}, expected {FORMAT!r}); "
            "official .pth files are imported with `chimle convert`"
        )
    try:
        config = from_dict(yaml.safe_load(metadata["config"]))
        validate(config)
    except (ConfigError, KeyError, TypeError, yaml.YAMLError) as error:
        raise CheckpointError(f"{path} holds an unusable config: {error}") from None
    return config


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Generator, Config]:
    """Rebuild the generator of a model file (or run directory) in eval mode."""
    path = model_path(path)
    config = read_config(path)
    generator = Generator(config.model)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} could not be read ({error}); it may be truncated") from None
    check_state(generator, tensors, str(path))
    generator.load_state_dict(tensors)
    return generator.to(device).eval(), config


def check_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a state dict whose names or shapes differ from the module's, listing every difference."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or wrong:
        lines = [f"{source} does not fit the model:"]
        lines += [f"  missing {k} {expected[k]}" for k in missing[:20]]
        lines += [f"  unexpected {k} {got[k]}" for k in unexpected[:20]]
        lines += [f"  shape of {k}: file {got[k]}, model {expected[k]}" for k in wrong[:20]]
        count = len(missing) + len(unexpected) + len(wrong)
        if count > 60:
            lines.append(f"  ... {count} differences in all")
        raise CheckpointError("\n".join(lines))
