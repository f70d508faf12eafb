"""Files on disk: model weights for sharing, resumable training states, and writes that survive a crash.

A model file (`.safetensors`) holds the generator's tensors and, in its metadata, the format tag, the resolved
config as YAML and the package version, so `load_model` rebuilds the exact model from the file alone.

A training state (`state-*.pt`, see chimle.train) holds what a resumed run needs: weights, optimizer, position,
the round's search result. It loads with `torch.load(weights_only=True)`, which builds tensors and plain
containers and never runs code from the file, and carries a sha256 of its contents, so a truncated or
bit-flipped file is reported by name instead of resuming from garbage.

Model files, training states and every other file chimle writes whole (configs, samples, grids, reports) go
through `atomic_write`: a temporary file in the same folder, fsync, rename. A process killed at any moment, or a
full disk, leaves the previous file whole. Logs are appended line by line instead.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as safetensors_bytes

from chimle import __version__
from chimle.config import Config, ConfigError, from_dict, validate
from chimle.generator import Generator

FORMAT = "chimle-generator/1"
STATE_FORMAT = "chimle-state/2"  # 2: with the sha256 of its contents
MODEL_FILE = "model.safetensors"
CRASH_VARIABLE = "CHIMLE_CRASH_AT"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted, foreign or does not fit what it is used for."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is truncated or its contents do not match its checksum."""


def atomic_write(path: str | Path, content: bytes | memoryview | Callable[[Path], None]) -> None:
    """Write `content` (bytes, or a function writing a given temporary path), fsync, then rename over `path`:
    readers see the old or the new file, never a partial one, even if the process is killed. A failed write (a
    full disk) raises CheckpointError and leaves the old file as it was."""
    path = Path(path)
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp)
    try:
        if callable(content):
            os.close(fd)
            fd = -1
            content(tmp)
            fd = os.open(tmp, os.O_RDWR)
        else:
            _write_all(fd, content)
        crash_point(f"write:{path.name}")
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; give the usual permissions
        os.replace(tmp, path)
    except BaseException as error:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
            raise CheckpointError(_write_failure(path, error, kept)) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def check_folder(path: str | Path, what: str = "--out") -> Path:
    """Refuse, before any work, a folder to write into that is a file, lies under a file, or cannot be made or
    written to; nothing is created here."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if existing != path and not existing.is_dir():
        raise CheckpointError(f"{what} {path} lies under {existing}, which is a file; give a folder path")
    if not existing.is_dir():
        raise CheckpointError(f"{what} {path} is a file; give a folder (it is created if needed)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"{what} {path}: cannot write in {existing} (permission denied); give a folder you "
                              "can write to")
    return path


def _write_all(fd: int, content: bytes | memoryview) -> None:
    with memoryview(content) as view:
        written = 0
        while written < view.nbytes:
            written += os.write(fd, view[written:])


def _write_failure(path: Path, error: OSError, note: str = "") -> str:
    """What to tell the user when writing `path` failed."""
    note = f" ({note})" if note else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return (f"could not write {path}: {error.strerror or error}{note}; free some space on that disk, or move "
                "the run to a larger one, then continue with --resume")
    return f"could not write {path}: {error.strerror or error}{note}"


@contextmanager
def disk_errors(path: str | Path):
    """Turn a failed write to `path` (a full disk, a read-only folder) into a CheckpointError saying what to do."""
    try:
        yield
    except OSError as error:
        raise CheckpointError(_write_failure(Path(path), error)) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_crash_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Fault injection for the crash-safety tests: with CHIMLE_CRASH_AT=NAME or NAME:N in the environment, the
    N-th arrival (default 1st) at point NAME SIGKILLs this process, as a power cut or the OOM killer would.
    Points: `search` (a round's codes searched, not yet recorded), `step` (weights updated, not yet saved),
    `write:FILE` (a file's new contents written, not yet renamed into place)."""
    spec = os.environ.get(CRASH_VARIABLE)
    if not spec:
        return
    point, _, count = spec.rpartition(":")
    if not count.isdigit():
        point, count = spec, "1"
    if point != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] == int(count):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


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
    """A model file, a run directory holding one, or the name of a built-in model (`builtin:TASK`, a string with
    exactly that prefix; see chimle.builtin)."""
    from chimle import builtin

    if builtin.is_builtin(path):
        return builtin.resolve(path)
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


def initial_weights(source: str | Path, config: Config) -> dict[str, torch.Tensor]:
    """The weights of a model file, run directory or built-in model to start a new run of `config` from
    (`chimle train --init`); refused, naming every differing field, if its task or model settings differ."""
    path = model_path(source)
    saved = read_config(path)
    shown = source if str(source) == str(path) else f"{source} ({path})"
    if saved.task != config.task:
        raise CheckpointError(f"--init {shown} is a {saved.task} model, but this run trains {config.task}: start "
                              f"from a {config.task} model, or give --task {saved.task}")
    differ = [f"model.{k}={v!r} (this run: {getattr(config.model, k)!r})"
              for k, v in vars(saved.model).items() if getattr(config.model, k) != v]
    if config.task == "layout" and saved.data.palette_colours != config.data.palette_colours:
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
