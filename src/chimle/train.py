"""Training: rounds of code search followed by optimisation steps with the chosen codes fixed (DESIGN.md §2.5).

    chimle train --task super-resolution --preset small --out runs/sr                    # CPU, built-in photos
    chimle train --task super-resolution --preset paper --data DIR --out runs/sr-paper  # one GPU
    chimle train ... --out runs/sr --resume                                             # continue a killed run
    torchrun --standalone --nproc_per_node=4 -m chimle train --preset paper --data DIR --out runs/sr  # 4 GPUs

A round takes `round_size` training examples (random crops with a random flip/transpose), searches a code for
each (chimle.search), then runs `steps_per_round` Adam steps over those examples, cyclically, minimising the
sum over levels of LPIPS(output, target). The paper calls a round a "month" and its steps "days"; its schedule
is 400 examples, 10,000 steps at batch 1, 20 passes over the data.

Every example, candidate pool and batch is a function of (seed, its number), so a run resumed from any
checkpoint reaches the same weights as an uninterrupted one. Under torchrun each process searches the codes of
its share of a round and takes its share of every step's batch, and rank 0 alone writes files (see
chimle.distributed). What the run directory holds, and its reading and writing: chimle.run.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from chimle import builtin, checkpoint, devices, distributed, photoset, streams, tasks
from chimle import weights as weights_lib
from chimle.checkpoint import CheckpointError, check_fits, check_state
from chimle.config import Config, ConfigError, TrainConfig
from chimle.files import crash_point
from chimle.data import ImageFolder, PairedFolder, builtin_photos
from chimle.streams import Draw
from chimle.adaptive import AdaptiveState, data_point
from chimle.ema import WeightAverage
from chimle.generator import Generator, initialise
from chimle.perceptual import LPIPS, Distance
from chimle.distributed import World
from chimle.run import RunFiles
from chimle.blocks import folded
from chimle.search import SearchResult, codes_from, fixed_weights, flat_search, hierarchical_search, per_level

MAX_BAD_STEPS = 5  # consecutive non-finite losses before training stops


@dataclass
class Round:
    """The examples of one round and their searched codes."""

    number: int
    ids: torch.Tensor  # (round_size,) which examples: their numbers, or with train.examples their place in the set
    inputs: list[torch.Tensor]  # input pyramid of all examples
    targets: list[torch.Tensor]  # target pyramid of all examples
    weights: list[torch.Tensor] | None = None  # per-pixel loss weights per level (layout rebalancing), or None
    codes: list[torch.Tensor] | None = None  # regenerated from `search`, one (round_size, code size) per level


def total_rounds(config: Config, dataset_size: int) -> int:
    """`train.rounds`, or enough rounds for `train.passes` passes over the data (or the fixed set of examples)."""
    if config.train.rounds:
        return config.train.rounds
    return max(1, math.ceil(config.train.passes * (config.train.examples or dataset_size) / config.train.round_size))


def training_set(config: Config) -> ImageFolder:
    """The training data the task needs: photos (inputs derived from them), pairs, or photos with label maps."""
    task, d = tasks.get(config.task), config.data
    crop = (d.crop, d.crop_width or d.crop)
    d = replace(d, path=photoset.resolve(d.path))
    if task.input_kind == "labels":
        from chimle.labels import LayoutFolder, builtin_layouts, palette_of

        if bool(d.path) != bool(d.inputs):
            raise ConfigError("layout training needs both --data PHOTOS and -o data.inputs=LABEL_MAPS (or neither, "
                              "for the built-in layouts)")
        return LayoutFolder(d.path or builtin_photos("train"), d.inputs or builtin_layouts("train"),
                            palette_of(config), crop, skip_bad=d.skip_bad, rebalance=d.rebalance,
                            rebalance_classes=d.rebalance_classes, floor=d.rebalance_floor)
    if d.inputs or not task.derived:
        if not d.path:
            raise ConfigError(f"the {task.name} task needs training pairs: --data DIR of A|B images (input left, "
                              "target right), or --data TARGETS -o data.inputs=INPUTS (matched by file stem)")
        return PairedFolder(d.path, d.inputs or None, crop, skip_bad=d.skip_bad, shuffle_channels=d.shuffle_channels)
    return ImageFolder(d.path or builtin_photos("train"), crop, skip_bad=d.skip_bad,
                       shuffle_channels=d.shuffle_channels, colour=task.colour_targets)


def draw_round(config: Config, dataset: ImageFolder, number: int, device: torch.device) -> Round:
    """The examples of round `number`: example numbers number*R .. number*R+R-1 of the run's sequence, or with
    `train.examples` the examples of the fixed set that those numbers visit (chimle.adaptive.data_point)."""
    t = config.train
    ids = torch.arange(number * t.round_size, (number + 1) * t.round_size)
    if t.examples:
        ids = torch.tensor([data_point(t.seed, int(n), t.examples) for n in ids])
    examples = [dataset.example(t.seed, int(i)) for i in ids]
    images = torch.stack([e.image for e in examples])
    sources = torch.stack([e.source for e in examples]) if examples[0].source is not None else None
    inputs, targets = tasks.get(config.task).pair(images, config, sources)
    weights = None
    if examples[0].weight is not None:
        weights = [w.to(device) for w in tasks.pyramid(torch.stack([e.weight for e in examples]),
                                                        config.model.levels, mode="nearest")]
    return Round(number, ids, [x.to(device) for x in inputs], [y.to(device) for y in targets], weights)


def search_round(config: Config, generator: Generator, distance: Distance, batch: Round,
                 world: World = World(), adaptive: AdaptiveState | None = None) -> SearchResult:
    """Choose every example's code (hierarchical, or flat cIMLE if configured). Each process searches its block
    of the round; every process gets the whole round's result. An example's pool seed depends on its number
    only, so the result does not depend on the number of processes. With adaptive IMLE, examples whose code is
    kept are not searched and `adaptive` records the visit."""
    seeds = torch.randint(0, 2**62, (config.train.round_size,),
                          generator=streams.run(Draw.POOL_SEEDS, config.train.seed, batch.number))
    share = config.train.round_size // world.size
    mine = slice(world.rank * share, (world.rank + 1) * share)
    inputs, targets, seeds = [x[mine] for x in batch.inputs], [y[mine] for y in batch.targets], seeds[mine]
    task, s = tasks.get(config.task), config.search
    generator.eval()
    dtype = devices.compute_dtype(s.precision, inputs[0].device)

    def search(x, y, pool_seeds):
        return hierarchical_search(generator, distance, task, x, y, pool_seeds, s.samples_per_level, s.max_batch,
                                   dtype, rescore=s.rescore, reject_below=s.reject_below, compile=s.compile)

    if s.zero_codes:  # the regression baseline searches nothing; its codes are set to zero in _train_round
        levels = config.model.levels
        result = SearchResult(seeds, torch.zeros(len(seeds), levels, dtype=torch.long), [1] * levels,
                              torch.zeros(len(seeds), levels))
    elif s.flat:
        size = s.flat_samples or sum(s.samples_per_level)
        result = flat_search(generator, distance, task, inputs, targets, seeds, size, s.max_batch, dtype,
                             reject_below=per_level(s.reject_below, config.model.levels)[-1], compile=s.compile)
    elif adaptive is not None:
        result, due, before = _search_adaptive(config, generator, distance, inputs, targets, seeds,
                                               batch.ids[mine], adaptive, search)
    else:
        result = search(inputs, targets, seeds)
    crash_point("search")
    result = SearchResult(distributed.gather_rows(result.seeds), distributed.gather_rows(result.winners),
                          result.pool_sizes, distributed.gather_rows(result.distances))
    if adaptive is not None:
        adaptive.update(batch.ids, distributed.gather_rows(due), result.seeds, result.winners,
                        distributed.gather_rows(before), result.distances.sum(1), s.adaptive_shrink)
    return result


def _search_adaptive(config: Config, generator: Generator, distance: Distance, inputs, targets, fresh, ids,
                     adaptive: AdaptiveState, search) -> tuple[SearchResult, torch.Tensor, torch.Tensor]:
    """Adaptive IMLE on a block of examples (chimle.adaptive): measure the distance of every kept code, search
    the examples that are due (in pools seeded `fresh`), keep the others' codes. Returns the block's result,
    which examples were searched, and the distances (summed over levels) their codes had before, +inf where
    they had none."""
    s, levels = config.search, config.model.levels
    has = adaptive.has_code(ids)
    distances = torch.full((len(ids), levels), float("inf"))
    if has.any():
        kept = SearchResult(adaptive.seeds[ids[has]], adaptive.winners[ids[has]], adaptive.pool_sizes, distances[has])
        part = [x[has.to(x.device)] for x in inputs]
        codes = codes_from(kept, generator.code_sizes(generator.start([x[:1] for x in part])), part[0].device)
        distances[has] = code_distances(generator, distance, tasks.get(config.task), part,
                                        [y[has.to(y.device)] for y in targets], codes, s.max_batch)
    before = distances.sum(1)
    due = adaptive.due(ids, before, s.adaptive_min_visits, s.adaptive_max_visits)
    seeds, winners = adaptive.seeds[ids].clone(), adaptive.winners[ids].clone()
    if due.any():
        index = due.to(inputs[0].device)
        found = search([x[index] for x in inputs], [y[index] for y in targets], fresh[due])
        seeds[due], winners[due], distances[due] = found.seeds, found.winners, found.distances
    return SearchResult(seeds, winners, list(s.samples_per_level), distances), due, before


@torch.no_grad()
def code_distances(generator: Generator, distance: Distance, task: tasks.Task, inputs: list[torch.Tensor],
                   targets: list[torch.Tensor], codes: list[torch.Tensor], max_batch: int) -> torch.Tensor:
    """Each example's distance to its target at every level with the given codes: (N, levels), on the CPU."""
    rows = []
    with fixed_weights(generator, inputs[0].device):
        for first in range(0, inputs[0].shape[0], max_batch):
            part = [x[first : first + max_batch] for x in inputs]
            raw = generator(part, [c[first : first + max_batch] for c in codes])
            rows.append(torch.stack([distance(task.image(r, part, level), targets[level][first : first + max_batch])
                                     for level, r in enumerate(raw)], dim=1).cpu())
    return torch.cat(rows).float()


def batch_indices(config: Config, step_in_round: int, world: World = World()) -> torch.Tensor:
    """This process's examples of a step: the round's examples are taken cyclically, world.size x batch_size
    at a time (the step's whole batch), and process r takes the r-th batch_size of them."""
    b, size = config.train.batch_size, config.train.round_size
    first = (step_in_round * world.size + world.rank) * b
    return torch.arange(first, first + b) % size


def level_losses(generator: Generator, distance: Distance, task: tasks.Task, inputs: list[torch.Tensor],
                 targets: list[torch.Tensor], codes: list[torch.Tensor],
                 weights: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Distance of each level's output to its target, averaged over the batch: (levels,). Per-pixel weights
    (layout rebalancing) multiply both output and target before the distance, as in the paper."""
    raw = generator(inputs, codes)
    # In float32 from here (under bf16 autocast the raw outputs are bf16): colour conversion, weights, the pixel term.
    outputs = [task.image(r.float(), inputs, level) for level, r in enumerate(raw)]
    if weights is not None:
        outputs = [o * w for o, w in zip(outputs, weights)]
        targets = [t * w for t, w in zip(targets, weights)]
    return torch.stack([distance(o, t).mean() for o, t in zip(outputs, targets)])


def step_precision(config: Config, device: torch.device):
    """The context the training step's forward runs in (`train.precision`): bfloat16 autocast, or none. The
    weights, their gradients and Adam stay float32, and so do the LPIPS distances (chimle.perceptual)."""
    dtype = devices.compute_dtype(config.train.precision, device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def step_losses(config: Config, generator: Generator, distance: Distance, batch: Round, index: torch.Tensor,
                losses: Callable[..., torch.Tensor] = level_losses) -> torch.Tensor:
    """The training step's forward on the examples `index` of a round with its codes set: `losses` (level_losses,
    or its compiled form) in the step's precision. Training and the benchmarks that time a step both call it."""
    with step_precision(config, index.device):
        return losses(generator, distance, tasks.get(config.task), [x[index] for x in batch.inputs],
                      [y[index] for y in batch.targets], [c[index] for c in batch.codes],
                      None if batch.weights is None else [w[index] for w in batch.weights])


def learning_rate_factor(t: TrainConfig, step: int, total: int) -> float:
    """The multiple of `train.lr` at optimisation step `step` (0-based) of `total`: a linear warm-up over
    `train.warmup` steps, times a constant (the paper), or a half cosine from 1 down to `train.lr_final` over the
    whole run (cosine) or over its last `train.decay_rounds` rounds (stable-decay)."""
    factor = min(1.0, (step + 1) / t.warmup) if t.warmup else 1.0
    if t.schedule != "constant":
        length = total if t.schedule == "cosine" else min(total, t.decay_rounds * t.steps_per_round)
        progress = min(1.0, max(0, step - (total - length)) / max(1, length - 1))
        factor *= t.lr_final + (1 - t.lr_final) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def set_learning_rate(optimizer: torch.optim.Optimizer, t: TrainConfig, step: int, total: int) -> None:
    """Set the rates of the two parameter groups (see `make_optimizer`) for step `step`. They come from the
    run's config at every step, so a diverged run continues at a lower rate set in its config.yaml."""
    factor = learning_rate_factor(t, step, total)
    for group, lr in zip(optimizer.param_groups, (t.lr, t.lr * t.mapping_lr_scale)):
        group["lr"] = lr * factor


ADAM = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def make_generator(config: Config, device: torch.device) -> Generator:
    """A new generator to train, initialised by train.init (under the caller's seed), in channels-last layout where
    train.channels_last: made so before its optimizer and weight average, whose tensors follow its layout."""
    generator = initialise(Generator(config.model), config.train.init).to(device)
    return generator.to(memory_format=torch.channels_last) if config.train.channels_last else generator


def make_distance(config: Config, final: bool = False) -> Distance:
    """The distance a model of `config` is searched and trained with: LPIPS (train.perceptual; with `final`,
    train.final_perceptual, the one of the run's last train.final_rounds rounds) plus train.pixel_weight x L1."""
    t = config.train
    return Distance(LPIPS(t.final_perceptual if final else t.perceptual), t.pixel_weight)


def make_optimizer(config: Config, generator: Generator, implementation: str = "fused") -> torch.optim.Adam:
    """Adam; the mapping networks learn at mapping_lr_scale x the rate (DESIGN.md §2.5).

    `implementation` is one of ADAM: the fused kernel (one pass over all parameters) takes a third of the
    for-loop's time at the paper's widths on a CPU (benchmarks/speed.py); devices without a fused Adam get the
    for-loop one. The three give the same updates up to float rounding."""
    t = config.train
    mapping = {id(p) for p in generator.mapping_parameters()}
    groups = [
        {"params": [p for p in generator.parameters() if id(p) not in mapping], "lr": t.lr},
        {"params": generator.mapping_parameters(), "lr": t.lr * t.mapping_lr_scale},
    ]
    if implementation == "fused" and next(generator.parameters()).device.type not in ("cpu", "cuda"):
        implementation = "for-loop"
    return torch.optim.Adam(groups, betas=(t.beta1, t.beta2), **ADAM[implementation])


def _search_state(result: SearchResult | None) -> dict | None:
    if result is None:
        return None
    return {"seeds": result.seeds, "winners": result.winners, "pool_sizes": list(result.pool_sizes),
            "distances": result.distances}


@dataclass
class Run:
    """What a training run works with."""

    config: Config
    files: RunFiles
    generator: Generator
    distance: Distance
    optimizer: torch.optim.Optimizer
    rounds: int
    world: World = World()  # this process among the run's processes
    average: WeightAverage | None = None  # the moving average of the weights (train.ema), or None
    on_save: Callable[[int, Path], None] | None = None  # called with (step, model file) after each model save
    adaptive: AdaptiveState | None = None  # adaptive IMLE's per-example codes and thresholds (search.adaptive)
    bar: tqdm | None = None
    bad_steps: int = 0  # consecutive non-finite losses
    losses: Callable[..., torch.Tensor] = level_losses  # the step's forward: level_losses, compiled where train.compile
    final_distance: Distance | None = None  # the distance of the last train.final_rounds rounds, if they differ

    @property
    def total_steps(self) -> int:
        return self.rounds * self.config.train.steps_per_round

    def distance_of(self, number: int) -> Distance:
        """The distance that searches and trains round `number` (0-based): train.final_perceptual's over the
        run's last train.final_rounds rounds, else train.perceptual's. It depends on the round alone, so a
        resumed run switches where an uninterrupted one does."""
        final = self.final_distance is not None and number >= self.rounds - self.config.train.final_rounds
        return self.final_distance if final else self.distance

    @property
    def sampler(self) -> Generator:
        """The generator that model files, grids and sampling use: the weight average if there is one."""
        return self.generator if self.average is None else self.average.module


def train(config: Config | None, out: str | Path, resume: bool = False, device: str | None = None,
          settings: dict | None = None, on_save: Callable[[int, Path], None] | None = None,
          init: str | Path | None = None) -> Path:
    """Train (or resume) the run in `out`; return the path of the final model file. A resumed run continues with
    its config.yaml, changed by `settings` (nested, e.g. {"train": {"rounds": 8}}) where given; `config` is then
    not needed. Under torchrun every process calls this (see chimle.distributed). `on_save(step, model file)` is
    called on the writing process after every model save (e.g. to keep snapshots for a learning curve, as
    benchmarks/quality.py does). `init` (a model file, run directory or `builtin:TASK` of the same task and
    model settings) gives a new run its starting weights; a run that has a training state continues from it
    and ignores `init`."""
    # Set up the processes and the run directory (rank 0 reads it and tells the others).
    world, device = distributed.init(device)
    files = RunFiles(out, writer=world.is_main)
    config, state = distributed.share_from_main(lambda: files.open(config, resume, settings))
    _check_world(config, world)
    start = _starting_weights(init, config, state, world)
    t = config.train
    for network in {t.perceptual, t.final_perceptual} - {""}:  # missing LPIPS weights: say so before writing
        weights_lib.resolve(f"lpips-{network}")
    compiling = [name for name, on in (("train.compile", t.compile), ("search.compile", config.search.compile)) if on]
    if compiling and device.type == "cpu" and not c_compiler():
        raise ConfigError(f"{' and '.join(f'{n}=true' for n in compiling)}: torch.compile needs a C++ compiler to "
                          "build its CPU kernels and none was found (looked for $CXX, g++, c++, clang++); install one "
                          f"(e.g. apt install g++) or set {' and '.join(f'{n}=false' for n in compiling)}")

    # Load data.
    dataset = training_set(config)
    folder = dataset.files[0].parent
    if state is None and not resume:  # only now: bad data leaves no half-made run behind
        files.create(config)

    # Construct networks, or restore them.
    torch.manual_seed(t.seed)
    generator = make_generator(config, device)
    distance = make_distance(config).to(device)
    run = Run(config, files, generator, distance, make_optimizer(config, generator),
              total_rounds(config, len(dataset)), world, WeightAverage(generator, t.ema) if t.ema else None,
              on_save if world.is_main else None,
              # Training shapes are fixed: compiled, one graph serves every step (and, cached on disk, a resumed run).
              losses=torch.compile(level_losses, dynamic=False) if t.compile else level_losses,
              final_distance=make_distance(config, final=True).to(device) if t.final_rounds else None)
    if config.search.adaptive:
        run.adaptive = AdaptiveState.empty(t.examples, config.search.samples_per_level)
    step, search = 0, None
    if state is not None:
        step, search = _restore(run, state)
        files.log(f"resumed at step {step} from {state['file']}")
    elif not resume:
        files.log(f"{len(dataset)} training images from {folder}; {run.rounds} rounds of {t.steps_per_round} steps"
                  + (f", the last {t.final_rounds} with LPIPS-{t.final_perceptual}" if t.final_rounds else "")
                  + (f"; the step's forward in bfloat16 (train.precision={t.precision})"
                     if devices.compute_dtype(t.precision, device) else ""))
    if start is not None:
        _start_from(run, start, init)

    # Rounds: search codes for the round's examples, then take its steps.
    run.bar = tqdm(total=run.total_steps, initial=step, unit="step", dynamic_ncols=True,
                   disable=None if world.is_main else True)
    while step < run.total_steps:
        batch = draw_round(config, dataset, step // t.steps_per_round, device)
        if search is None:
            search = _search(run, batch, step)
        step = _train_round(run, batch, search, step)
        search = None
    run.bar.close()

    # Done.
    files.save_model(run.sampler, config)
    files.log(f"done: {step} steps")
    distributed.cleanup()
    return files.model_file


def c_compiler() -> str | None:
    """The C++ compiler torch.compile would build CPU kernels with, or None."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next((path for path in map(shutil.which, names) if path), None)


def _check_world(config: Config, world: World) -> None:
    if config.train.round_size % world.size:
        raise ConfigError(f"train.round_size={config.train.round_size} must be a multiple of the number of "
                          f"processes ({world.size}): each searches the codes of an equal share of a round")


def _starting_weights(init: str | Path | None, config: Config, state: dict | None,
                      world: World) -> dict[str, torch.Tensor] | None:
    """The weights of `init` for a run without a training state (read by rank 0, checked against the run's task
    and model before anything is written); None if there is no `init` or the run's own state continues."""
    if init is None:
        return None
    if state is not None:
        if world.is_main:
            print(f"--init {init} is ignored: the run continues from its own state {Path(state['file']).name}")
        return None
    return distributed.share_from_main(lambda: checkpoint.initial_weights(builtin.locate(init), config, str(init)))


def _start_from(run: Run, weights: dict[str, torch.Tensor], source: str | Path) -> None:
    """Give the new run's generator (and its weight average) the starting weights, and save them as the state of
    step 0, so that a run killed before its first checkpoint resumes from them, with or without --init."""
    check_state(run.generator, weights, str(source))
    run.generator.load_state_dict(weights)
    if run.average is not None:
        run.average.load_state_dict(weights)
    run.files.log(f"started from the weights of {source}")
    run.files.save_state(_state(run, 0, None), 0, run.config.train.keep_checkpoints)


def _restore(run: Run, state: dict) -> tuple[int, SearchResult | None]:
    """Load a training state into the run; refuse one written for another task or model size."""
    source, t = state["file"], run.config.train
    check_fits(state, run.config, source)
    check_state(run.generator, state["generator"], source)
    run.generator.load_state_dict(state["generator"])
    if run.average is not None:
        run.average.load_state_dict(state["average"] if state.get("average") is not None else state["generator"])
    if run.adaptive is not None and state.get("adaptive") is not None:
        run.adaptive = AdaptiveState.from_state(state["adaptive"])
    try:
        run.optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(f"{source}: its optimizer state does not fit this model ({error})") from None
    _match_layouts(run.optimizer)
    saved_world = state.get("processes", 1)
    if saved_world != run.world.size:
        run.files.log(f"the run was saved by {saved_world} process(es) and continues on {run.world.size}: a step "
                      f"now takes {run.world.size} x {t.batch_size} examples")
    return state["step"], None if state["search"] is None else SearchResult(**state["search"])


def _match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each restored Adam moment its parameter's memory layout (a saved state loads in the default layout
    whatever the run's train.channels_last): fused Adam reads a parameter and its moments as flat memory, so a
    channels-last weight with default-layout moments would be updated with the wrong elements."""
    for parameter, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == parameter.shape:
                state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def _search(run: Run, batch: Round, step: int) -> SearchResult:
    """Search the round's codes, record how it went, and checkpoint so a resumed run need not search again."""
    t = run.config.train
    run.bar.set_description(f"round {batch.number + 1}/{run.rounds} search")
    started = time.perf_counter()
    search = search_round(run.config, run.generator, run.distance_of(batch.number), batch, run.world, run.adaptive)
    seconds = time.perf_counter() - started
    run.files.metrics({"event": "search", "round": batch.number, "step": step, "seconds": round(seconds, 3),
                       "examples_per_second": round(t.round_size / seconds, 3),
                       "distance_per_level": search.distances.mean(0).tolist(),
                       **({} if run.adaptive is None else
                          {"searched": int((run.adaptive.visits[batch.ids] == 0).sum())})})
    run.files.save_state(_state(run, step, search), step, t.keep_checkpoints)
    return search


def _train_round(run: Run, batch: Round, search: SearchResult, step: int) -> int:
    """The round's optimisation steps from `step` on, with logs, grids and checkpoints; returns the new step."""
    config, t, generator = run.config, run.config.train, run.generator
    sizes = generator.code_sizes(generator.start([x[:1] for x in batch.inputs]))
    batch.codes = codes_from(search, sizes, batch.inputs[0].device)
    if config.search.zero_codes:
        batch.codes = [torch.zeros_like(c) for c in batch.codes]
    run.bar.set_description(f"round {batch.number + 1}/{run.rounds} train")
    busy = 0.0  # seconds spent in steps since the last log line
    for in_round in range(step % t.steps_per_round, t.steps_per_round):
        started = time.perf_counter()
        losses = _step(run, batch, batch_indices(config, in_round, run.world).to(batch.inputs[0].device), step)
        busy += time.perf_counter() - started
        step += 1
        crash_point("step")
        run.bar.update(1)
        run.bar.set_postfix(loss=f"{losses.sum().item():.4f}")
        if step % t.log_every == 0 or step == run.total_steps:
            rate = t.log_every / max(busy, 1e-9)
            busy = 0.0
            run.files.metrics({"event": "train", "step": step, "round": batch.number, "loss": losses.sum().item(),
                               "loss_per_level": [round(v, 5) for v in losses.tolist()],
                               "steps_per_second": round(rate, 3)})
            run.files.log(f"step {step:7d}  round {batch.number}  loss {losses.sum().item():.4f}  "
                          f"levels {' '.join(f'{v:.3f}' for v in losses.tolist())}  {rate:.2f} steps/s")
        if step % t.grid_every == 0 or step == run.total_steps:
            run.files.grid(step, lambda path: write_grid(config, run.sampler, batch, path))
        finished = in_round + 1 == t.steps_per_round
        if step % t.checkpoint_every == 0 or finished:
            distributed.check_same(generator)  # rank 0's file stands for every rank's weights
            run.files.save_state(_state(run, step, None if finished else search), step, t.keep_checkpoints)
            run.files.save_model(run.sampler, config)
            if run.on_save is not None:
                run.on_save(step, run.files.model_file)
    return step


def _step(run: Run, batch: Round, index: torch.Tensor, step: int) -> torch.Tensor:
    """One Adam step on the examples `index` of the round, gradients averaged over the processes; a non-finite
    loss skips the step (and, repeated, stops training). Returns the per-level losses, averaged likewise."""
    run.generator.train()
    losses = step_losses(run.config, run.generator, run.distance_of(batch.number), batch, index, run.losses)
    run.optimizer.zero_grad(set_to_none=True)
    loss = losses.sum()
    if torch.isfinite(loss):
        loss.backward()
    losses = distributed.average_gradients(list(run.generator.parameters()), losses.detach())
    loss = losses.sum()
    if torch.isfinite(loss):
        set_learning_rate(run.optimizer, run.config.train, step, run.total_steps)
        run.optimizer.step()
        if run.average is not None:
            run.average.update(run.generator, step)
        run.bad_steps = 0
        return losses
    run.bad_steps += 1
    if run.world.is_main:
        warnings.warn(f"step {step}: non-finite loss ({loss.item()}); the step is skipped", stacklevel=1)
    if run.bad_steps >= MAX_BAD_STEPS:
        raise FloatingPointError(f"{MAX_BAD_STEPS} non-finite losses in a row at step {step}; training stopped. "
                                 f"Its last checkpoint is intact: lower train.lr in {run.files.dir / 'config.yaml'} "
                                 "and continue with --resume")
    return losses


def _state(run: Run, step: int, search: SearchResult | None) -> dict:
    """Everything a resumed run needs (see chimle.checkpoint.save_state)."""
    return {
        "config": run.config.to_yaml(),
        "step": step,
        "processes": run.world.size,
        "generator": {k: v.detach().cpu() for k, v in run.generator.state_dict().items()},
        "average": None if run.average is None else run.average.state_dict(),
        "adaptive": None if run.adaptive is None else run.adaptive.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "search": _search_state(search),
    }


@torch.no_grad()
def write_grid(config: Config, generator: Generator, batch: Round, path: Path, examples: int = 4,
               samples: int = 4) -> None:
    """A grid of the first examples of the round: input, the searched sample, random samples, target."""
    from chimle.sample import codes_from_sources, image_grid

    task = tasks.get(config.task)
    generator.eval()
    rows = []
    with folded(generator):
        for i in range(min(examples, config.train.round_size)):
            inputs = [x[i : i + 1] for x in batch.inputs]
            sizes = generator.code_sizes(generator.start(inputs))
            codes = [[c[i : i + 1] for c in batch.codes]]
            sources = [[(config.train.seed, k)] * len(sizes) for k in range(samples)]
            codes += [[c.to(inputs[0].device) for c in codes_from_sources(sizes, s)] for s in sources]
            outputs = [task.image(generator(inputs, c)[-1], inputs, config.model.levels - 1)[0] for c in codes]
            rows.append([task.show_input(batch.inputs[0][i], config), *outputs, batch.targets[-1][i]])
    image_grid(rows, path)
