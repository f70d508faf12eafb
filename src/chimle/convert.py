"""Import official CHIMLE generator checkpoints (plain `state_dict` .pth files) into our model format.

The official release names its modules `level_{k}_map_0`, `level_{k}_map`, `level_{k}_feat`, `level_{k}_style`,
`level_{k}_up`, `level_{k}_out` (k = 1..L) inside flattened `nn.Sequential`s, with weight-norm parameters
`weight_g` / `weight_v`; files saved from a DataParallel wrapper add a `module.` prefix. The widths are read
from the tensor shapes, so any official configuration converts, and the result renders the same outputs for
the same inputs and codes.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from chimle.checkpoint import CheckpointError, check_state, save_model
from chimle.config import Config, ConfigError, resolve
from chimle.files import atomic_write
from chimle.generator import Generator

# Our name (after `levels.{i}.`) -> the official name (after `level_{i+1}_`); `up` depends on the wiring.
_RULES = [
    (r"map_0\.(weight|bias)", r"map_0.0.\1"),
    (r"map\.linears\.(\d+)\.(weight|bias)", lambda m: f"map.{2 * int(m[1])}.{m[2]}"),
    (r"feat\.(\w+)", r"feat.0.\1"),
    (
        r"style\.rrdbs\.(\d+)\.rdbs\.(\d+)\.convs\.(\d+)\.(\w+)",
        lambda m: f"style.sub.{m[1]}.RDB{int(m[2]) + 1}.conv{int(m[3]) + 1}.0.{m[4]}",
    ),
    (r"style\.affine\.(\d+)\.(weight|bias)", r"style.sub.transform_\1.\2"),
    (r"style\.conv\.(\w+)", r"style.sub.lr_conv.0.\1"),
    (r"out\.(\w+)", r"out.0.\1"),
]
# The official `up` is Sequential(Upsample, conv, act, conv, act), or (conv, act, conv, act) where it does not
# upsample (the colourization tower's last level).
_UP_UPSAMPLE = {"conv1": "1", "conv2": "3"}
_UP_REFINE = {"conv1": "0", "conv2": "2"}


def official_name(key: str, generator: Generator) -> str:
    """The official name of one of our generator's state-dict keys."""
    match = re.fullmatch(r"levels\.(\d+)\.(.+)", key)
    level, rest = int(match[1]), match[2]
    up = re.fullmatch(r"up\.(conv[12])\.(\w+)", rest)
    if up:
        refine = generator.levels[level].up.scale == 1  # the colourization tower's last level
        table = _UP_REFINE if refine else _UP_UPSAMPLE
        return f"level_{level + 1}_up.{table[up[1]]}.{up[2]}"
    for pattern, replacement in _RULES:
        if re.fullmatch(pattern, rest):
            return f"level_{level + 1}_" + re.sub(pattern, replacement, rest)
    raise KeyError(f"no official name for {key}")


def to_official(generator: Generator) -> dict[str, torch.Tensor]:
    """Our generator's weights under the official names (for comparisons with the official code)."""
    return {official_name(k, generator): v for k, v in generator.state_dict().items()}


def infer_model(state: dict[str, torch.Tensor], task: str) -> Config:
    """The config of an official checkpoint: the task's paper preset with the widths read from the tensors."""
    config = resolve(task=task, preset="paper")
    levels = 0
    while f"level_{levels + 1}_feat.0.weight_v" in state:
        levels += 1
    if levels == 0:
        raise CheckpointError("no `level_1_feat.0.weight_v` found: this is not an official CHIMLE generator file")
    m = config.model
    try:
        blocks = len({k.split(".")[2] for k in state if re.match(r"level_1_style\.sub\.transform_\d+\.weight", k)})
        mapping = len([k for k in state if re.fullmatch(r"level_1_map\.\d+\.weight", k)])
        overrides = [
            f"model.levels={levels}",
            f"model.channels={[state[f'level_{k}_feat.0.weight_v'].shape[0] for k in range(1, levels + 1)]}",
            f"model.growth={[state[f'level_{k}_style.sub.0.RDB1.conv1.0.weight_v'].shape[0] for k in range(1, levels + 1)]}",
            f"model.blocks={blocks}",
            f"model.code_dim={state['level_1_map_0.0.weight'].shape[1]}",
            f"model.style_dim={state['level_1_map_0.0.weight'].shape[0]}",
            f"model.mapping_layers={mapping}",
            f"model.noise_channels={state['level_1_feat.0.weight_v'].shape[1] - m.in_channels}",
            f"search.samples_per_level={(config.search.samples_per_level * levels)[:levels]}",
        ]
        out_channels = state["level_1_out.0.weight_v"].shape[0]
    except KeyError as error:
        raise CheckpointError(f"the official file lacks {error}, which every official generator has") from None
    except IndexError:
        raise CheckpointError("the official file holds tensors of the wrong shape (a weight with too few "
                              "dimensions); it is damaged or not a CHIMLE generator") from None
    if out_channels != m.out_channels:
        raise CheckpointError(
            f"the file's generator predicts {out_channels} channels but the '{task}' task needs {m.out_channels}; "
            "check --task"
        )
    try:
        return resolve(task=task, preset="paper", overrides=overrides)
    except ConfigError as error:
        raise CheckpointError(f"the official file's tensors describe no valid generator ({error}); it is "
                              "incomplete or not a CHIMLE generator") from None


def convert_state(state: dict[str, torch.Tensor], task: str) -> tuple[Generator, Config, list[str]]:
    """Our generator loaded with an official state dict; also the official keys that were dropped, with why."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    config = infer_model(state, task)
    generator = Generator(config.model)
    names = {official_name(k, generator): k for k in generator.state_dict()}
    dropped = []
    if generator.levels[-1].up is None:
        # The official generic tower builds an `up` block on its last level that its forward never uses.
        last_up = f"level_{config.model.levels}_up."
        dropped = sorted(k for k in state if k.startswith(last_up))
    ours = {names.get(k, k): v for k, v in state.items() if k not in dropped}
    check_state(generator, ours, "the official file")
    generator.load_state_dict(ours)
    return generator, config, dropped


def convert_file(source: str | Path, task: str, out_dir: str | Path) -> Path:
    """Convert an official .pth file into `out_dir/model.safetensors`; return its path."""
    source = Path(source)
    if not source.is_file():
        raise CheckpointError(f"{source} does not exist")
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(f"{source} is not a plain PyTorch state dict that loads safely ({error})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source} does not hold a state dict of tensors")
    generator, config, dropped = convert_state(state, task)
    out = Path(out_dir) / "model.safetensors"
    save_model(out, generator, config)
    atomic_write(Path(out_dir) / "config.yaml", config.to_yaml().encode())
    if dropped:
        print(f"dropped {len(dropped)} unused tensors of the official generic tower ({dropped[0]}, ...)")
    return out
