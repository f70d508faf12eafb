"""Training: rounds of code search followed by optimisation steps with the chosen codes fixed (DESIGN.md §2.5).

    chimle train --task super-resolution --preset small --out runs/sr                    # CPU, built-in photos
    chimle train --task super-resolution --preset paper --data DIR --out runs/sr-paper  # one GPU
    chimle train ... --out runs/sr --resume                                             # continue a killed run

A round takes `round_size` training examples (random crops with a random flip/transpose), searches a code for
each (chimle.search), then runs `steps_per_round` Adam steps over those examples, cyclically, minimising the
sum over levels of LPIPS(output, target). The paper calls a round a "month" and its steps "days"; its schedule
is 400 examples, 10,000 steps at batch 1, 20 passes over the data.

Every example, candidate pool and batch is a function of (seed, its number), so a run resumed from any
checkpoint reaches the same weights as an uninterrupted one. The run directory holds:
    config.yaml        the resolved config
    model.safetensors  the latest weights with the config (for `chimle sample`)
    state-*.pt         resumable state (weights, optimizer, position, the round's search result)
    log.txt, metrics.jsonl, grids/step-*.png
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from chimle import tasks
from chimle.checkpoint import MODEL_FILE, CheckpointError, atomic_write, save_model
from chimle.config import Config, from_dict
from chimle.data import ImageFolder, builtin_photos, seeded
from chimle.generator import Generator
from chimle.perceptual import LPIPS, Distance
from chimle.search import SearchResult, codes_from, flat_search, hierarchical_search

STATE_FORMAT = "chimle-state/1"
MAX_BAD_STEPS = 5  # consecutive non-finite losses before training stops


@dataclass
class Round:
    """The examples of one round and their searched codes."""

    number: int
    inputs: list[torch.Tensor]  # input pyramid of all examples
    targets: list[torch.Tensor]  # target pyramid of all examples
    codes: list[torch.Tensor] | None = None  # regenerated from `search`, one (round_size, code size) per level


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def total_rounds(config: Config, dataset_size: int) -> int:
    """`train.rounds`, or enough rounds for `train.passes` passes over the data."""
    if config.train.rounds:
        return config.train.rounds
    return max(1, math.ceil(config.train.passes * dataset_size / config.train.round_size))


def draw_round(config: Config, dataset: ImageFolder, number: int, device: torch.device) -> Round:
    """The examples of round `number`: example numbers number*R .. number*R+R-1 of the run's sequence."""
    size = config.train.round_size
    images = torch.stack([dataset.example(config.train.seed, number * size + i).image for i in range(size)])
    inputs, targets = tasks.get(config.task).pair(images, config.model.levels)
    return Round(number, [x.to(device) for x in inputs], [y.to(device) for y in targets])


def search_round(config: Config, generator: Generator, distance: Distance, batch: Round) -> SearchResult:
    """Choose every example's code (hierarchical, or flat cIMLE if configured)."""
    seeds = torch.randint(0, 2**62, (config.train.round_size,), generator=seeded(config.train.seed, 3, batch.number))
    task, s = tasks.get(config.task), config.search
    generator.eval()
    if s.flat:
        size = s.flat_samples or sum(s.samples_per_level)
        return flat_search(generator, distance, task, batch.inputs, batch.targets, seeds, size, s.max_batch)
    return hierarchical_search(generator, distance, task, batch.inputs, batch.targets, seeds, s.samples_per_level,
                               s.max_batch)


def batch_indices(config: Config, step_in_round: int) -> torch.Tensor:
    """Examples of a step: the round's examples taken cyclically, batch_size at a time."""
    b, size = config.train.batch_size, config.train.round_size
    return torch.arange(step_in_round * b, step_in_round * b + b) % size


def level_losses(generator: Generator, distance: Distance, task: tasks.Task, inputs: list[torch.Tensor],
                 targets: list[torch.Tensor], codes: list[torch.Tensor]) -> torch.Tensor:
    """Distance of each level's output to its target, averaged over the batch: (levels,)."""
    raw = generator(inputs, codes)
    return torch.stack([distance(task.image(r, inputs, level), targets[level]).mean() for level, r in enumerate(raw)])


def make_optimizer(config: Config, generator: Generator) -> torch.optim.Adam:
    """Adam; the mapping networks learn at mapping_lr_scale x the rate (DESIGN.md §2.5)."""
    t = config.train
    mapping = {id(p) for p in generator.mapping_parameters()}
    groups = [
        {"params": [p for p in generator.parameters() if id(p) not in mapping], "lr": t.lr},
        {"params": generator.mapping_parameters(), "lr": t.lr * t.mapping_lr_scale},
    ]
    return torch.optim.Adam(groups, betas=(t.beta1, t.beta2))


class RunFiles:
    """The run directory: config, model, resumable states, logs."""

    def __init__(self, out: str | Path):
        self.dir = Path(out)
        self.grids = self.dir / "grids"

    def states(self) -> list[Path]:
        return sorted(self.dir.glob("state-*.pt"))

    def save_state(self, state: dict, step: int, keep: int) -> None:
        path = self.dir / f"state-{step:09d}.pt"
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        for old in self.states()[:-keep]:
            if old != path:
                old.unlink(missing_ok=True)

    def latest_state(self) -> dict | None:
        """The newest state that loads; a corrupted newest one is reported and the one before it used."""
        for path in reversed(self.states()):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # noqa: BLE001 - any failure to load means this file is unusable
                warnings.warn(f"{path} is unreadable ({error.__class__.__name__}); trying an older state", stacklevel=2)
                continue
            if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
                raise CheckpointError(f"{path} is not a chimle training state")
            return state
        return None

    def log(self, line: str) -> None:
        with open(self.dir / "log.txt", "a") as f:
            f.write(line + "\n")

    def metrics(self, record: dict) -> None:
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def _search_state(result: SearchResult | None) -> dict | None:
    if result is None:
        return None
    return {"seeds": result.seeds, "winners": result.winners, "pool_sizes": list(result.pool_sizes),
            "distances": result.distances}


def _prepare_run(config: Config, files: RunFiles, resume: bool) -> tuple[Config, dict | None]:
    """Check that a new run does not overwrite another, or reopen a run to resume it (its saved config wins
    over the command line)."""
    saved = files.dir / "config.yaml"
    if resume:
        if not saved.is_file():
            raise CheckpointError(f"nothing to resume in {files.dir}: it has no config.yaml")
        run_config = from_dict(yaml.safe_load(saved.read_text()))
        if run_config != config:
            print(f"resuming with the run's own settings from {saved} (command-line settings are ignored)")
        return run_config, files.latest_state()
    if saved.exists() or files.states():
        raise CheckpointError(f"{files.dir} already holds a run; give --resume to continue it or choose another --out")
    return config, None


@dataclass
class Run:
    """What a training run works with."""

    config: Config
    files: RunFiles
    generator: Generator
    distance: Distance
    optimizer: torch.optim.Optimizer
    rounds: int
    bar: tqdm | None = None
    bad_steps: int = 0  # consecutive non-finite losses

    @property
    def total_steps(self) -> int:
        return self.rounds * self.config.train.steps_per_round


def train(config: Config, out: str | Path, resume: bool = False, device: str | None = None) -> Path:
    """Train (or resume) the run in `out`; return the path of the final model file."""
    # Set up the run directory.
    files = RunFiles(out)
    config, state = _prepare_run(config, files, resume)
    device = pick_device(device)
    t = config.train

    # Load data.
    folder = config.data.path or builtin_photos("train")
    dataset = ImageFolder(folder, config.data.crop, skip_bad=config.data.skip_bad,
                          shuffle_channels=config.data.shuffle_channels)
    if state is None and not resume:  # only now, so that bad data leaves no half-made run behind
        files.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(files.dir / "config.yaml", lambda tmp: tmp.write_text(config.to_yaml()))

    # Construct networks, or restore them.
    torch.manual_seed(t.seed)
    generator = Generator(config.model).to(device)
    distance = Distance(LPIPS(t.perceptual), t.pixel_weight).to(device)
    run = Run(config, files, generator, distance, make_optimizer(config, generator),
              total_rounds(config, len(dataset)))
    step, search = 0, None
    if state is not None:
        generator.load_state_dict(state["generator"])
        run.optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        search = None if state["search"] is None else SearchResult(**state["search"])
        files.log(f"resumed at step {step}")
    elif not resume:
        files.log(f"{len(dataset)} training images from {folder}; {run.rounds} rounds of {t.steps_per_round} steps")

    # Rounds: search codes for the round's examples, then take its steps.
    run.bar = tqdm(total=run.total_steps, initial=step, unit="step", dynamic_ncols=True, disable=None)
    while step < run.total_steps:
        batch = draw_round(config, dataset, step // t.steps_per_round, device)
        if search is None:
            search = _search(run, batch, step)
        step = _train_round(run, batch, search, step)
        search = None
    run.bar.close()

    # Done.
    save_model(files.dir / MODEL_FILE, generator, config)
    files.log(f"done: {step} steps")
    return files.dir / MODEL_FILE


def _search(run: Run, batch: Round, step: int) -> SearchResult:
    """Search the round's codes, record how it went, and checkpoint so a resumed run need not search again."""
    t = run.config.train
    run.bar.set_description(f"round {batch.number + 1}/{run.rounds} search")
    started = time.perf_counter()
    search = search_round(run.config, run.generator, run.distance, batch)
    seconds = time.perf_counter() - started
    run.files.metrics({"event": "search", "round": batch.number, "step": step, "seconds": round(seconds, 3),
                       "examples_per_second": round(t.round_size / seconds, 3),
                       "distance_per_level": search.distances.mean(0).tolist()})
    run.files.save_state(_state(run, step, search), step, t.keep_checkpoints)
    return search


def _train_round(run: Run, batch: Round, search: SearchResult, step: int) -> int:
    """The round's optimisation steps from `step` on, with logs, grids and checkpoints; returns the new step."""
    config, t, generator = run.config, run.config.train, run.generator
    sizes = generator.code_sizes(generator.start([x[:1] for x in batch.inputs]))
    batch.codes = codes_from(search, sizes, batch.inputs[0].device)
    run.bar.set_description(f"round {batch.number + 1}/{run.rounds} train")
    busy = 0.0  # seconds spent in steps since the last log line
    for in_round in range(step % t.steps_per_round, t.steps_per_round):
        started = time.perf_counter()
        losses = _step(run, batch, batch_indices(config, in_round).to(batch.inputs[0].device), step)
        busy += time.perf_counter() - started
        step += 1
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
            write_grid(config, generator, batch, run.files.grids / f"step-{step:09d}.png")
        finished = in_round + 1 == t.steps_per_round
        if step % t.checkpoint_every == 0 or finished:
            run.files.save_state(_state(run, step, None if finished else search), step, t.keep_checkpoints)
            save_model(run.files.dir / MODEL_FILE, generator, config)
    return step


def _step(run: Run, batch: Round, index: torch.Tensor, step: int) -> torch.Tensor:
    """One Adam step on the examples `index` of the round; a non-finite loss skips the step (and, repeated,
    stops training). Returns the per-level losses."""
    run.generator.train()
    losses = level_losses(run.generator, run.distance, tasks.get(run.config.task), [x[index] for x in batch.inputs],
                          [y[index] for y in batch.targets], [c[index] for c in batch.codes])
    loss = losses.sum()
    run.optimizer.zero_grad(set_to_none=True)
    if torch.isfinite(loss):
        loss.backward()
        run.optimizer.step()
        run.bad_steps = 0
        return losses.detach()
    run.bad_steps += 1
    warnings.warn(f"step {step}: non-finite loss ({loss.item()}); the step is skipped", stacklevel=1)
    if run.bad_steps >= MAX_BAD_STEPS:
        raise FloatingPointError(f"{MAX_BAD_STEPS} non-finite losses in a row at step {step}; lower train.lr and "
                                 "resume from the last checkpoint")
    return losses.detach()


def _state(run: Run, step: int, search: SearchResult | None) -> dict:
    """Everything a resumed run needs (loads with torch.load(weights_only=True))."""
    return {
        "format": STATE_FORMAT,
        "config": run.config.to_yaml(),
        "step": step,
        "generator": {k: v.detach().cpu() for k, v in run.generator.state_dict().items()},
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
    with generator.folded():
        for i in range(min(examples, config.train.round_size)):
            inputs = [x[i : i + 1] for x in batch.inputs]
            sizes = generator.code_sizes(generator.start(inputs))
            codes = [[c[i : i + 1] for c in batch.codes]]
            sources = [[(config.train.seed, k)] * len(sizes) for k in range(samples)]
            codes += [[c.to(inputs[0].device) for c in codes_from_sources(sizes, s)] for s in sources]
            outputs = [task.image(generator(inputs, c)[-1], inputs, config.model.levels - 1)[0] for c in codes]
            rows.append([batch.inputs[0][i][:3], *outputs, batch.targets[-1][i]])
    image_grid(rows, path)
