"""Model files for sharing, and resumable training states.

A model file (`.safetensors`) holds the generator's tensors and, in its metadata, the format tag, the resolved
config as YAML and the package version, so `load_model` rebuilds the exact model from the file alone.

A training state (`state-*.pt`, see chimle.train) holds what a resumed run needs: weights, optimizer, position,
the round's search result. It loads with `torch.load(weights_only=True)`, which builds tensors and plain
containers and never runs code from the file, and carries a sha256 of its contents, so a truncated or
bit-flipped file is reported by name instead of resuming from garbage.

Model files, training states and every other file chimle writes whole (configs, samples, grids, reports) go
through chimle.files.atomic_write, so a process killed at any moment, or a full disk, leaves the previous file
whole.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as safetensors_bytes

from chimle import __version__
from chimle import tasks
from chimle.config import Config, ConfigError, from_dict, validate
from chimle.files import CheckpointError, atomic_write
from chimle.generator import Generator

FORMAT = "chimle-generator/1"
STATE_FORMAT = "chimle-state/2"  # 2: with the sha256 of its contents
MODEL_FILE = "model.safetensors"


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is truncated or its contents do not match its checksum."""


def save_model(path: str | Path, generator: Generator, config: Config, dtype: torch.dtype = torch.float32) -> None:
    """Write the generator's weights with the resolved config (atomically). `dtype=torch.float16` halves the
    file (the built-in models, see chimle.builtin); `load_model` turns such weights back into float32."""
    tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
               for k, v in generator.state_dict().items()}
    metadata = {"format": FORMAT, "config": config.to_yaml(), "chimle_version": __version__}
    atomic_write(path, safetensors_bytes(tensors, metadata=metadata))


def save_state(path: str | Path, state: dict) -> None:
    """Write a training state (a dict of tensors, numbers, strings, lists and dicts) with its format tag and
    the sha256 of its contents, atomically. It is serialised in memory first, so that a full disk shows up as
    a failed write with a clear error."""
    state = {**state, "format": STATE_FORMAT}
    state["sha256"] = content_digest(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getbuffer())


def load_state(path: str | Path) -> dict:
    """A training state written by `save_state`, checked. Raises CorruptCheckpointError if the file is truncated
    or its contents do not match its checksum, CheckpointError if it is not a chimle training state."""
    path = Path(path)
    try:
        data = path.read_bytes()  # an I/O error here is no sign of a damaged file: it propagates
    except OSError as error:
        raise CheckpointError(f"{path} could not be read ({error.strerror or error}); it was left as it is: "
                              "check the disk and try again") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - zip, unpickling and tensor errors all mean an unusable file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__
        raise CorruptCheckpointError(f"{path} cannot be read: it is truncated, corrupted, or not a file that loads "
                                     f"safely ({reason[:200]})") from None
    found = state.get("format") if isinstance(state, dict) else None
    if isinstance(found, str) and found.startswith("chimle-state/") and found != STATE_FORMAT:
        raise CheckpointError(f"{path} was written by another version of chimle (format {found!r}, expected "
                              f"{STATE_FORMAT!r}); resume it with that version")
    if found != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a chimle training state (format {found!r}, expected "
                              f"{STATE_FORMAT!r}); move it out of the run directory")
    stored = state.pop("sha256", None)
    if stored != content_digest(state):
        raise CorruptCheckpointError(f"{path} is corrupted: its contents do not match the checksum stored in it")
    return state


def content_digest(value) -> str:
    """sha256 of nested dicts, lists, tuples, tensors, numbers, strings and None, independent of how they were
    serialised (tensors by dtype, shape and bytes; dict entries in key order)."""
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.hexdigest()


def _feed(digest, value) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    elif value is None or isinstance(value, (bool, int, float, str)):
        text = repr(value)
        digest.update(f"{type(value).__name__}{len(text)}:{text}".encode())
    else:
        raise TypeError(f"a training state cannot hold {type(value).__name__}")


def check_fits(state: dict, config: Config, source: str) -> None:
    """Refuse a training state written for another task or model size than `config`'s, naming the file."""
    try:
        saved = from_dict(yaml.safe_load(state["config"]))
    except (ConfigError, KeyError, TypeError, yaml.YAMLError) as error:
        raise CheckpointError(f"{source} holds an unusable config: {error}") from None
    if saved.task != config.task:
        raise CheckpointError(f"{source} was written by a {saved.task} run, but this run trains {config.task}; "
                              "move it out of the run directory")
    if saved.model != config.model:
        differ = [f"model.{k}: file {v!r}, run {getattr(config.model, k)!r}"
                  for k, v in vars(saved.model).items() if getattr(config.model, k) != v]
        raise CheckpointError(f"{source} was written for another model size ({'; '.join(differ)}); move it out "
                              "of the run directory")


def model_path(path: str | Path) -> Path:
    """A model file, or a run directory holding one (built-in models' names are resolved by chimle.builtin.locate
    where a user names a model)."""
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
    """Rebuild the generator of a model file (or run directory, or built-in model) in eval mode, in float32."""
    path = model_path(path)
    config = read_config(path)
    generator = Generator(config.model)
    tensors = read_weights(path)
    check_state(generator, tensors, str(path))
    generator.load_state_dict(tensors)
    return generator.to(device).eval(), config


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a model file, floating-point ones as float32 (files may store them in float16)."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} could not be read ({error}); it may be truncated") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def initial_weights(source: str | Path, config: Config, name: str | None = None) -> dict[str, torch.Tensor]:
    """The weights of a model file or run directory to start a new run of `config` from (`chimle train --init`;
    `name`: how the user named it, e.g. a built-in model, for messages); refused, naming every differing field, if
    its task or model settings differ."""
    path = model_path(source)
    saved = read_config(path)
    label = name or str(source)
    shown = label if label == str(path) else f"{label} ({path})"
    if saved.task != config.task:
        raise CheckpointError(f"--init {shown} is a {saved.task} model, but this run trains {config.task}: start "
                              f"from a {config.task} model, or give --task {saved.task}")
    differ = [f"model.{k}={v!r} (this run: {getattr(config.model, k)!r})"
              for k, v in vars(saved.model).items() if getattr(config.model, k) != v]
    labels = tasks.get(config.task).input_kind == "labels"
    if labels and saved.data.palette_colours != config.data.palette_colours:
        differ.append("another label palette (data.palette)")  # the input channels would mean other classes
    if differ:
        raise CheckpointError(f"--init {shown} has {', '.join(differ)}: give the run the same model settings (its "
                              "preset, or -o with these values)")
    return read_weights(path)


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
