"""Typed configuration: dataclasses with one comment per field, YAML presets, dotted overrides.

A run's configuration is resolved once (defaults <- preset <- task <- YAML file <- `-o key=value` overrides),
validated, and saved with every run and checkpoint, so a checkpoint alone rebuilds its model.

The paper's vocabulary, mapped once: a "month" is a round (`train.round_size` examples whose codes are
searched together), a "day" is the `train.steps_per_round` optimisation steps that follow with those codes
fixed, and "TIM" (Tower Implicit Model) is the generator.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

WIRINGS = ("generic", "super-resolution", "colourization")
FLOAT_LISTS = {"search.reject_below"}  # list fields of floats (every other list field holds integers)
PRESETS = ("paper", "small", "tiny")
SCHEDULES = ("constant", "cosine", "stable-decay")
INITS = ("official", "pytorch")
MAX_LEVELS = 12  # most generator levels a config may ask for (each doubles the resolution; paper: 4)


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


@dataclass
class ModelConfig:
    wiring: str = "generic"  # how levels are fed: generic | super-resolution | colourization (set by the task)
    levels: int = 4  # number of generator modules (paper: 4)
    channels: list[int] = field(default_factory=lambda: [128, 64, 64, 64])  # residual channels per level (paper: 128, 64, 64, 64)
    growth: list[int] = field(default_factory=lambda: [256, 192, 128, 64])  # dense growth channels per level (paper: 256, 192, 128, 64)
    blocks: int = 6  # RRDB blocks per level (paper: 6)
    noise_channels: int = 5  # spatial noise channels per level (paper: 5)
    code_dim: int = 128  # mapping-network input numbers per level (paper: 128)
    style_dim: int = 512  # style vector width (paper: 512)
    mapping_layers: int = 7  # Linear layers after each level's embedding (paper: 7)
    in_channels: int = 3  # image channels fed to each level (set by the task; 1 for colourization)
    out_channels: int = 3  # channels each level predicts (set by the task; 2 chroma channels for colourization)
    predict_residual: bool = False  # each level adds its output to its image input at the output's size (paper: off)


@dataclass
class DataConfig:
    path: str = ""  # folder of training images (targets; paired: A|B images if `inputs` is empty); empty = the 9 built in; photoset:train = the open photo set
    inputs: str = ""  # folder of given inputs matched to `path` by file stem (paired: input images; layout: label maps)
    crop: int = 256  # height (and width) of the random training crops of the target, px (paper, super-resolution: 512)
    crop_width: int = 0  # width of the crops if not square, px; 0 = `crop` (Cityscapes at 256 x 512: 512)
    skip_bad: bool = False  # skip unreadable or too-small images with a warning instead of stopping
    shuffle_channels: bool = False  # permute the RGB channels of each crop at random: more colours from few photos (paper: off)
    jpeg_quality: int = 10  # decompression: JPEG quality of the degraded input, 1..95 (paper data: 1)
    jpeg_subsampling: str = "4:2:0"  # decompression: JPEG chroma subsampling, 4:4:4 | 4:2:2 | 4:2:0 (Pillow's default)
    palette: str = "cityscapes"  # layout: label colours, cityscapes | builtin | a palette JSON file
    palette_colours: list[int] = field(default_factory=list)  # layout: the palette's class colours r,g,b,... (filled in)
    void_colours: list[int] = field(default_factory=list)  # layout: colours meaning "no class" r,g,b,... (filled in)
    rebalance: bool = False  # layout: draw rare-looking examples more often and weigh rare pixels more (paper: on)
    rebalance_classes: list[int] = field(default_factory=list)  # layout: classes driving it; empty = those in half the images
    rebalance_floor: float = 0.1  # layout: least loss weight of a pixel of a common-looking class


@dataclass
class SearchConfig:
    samples_per_level: list[int] = field(default_factory=lambda: [200, 200, 20, 10])  # candidate codes per level (paper: 200, 200, 20, 10)
    flat: bool = False  # flat cIMLE instead: one pool of full codes judged at the last level only
    flat_samples: int = 0  # pool size of the flat search; 0 = the hierarchical pools' total render count
    max_batch: int = 64  # most candidate renders run at once (the search's memory budget; CPUs: search.level_batch)
    precision: str = "auto"  # candidate renders: auto (bfloat16 where the device has it natively) | float32 | bfloat16
    rescore: int = 2  # with bfloat16: each example's nearest candidates re-judged in float32 at every level
    compile: bool = False  # torch.compile the candidates' renders: one compile per level for the run (paper: off)
    zero_codes: bool = False  # regression baseline: no search, every code zero (same network, same loss)
    reject_below: list[float] = field(default_factory=list)  # RS-IMLE: per level, candidates nearer than this are rejected; [] or 0 = off (paper: off)
    adaptive: bool = False  # adaptive IMLE: keep an example's code until training has pulled it within its threshold (needs train.examples)
    adaptive_shrink: float = 0.04  # adaptive IMLE: a new threshold is (1 - this) x the distance reached (AdaIMLE: 0.04)
    adaptive_min_visits: int = 7  # adaptive IMLE: visits before a code whose distance beat its threshold is searched again (AdaIMLE: 7)
    adaptive_max_visits: int = 30  # adaptive IMLE: visits after which a code is searched again regardless (AdaIMLE: 30)


@dataclass
class TrainConfig:
    round_size: int = 400  # examples whose codes are searched together, a "month" (paper: 400)
    steps_per_round: int = 10_000  # optimisation steps with those codes fixed, a "day" (paper: 10,000)
    passes: int = 20  # passes over the training data (paper: 20)
    rounds: int = 0  # rounds to train whatever the data size; 0 = as many as `passes` passes need (paper: 0)
    examples: int = 0  # a fixed set of this many training crops, each visited once per pass; 0 = a new crop every time (paper: 0)
    batch_size: int = 1  # examples per optimisation step (paper: 1)
    lr: float = 1e-4  # Adam learning rate (paper: 1e-4, constant)
    schedule: str = "constant"  # learning-rate schedule: constant (paper) | cosine (over the run, down to lr_final x lr) | stable-decay (constant, then that cosine over the last decay_rounds)
    warmup: int = 0  # optimisation steps of linear learning-rate warm-up from 0 (paper: 0)
    lr_final: float = 0.0  # cosine and stable-decay: the rate at the last step, as a fraction of lr
    decay_rounds: int = 0  # stable-decay: the last rounds, over which the rate falls (a run extended later decays at its new end)
    ema: float = 0.0  # decay per step of the moving average of the weights that sampling uses; 0 = off (paper: off)
    compile: bool = False  # torch.compile the step's forward and backward: one compile (minutes on a CPU) for the run (paper: off)
    channels_last: bool = False  # the generator in channels-last memory layout while it trains (CPU, small widths: faster steps; paper: off)
    precision: str = "float32"  # the step's forward: float32 | bfloat16 (autocast; LPIPS distances and weights stay float32) | auto (bfloat16 where the device has it natively)
    init: str = "pytorch"  # initial weights: pytorch (PyTorch's defaults, style heads zero) | official (zero biases, Linear kaiming x 0.1)
    beta1: float = 0.9  # Adam beta1 (paper: 0.9)
    beta2: float = 0.999  # Adam beta2 (paper: 0.999)
    mapping_lr_scale: float = 0.01  # learning-rate factor of the mapping networks (paper: 0.01)
    perceptual: str = "vgg"  # LPIPS backbone for search and loss: vgg (paper) | alex (cheaper)
    final_perceptual: str = ""  # LPIPS backbone for search and loss over the last final_rounds rounds: vgg | alex | "" (train.perceptual throughout)
    final_rounds: int = 0  # the last rounds that use final_perceptual (a run extended later switches at its new end)
    pixel_weight: float = 0.0  # weight of a mean-absolute-error term added to LPIPS in search and loss (paper: 0)
    seed: int = 0  # seed of crops, augmentation, candidate pools and initial weights
    checkpoint_every: int = 1000  # optimisation steps between checkpoints
    keep_checkpoints: int = 2  # resumable states kept on disk
    grid_every: int = 1000  # optimisation steps between sample grids
    log_every: int = 50  # optimisation steps between log lines


@dataclass
class Config:
    task: str = "super-resolution"  # task preset name, see chimle.tasks
    preset: str = "paper"  # model/schedule preset this config started from
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def merge(config: Config, values: dict[str, Any], where: str = "config") -> Config:
    """Return `config` with the nested `values` applied; unknown keys and wrong types are errors."""
    data = config.to_dict()
    _merge_into(data, values, where, prefix="")
    return from_dict(data)


def _merge_into(data: dict, values: dict, where: str, prefix: str) -> None:
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in data:
            raise ConfigError(f"{where}: unknown setting '{name}'; known: {', '.join(prefix + k for k in data)}")
        if isinstance(data[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{name}' is a section; give its fields, e.g. {name}.<field>=...")
            _merge_into(data[key], value, where, prefix=f"{name}.")
        else:
            data[key] = _coerce(value, data[key], name, where)


def _coerce(value: Any, current: Any, name: str, where: str) -> Any:
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(current, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(current, str):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif isinstance(current, list) and name in FLOAT_LISTS:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, (list, tuple)):
            return [_coerce(v, 0.0, name, where) for v in value]
    elif isinstance(current, list):
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
    raise ConfigError(f"{where}: '{name}' must be like {current!r}, got {value!r}")


def from_dict(data: dict[str, Any]) -> Config:
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    kwargs = {}
    for key, value in data.items():
        if key in ("model", "data", "search", "train"):
            kwargs[key] = {"model": ModelConfig, "data": DataConfig, "search": SearchConfig, "train": TrainConfig}[key](**value)
        elif key in sections:
            kwargs[key] = value
        else:
            raise ConfigError(f"unknown setting '{key}'")
    return Config(**kwargs)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ["model.blocks=2", "search.samples_per_level=[4,4]"] into a nested dict (values read as YAML)."""
    nested: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.field=value, e.g. model.blocks=2")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except (yaml.YAMLError, RecursionError):
            raise ConfigError(f"override '{item}': the value is not valid YAML; quote it or fix its brackets") from None
        parts = key.strip().split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' sets a field inside a setting that is not a section")
        node[parts[-1]] = value
    return nested


def _update(values: dict, changes: dict) -> dict:
    """`values` with the nested `changes` applied, section by section (in place; returned for convenience)."""
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            _update(values[key], value)
        else:
            values[key] = value
    return values


def load_preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    text = resources.files("chimle").joinpath(f"presets/{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as error:
        reason = str(error) if isinstance(error, yaml.YAMLError) else error.__class__.__name__
        raise ConfigError(f"config file {path} is not valid YAML: {reason}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model:, data:, ...)")
    return values


def resolve(
    task: str | None = None,
    preset: str = "small",
    file: str | Path | None = None,
    overrides: list[str] | None = None,
    settings: dict[str, Any] | None = None,
) -> Config:
    """Build a validated config: defaults <- preset (and its per-task part) <- task wiring <- YAML file <- nested
    `settings` <- dotted overrides. The task is taken from the overrides, else the settings, else the `task`
    argument, else the file, else the default."""
    from chimle import tasks  # the task registry fills in wiring and channels

    values = load_preset(preset)
    per_task = values.pop("tasks", {})
    from_file = load_yaml(file) if file is not None else {}
    user = _update(dict(settings or {}), parse_overrides(overrides or []))
    task = user.get("task") or task or from_file.get("task") or Config.task
    if not isinstance(task, str):
        raise ConfigError(f"task={task!r} must be a task name, e.g. super-resolution")
    entry = tasks.get(task)

    config = merge(Config(preset=preset), values, where=f"preset '{preset}'")
    config = merge(config, {"task": entry.name, **per_task.get(entry.name, {})}, where=f"preset '{preset}'")
    config = merge(config, entry.model_overrides(), where=f"task '{entry.name}'")
    config = merge(config, from_file, where=str(file))
    config = merge(config, user, where="command line")
    config = _fill_palette(config)
    validate(config)
    return config


def user_settings(file: str | Path | None = None, overrides: list[str] | None = None, **fields: Any) -> dict[str, Any]:
    """What a user set on the command line, nested and without defaults: a YAML file's values, then the dotted
    overrides, then named fields (e.g. task=...) that are not None. What a resumed run changes in its config."""
    values = load_yaml(file) if file is not None else {}
    _update(values, parse_overrides(overrides or []))
    values.update({key: value for key, value in fields.items() if value is not None})
    return values


# Settings a resumed run cannot change: its weights are of this task and shape, and the position it resumes from
# counts rounds of `round_size` examples cropped to this size and `steps_per_round` steps.
FIXED_ON_RESUME = ("task", "model.", "data.crop", "data.crop_width", "train.round_size",
                   "train.steps_per_round", "train.seed", "train.examples", "search.samples_per_level")


def load_run(path: str | Path, settings: dict[str, Any] | None = None) -> Config:
    """The config of a run from its config.yaml (as its user may have edited it) with `settings` applied, through
    the same coercion and validation as a fresh run's: the file stands for everything the run was given."""
    values = load_yaml(path)
    preset = values.get("preset")
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ConfigError(f"{path}: preset={preset!r} must be one of {', '.join(PRESETS)} (the preset the run started "
                          "from)")
    if settings and settings.get("preset", preset) != preset:
        raise ConfigError(f"--preset {settings['preset']}: this run started from the {preset} preset and keeps it "
                          f"(its {Path(path).name} holds every setting; change those instead)")
    try:
        return resolve(preset=preset, file=path, settings=settings)
    except ConfigError as error:
        raise error if str(path) in str(error) else ConfigError(f"{path}: {error}") from None


def changed(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """The settings that differ between two configs: {"section.field": (old value, new value)}."""
    a, b = _flatten(old.to_dict()), _flatten(new.to_dict())
    return {key: (a.get(key), b.get(key)) for key in sorted(a.keys() | b.keys()) if a.get(key) != b.get(key)}


def fixed_changes(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """The settings of FIXED_ON_RESUME that differ between `old` and `new`, as `changed` gives them."""
    return {key: values for key, values in changed(old, new).items()
            if any(key == fixed or (fixed.endswith(".") and key.startswith(fixed)) for fixed in FIXED_ON_RESUME)}


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _fill_palette(config: Config) -> Config:
    """A layout model's input channels come from its palette, stored in the config so the model file is enough
    to read label maps at sampling time."""
    from chimle import tasks
    from chimle.labels import palette_of

    if tasks.get(config.task).input_kind != "labels":
        return config

    palette = palette_of(config)
    colours, void = palette.flat()
    return merge(config, {"data": {"palette_colours": colours, "void_colours": void},
                          "model": {"in_channels": palette.channels}}, where=f"palette '{config.data.palette}'")


def validate(config: Config) -> None:
    """Refuse values that cannot work, with the field, the value and what is allowed."""
    m, s, t, d = config.model, config.search, config.train, config.data
    problems = [f"{section}.{f.name}={getattr(part, f.name)} must be a finite number"
                for section, part in (("model", m), ("data", d), ("search", s), ("train", t))
                for f in dataclasses.fields(part)
                if isinstance(getattr(part, f.name), float) and not math.isfinite(getattr(part, f.name))]
    if m.wiring not in WIRINGS:
        problems.append(f"model.wiring={m.wiring!r} must be one of {WIRINGS}")
    if not 1 <= m.levels <= MAX_LEVELS:
        problems.append(f"model.levels={m.levels} must be in 1..{MAX_LEVELS}")
    for name in ("channels", "growth"):
        values = getattr(m, name)
        if len(values) != m.levels:
            problems.append(f"model.{name}={values} needs one value per level ({m.levels})")
        if any(v < 1 for v in values):
            problems.append(f"model.{name}={values} must be positive")
    for name in ("blocks", "code_dim", "style_dim", "mapping_layers", "in_channels", "out_channels"):
        if getattr(m, name) < 1:
            problems.append(f"model.{name}={getattr(m, name)} must be >= 1")
    from chimle import tasks

    if m.predict_residual and (not tasks.get(config.task).corrects_input or m.in_channels != m.out_channels):
        problems.append(f"model.predict_residual=true adds each level's output to its image input, which needs "
                        f"outputs like the inputs (in_channels={m.in_channels}, out_channels={m.out_channels}, "
                        f"task {config.task!r}): use it where a task's outputs are images like its inputs")
    if m.noise_channels < 0:
        problems.append(f"model.noise_channels={m.noise_channels} must be >= 0")
    if len(s.samples_per_level) != m.levels or any(v < 1 for v in s.samples_per_level):
        problems.append(f"search.samples_per_level={s.samples_per_level} needs one positive value per level ({m.levels})")
    if s.flat_samples < 0 or s.max_batch < 1:
        problems.append("search.flat_samples must be >= 0 and search.max_batch >= 1")
    if s.precision not in ("auto", "float32", "bfloat16"):
        problems.append(f"search.precision={s.precision!r} must be 'auto', 'float32' or 'bfloat16'")
    if t.precision not in ("auto", "float32", "bfloat16"):
        problems.append(f"train.precision={t.precision!r} must be 'auto', 'float32' or 'bfloat16'")
    if s.reject_below and (len(s.reject_below) not in (1, m.levels) or any(not v >= 0 for v in s.reject_below)):
        problems.append(f"search.reject_below={s.reject_below} needs one value >= 0, or one per level ({m.levels})")
    if s.adaptive and (not t.examples or s.flat or s.zero_codes):
        problems.append("search.adaptive needs a fixed set of examples (train.examples > 0) and the hierarchical search")
    if not 0 <= s.adaptive_shrink < 1 or not 1 <= s.adaptive_min_visits <= s.adaptive_max_visits:
        problems.append(f"search.adaptive_shrink={s.adaptive_shrink} must be in [0, 1) and 1 <= adaptive_min_visits="
                        f"{s.adaptive_min_visits} <= adaptive_max_visits={s.adaptive_max_visits}")
    if t.examples < 0 or t.examples % t.round_size:
        problems.append(f"train.examples={t.examples} must be 0 or a multiple of train.round_size={t.round_size}")
    if s.rescore < 0:
        problems.append(f"search.rescore={s.rescore} must be >= 0")
    if t.rounds < 0:
        problems.append(f"train.rounds={t.rounds} must be >= 0")
    for name in ("round_size", "steps_per_round", "passes", "batch_size", "checkpoint_every", "keep_checkpoints",
                 "grid_every", "log_every"):
        if getattr(t, name) < 1:
            problems.append(f"train.{name}={getattr(t, name)} must be >= 1")
    if not t.lr > 0 or not 0 <= t.beta1 < 1 or not 0 <= t.beta2 < 1 or not t.mapping_lr_scale >= 0:
        problems.append("train.lr must be > 0, train.beta1 and beta2 in [0, 1), train.mapping_lr_scale >= 0")
    if t.schedule not in SCHEDULES:
        problems.append(f"train.schedule={t.schedule!r} must be one of {SCHEDULES}")
    if t.warmup < 0 or not 0 <= t.lr_final <= 1:
        problems.append(f"train.warmup={t.warmup} must be >= 0 and train.lr_final={t.lr_final} in [0, 1]")
    if (t.schedule == "stable-decay") != (t.decay_rounds > 0) or t.decay_rounds < 0:
        problems.append(f"train.decay_rounds={t.decay_rounds} must be >= 1 with train.schedule=stable-decay and 0 "
                        f"with any other schedule (train.schedule={t.schedule!r})")
    if not 0 <= t.ema < 1:
        problems.append(f"train.ema={t.ema} must be in [0, 1) (0 = off; e.g. 0.999)")
    if t.init not in INITS:
        problems.append(f"train.init={t.init!r} must be one of {INITS}")
    if not t.pixel_weight >= 0:
        problems.append(f"train.pixel_weight={t.pixel_weight} must be >= 0")
    if t.perceptual not in ("vgg", "alex"):
        problems.append(f"train.perceptual={t.perceptual!r} must be 'vgg' or 'alex'")
    if t.final_perceptual not in ("", "vgg", "alex"):
        problems.append(f"train.final_perceptual={t.final_perceptual!r} must be 'vgg', 'alex' or '' (none)")
    if bool(t.final_perceptual) != (t.final_rounds > 0) or t.final_rounds < 0:
        problems.append(f"train.final_rounds={t.final_rounds} must be >= 1 with train.final_perceptual set and 0 "
                        f"without it (train.final_perceptual={t.final_perceptual!r})")
    if t.final_perceptual and (any(s.reject_below) or s.adaptive):
        problems.append("train.final_perceptual changes the search distance's units, which search.reject_below and "
                        "search.adaptive's thresholds are in: use one LPIPS network for the run (add -o "
                        "train.final_perceptual= -o train.final_rounds=0; the small preset switches for "
                        "decompression) or neither option")
    for name in ("crop", "crop_width"):
        value = getattr(d, name)
        if m.levels <= MAX_LEVELS and (name == "crop" or value) and (value < 2**m.levels or value % 2**m.levels):
            problems.append(f"data.{name}={value} must be a positive multiple of 2**levels = {2 ** m.levels}")
    if not 1 <= d.jpeg_quality <= 95:
        problems.append(f"data.jpeg_quality={d.jpeg_quality} must be in 1..95")
    if d.jpeg_subsampling not in ("4:4:4", "4:2:2", "4:2:0"):
        problems.append(f"data.jpeg_subsampling={d.jpeg_subsampling!r} must be 4:4:4, 4:2:2 or 4:2:0")
    if len(d.palette_colours) % 3 or len(d.void_colours) % 3:
        problems.append("data.palette_colours and data.void_colours must hold r,g,b triples")
    if not 0 < d.rebalance_floor <= 1:
        problems.append(f"data.rebalance_floor={d.rebalance_floor} must be in (0, 1]")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
