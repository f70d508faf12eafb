"""Quality at a fixed CPU budget: which training recipe gives the best model for the CPU time it costs.

    python benchmarks/quality.py --quick                                   # smoke run: minutes
    python benchmarks/quality.py --task super-resolution --budget 4        # the ladder at a short budget, 3 seeds
    python benchmarks/quality.py --task colourization --budget 14 --configs small "+ 126 photos"  # the demo's budget
    python benchmarks/quality.py --budget 32 --configs small --snapshots 8 # a longer learning curve, 8 points
    python benchmarks/quality.py --rewrite benchmarks/results/quality.json # only redraw the report

Every configuration is a named list of overrides of the `small` preset (CONFIGS). It trains for a fixed amount
of CPU time on one thread (`--budget` CPU-minutes), so results hold on a loaded machine, and finishes its whole
schedule (warm-up, cosine, EMA) within it: its number of rounds is the budget divided by the CPU time of one of
its rounds. That is the reference configuration's round time, measured once per task (the least of three) and
kept in the work folder, times the configuration's cost relative to the reference: 1 where the settings that
decide the cost are the same (`cost_key`), else measured by timing both alternately in one process. So the
rounds of a configuration do not move with the load of the machine at the time it was calibrated. A configuration
whose last rounds switch to a dearer distance (train.final_rounds) pays for those at their own calibrated cost and
gets the rest of the budget at the cost of the others (rounds_within). (Adaptive IMLE searches fewer examples than
a round's calibration assumes: it gets the rounds of a plain search and uses less CPU time, which the report
shows.) Each (configuration, seed) runs in its own one-thread process, `--jobs` at a time; finished runs are kept
in `--work`, so a killed benchmark continues where it stopped and adding a configuration only trains the new one.
The report holds the configurations and seeds this command names (and with `--keep` an earlier report's), never
other results left in the work folder: a name's meaning can change with the preset (each result records the
settings it resolved to, `settings`).

Scoring (LPIPS-VGG throughout, 8 samples per input, seed 0), on two held-out sets never trained on:
    builtin   the demo's 12 tiles: four 128 px tiles from the centre of each built-in held-out photo
    photos    one centre 128 px tile of each held-out photo of the open photo set (chimle.photoset), if built
per set: best-of-8 and mean LPIPS to the ground truth as a ratio to the task's baseline (bicubic upsampling, the
grey image, the JPEG; ratio of the means over tiles, lower is better), LPIPS diversity (mean over pairs of
samples of one input), consistency with the input (chimle.tasks.Task.consistency), and KID, precision and recall
(k = 3) and coverage (k = 5) on Inception pool3 features (chimle.metrics; two samples per input against the
targets: with some 60 real images these say more about one configuration against another than in absolute terms). Snapshots of the model along the way give the learning curve (best-of-8
ratio on the builtin tiles against training CPU-minutes; `--snapshots` points per run), drawn in the chart and
listed in the report. Writes benchmarks/results/quality.{md,json,png}.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from chimle import devices, tasks, train as training  # noqa: E402
from chimle.config import ConfigError  # noqa: E402
from chimle.data import center_crop, list_images, load_image  # noqa: E402
from chimle.generator import Generator  # noqa: E402
from chimle.metrics import fid as fid_lib, manifold  # noqa: E402
from chimle.evaluate import score_input  # noqa: E402
from chimle.perceptual import LPIPS  # noqa: E402
from chimle.search import codes_from  # noqa: E402

TILE = 128  # held-out tile side, px (the demo's)
SAMPLES = 8  # samples per held-out input
KID_SAMPLES = 2  # samples per input whose Inception features enter KID
SNAPSHOTS = 4  # learning-curve points per run by default (evenly spaced rounds, the last one included)
WORK = Path(__file__).resolve().parents[1] / "runs" / "quality"

# LPIPS-AlexNet for search and loss throughout: `small` before decompression took up LPIPS-VGG for its last rounds.
ONE_DISTANCE = ["train.final_perceptual=", "train.final_rounds=0"]
# The recipe of `small` before this benchmark existed, pinned, so that "small (before)" stays what it was when the
# preset changes.
BEFORE = ["train.init=pytorch", "train.ema=0", "train.schedule=constant", "train.warmup=0", "train.lr=0.002",
          "train.batch_size=8", "train.pixel_weight=1.0", "train.perceptual=alex", "train.round_size=32",
          "train.steps_per_round=60", "search.samples_per_level=[20,20,10,5]", "search.reject_below=[]",
          "train.precision=float32", "model.predict_residual=false", "train.channels_last=false", *ONE_DISTANCE]
# `small` for super-resolution and colourization before they took up EMA 0.995 and lr 0.004 and super-resolution
# model.predict_residual (the rows named "small, ..." below ran so).
PLAIN = ["model.predict_residual=false", "train.ema=0", "train.lr=0.002"]
PHOTOS = "data.path=photoset:train"  # train on the open photo set's training split instead of the nine built in
REFERENCE = "small (before)"  # the configuration whose measured round time anchors every budget
# What a group of runs is compared with, in order of preference: the ladder's reference, else the preset as it stands
# (a task's runs at the demo's budget may start from the preset rather than the ladder).
REFERENCES = (REFERENCE, "small", "small, AlexNet throughout", "small, bf16 step", "small, float32 step")
CONFIGS: dict[str, list[str]] = {  # name -> overrides of the `small` preset
    "small (before)": BEFORE,
    "+ EMA 0.995": [*BEFORE, "train.ema=0.995"],
    "+ cosine lr": [*BEFORE, "train.schedule=cosine", "train.warmup=20"],
    "+ official init": [*BEFORE, "train.init=official"],
    "+ 126 photos": [*BEFORE, PHOTOS],
    "+ L1 0.2": [*BEFORE, "train.pixel_weight=0.2"],
    "+ batch 4": [*BEFORE, "train.batch_size=4"],
    "+ lr 0.004": [*BEFORE, "train.lr=0.004"],
    "+ crop 64": [*BEFORE, "data.crop=64"],
    "+ pools /2": [*BEFORE, "search.samples_per_level=[10,10,5,3]"],
    "+ 30 steps per round": [*BEFORE, "train.steps_per_round=30"],
    "+ pools x2": [*BEFORE, "search.samples_per_level=[40,40,20,10]"],
    "+ mapping lr x1": [*BEFORE, "train.mapping_lr_scale=1"],
    "+ lr 0.001": [*BEFORE, "train.lr=0.001"],
    "+ LPIPS-VGG loss": [*BEFORE, "train.perceptual=vgg"],
    # Thresholds near the lower quartile of the nearest candidates' distances per level after 4 CPU-minutes of
    # training (0.07-0.15, 0.10-0.16, 0.30-0.50, 0.50-0.61 from 10 % to 90 %), where each pool spans only ~0.02.
    "+ RS-IMLE": [*BEFORE, "search.reject_below=[0.08,0.12,0.31,0.52]"],
    "+ L1 2": [*BEFORE, "train.pixel_weight=2.0"],
    "+ wider fine levels": [*BEFORE, "model.channels=[32,32,16,16]", "model.growth=[16,16,8,8]"],
    "+ 1 block, wider": [*BEFORE, "model.blocks=1", "model.channels=[48,32,24,12]", "model.growth=[24,16,12,8]"],
    "+ 64 fixed examples": [*BEFORE, "train.examples=64"],
    "+ adaptive IMLE": [*BEFORE, "train.examples=64", "search.adaptive=true", "search.adaptive_min_visits=1",
                        "search.adaptive_max_visits=3"],
    "EMA + lr 0.004": [*BEFORE, "train.ema=0.999", "train.lr=0.004"],
    "EMA + 126 photos": [*BEFORE, "train.ema=0.999", PHOTOS],
    "EMA 0.995 + 126 photos": [*BEFORE, "train.ema=0.995", PHOTOS],
    "EMA 0.995 + lr 0.004": [*BEFORE, "train.ema=0.995", "train.lr=0.004"],
    "EMA 0.995 + LPIPS-VGG loss": [*BEFORE, "train.ema=0.995", "train.perceptual=vgg"],
    "EMA 0.995 + L1 0.5": [*BEFORE, "train.ema=0.995", "train.pixel_weight=0.5"],
    "EMA 0.995 + 126 photos + lr 0.004": [*BEFORE, "train.ema=0.995", PHOTOS, "train.lr=0.004"],
    "EMA 0.995 + 126 photos + LPIPS-VGG loss": [*BEFORE, "train.ema=0.995", PHOTOS, "train.perceptual=vgg"],
    # The built-in models' two stages within one run: LPIPS-AlexNet while the codes come into use, then the
    # paper's LPIPS-VGG for the last rounds (a VGG fine-tune kept the built-in decompression model's diversity).
    "EMA 0.995 + 126 photos + lr 0.004, VGG last 4": [*BEFORE, "train.ema=0.995", PHOTOS, "train.lr=0.004",
                                                      "train.final_perceptual=vgg", "train.final_rounds=4"],
    "EMA 0.995 + 126 photos + lr 0.004, VGG last 2": [*BEFORE, "train.ema=0.995", PHOTOS, "train.lr=0.004",
                                                      "train.final_perceptual=vgg", "train.final_rounds=2"],
    "EMA 0.995 + 126 photos + lr 0.004, VGG last 1": [*BEFORE, "train.ema=0.995", PHOTOS, "train.lr=0.004",
                                                      "train.final_perceptual=vgg", "train.final_rounds=1"],
    # Larger pools for a model that uses its codes more: with more candidates per example, the nearest one can
    # afford to be further from the mean, so the trained outputs spread (halving them narrowed super-resolution's).
    "EMA 0.995 + 126 photos + lr 0.004, VGG last 2, pools x2": [
        *BEFORE, "train.ema=0.995", PHOTOS, "train.lr=0.004", "train.final_perceptual=vgg", "train.final_rounds=2",
        "search.samples_per_level=[40,40,20,10]"],
    "EMA 0.995 + 126 photos + lr 0.004, VGG last 2, pools x4": [
        *BEFORE, "train.ema=0.995", PHOTOS, "train.lr=0.004", "train.final_perceptual=vgg", "train.final_rounds=2",
        "search.samples_per_level=[80,80,40,20]"],
    # The training step's forward in bfloat16 where the CPU has it natively (train.precision=auto; elsewhere this is
    # the configuration above): about 1.5x faster steps here, so more rounds in the same CPU time.
    "EMA 0.995 + 126 photos + lr 0.004, VGG last 2, pools x2, bf16 step": [
        *BEFORE, "train.ema=0.995", PHOTOS, "train.lr=0.004", "train.final_perceptual=vgg", "train.final_rounds=2",
        "search.samples_per_level=[40,40,20,10]", "train.precision=auto"],
    "EMA 0.995 + lr 0.004, VGG last 2, pools x2": [  # the same on the nine built-in photos, as `chimle demo` trains
        *BEFORE, "train.ema=0.995", "train.lr=0.004", "train.final_perceptual=vgg", "train.final_rounds=2",
        "search.samples_per_level=[40,40,20,10]"],
    "small": [],
    # The preset before it took up train.precision=auto (its earlier "small" rows ran so), and with it; both, like
    # the rows below them, as it was before super-resolution and colourization took up decompression's weight
    # average and rate and super-resolution the residual levels (PLAIN).
    "small, float32 step": [*PLAIN, "train.precision=float32"],
    "small, bf16 step": [*PLAIN, "train.precision=auto"],
    # The built-in models' second stage within the preset's run: LPIPS-VGG for its last 2 rounds.
    "small, VGG last 2": [*PLAIN, "train.final_perceptual=vgg", "train.final_rounds=2"],
    # Decompression's recipe in `small` (tasks.decompression.train) for the other tasks.
    "small, EMA 0.995 + lr 0.004": ["model.predict_residual=false", "train.ema=0.995", "train.lr=0.004"],
    # Each level corrects its input brought to size (bicubic x2 for super-resolution) instead of drawing the image
    "small, residual": ["model.predict_residual=true", "train.ema=0", "train.lr=0.002"],
    "small, residual + EMA 0.995 + lr 0.004": ["model.predict_residual=true", "train.ema=0.995", "train.lr=0.004"],
    # The preset with them, as it stood before decompression took up LPIPS-VGG for its last 2 rounds
    "small + residual levels": ["model.predict_residual=true", *ONE_DISTANCE],
    "small, residual + EMA 0.995 + lr 0.004 + L1 0.3": ["model.predict_residual=true", "train.ema=0.995",
                                                        "train.lr=0.004", "train.pixel_weight=0.3"],
    "small, residual + EMA 0.995 + lr 0.004, VGG last 2": ["model.predict_residual=true", "train.ema=0.995",
                                                           "train.lr=0.004", "train.final_perceptual=vgg",
                                                           "train.final_rounds=2"],
    # Changes to the preset as it stands (residual super-resolution levels):
    "small, RGB order kept": ["data.shuffle_channels=false"],  # residual levels take colour from the input anyway
    "small, wider fine levels": ["model.channels=[32,32,16,16]"],
    "small, rate decay over the last 5": ["train.schedule=stable-decay", "train.decay_rounds=5"],
    "small, pools x2": ["search.samples_per_level=[40,40,20,10]"],
    "small + VGG last 2": ["train.final_perceptual=vgg", "train.final_rounds=2"],
    "small, 126 photos": [PHOTOS],
    "small, 1.5x wider": ["model.channels=[48,48,24,12]", "model.growth=[24,24,12,12]"],
    "small, AlexNet throughout": [*ONE_DISTANCE],  # decompression's `small` before it took up "small + VGG last 2"
    # 60 steps of 8 over a round's 32 examples visit each 15 times: its loss falls within the round far below what
    # the next round's fresh examples start at. More examples per round, the same steps:
    "small, 128 examples per round": ["train.round_size=128"],
    "small, 128 examples per round, pools /2": ["train.round_size=128", "search.samples_per_level=[10,10,5,3]"],
    # The preset before it took up train.channels_last (faster steps, the same arithmetic up to rounding)
    "small, default layout": ["train.channels_last=false"],
    # The mapping networks (code -> style) learn at 0.01 x the rate (the paper's, from StyleGAN); a run of minutes
    # may need them to move faster to put its codes to use
    "small, mapping lr x10": ["train.mapping_lr_scale=0.1"],
}
MIN_PHOTOS = manifold.DENSITY_COVERAGE_K + 1  # coverage's k nearest neighbours need k + 1 real images per set
TARGETS = {"super-resolution": 0.90, "colourization": 0.90, "decompression": 0.85}  # best-of-8 / baseline (issue)
QUICK = dict(budget=0.4, seeds=[0], photos=MIN_PHOTOS, configs=["small (before)", "+ EMA 0.995", "+ crop 64"])


def tile_row(numbers: dict) -> dict:
    """The numbers of one tile this report keeps (chimle.evaluate.score_input's, under this report's names)."""
    return {"best": numbers["best_lpips"], "mean": numbers["mean_lpips"], "baseline": numbers["baseline_lpips"],
            "diversity": numbers["diversity"], "consistency": numbers["consistency"]}


# Held-out data -------------------------------------------------------------------------------------------


def heldout_sets(config, photos: int | None) -> dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]]:
    """{set name: [(tile name, model input, ground truth)]}: the demo's builtin tiles, and centre tiles of the
    open photo set's held-out photos (at most `photos` of them; None = all) when the set is available."""
    from chimle import demo
    from chimle.sample import Model

    task = tasks.get(config.task)
    model = Model(Generator(config.model), config)
    sets = {"builtin": demo.heldout(task, model, TILE)}
    if photos != 0 and task.derived:
        folder = photo_set("heldout")
        builtin = {p.stem for p in list_images(demo.builtin_photos("heldout"))}
        files = [p for p in list_images(folder) if p.stem not in builtin][:photos]
        targets = [(p.stem, center_crop(load_image(p), TILE)) for p in files]
        sets["photos"] = [(name, task.input_for(t[None], config)[0], t) for name, t in targets]
    return sets


def photo_set(split: str) -> Path:
    """The folder of a split of the open photo set (built on first use, see chimle.photoset)."""
    from chimle import photoset

    return photoset.folder(split, log=lambda line: None)


@torch.no_grad()
def score(model_file: Path, sets: dict, full: bool, lpips: LPIPS, inception=None, seed: int = 0) -> dict:
    """The numbers of one model on every held-out set, means over its tiles: best-of-8 and mean LPIPS, the
    baseline's LPIPS and the ratios to it (ratio of the means; none for layouts, which have no baseline), diversity,
    consistency with the input, and KID, precision, recall and coverage if `full`. The samples are drawn with
    sampling seed `seed`."""
    from chimle.sample import Model

    model = Model.load(model_file, device="cpu")
    out = {}
    for set_name, tiles in sets.items():
        rows, real, fake = [], [], []
        for name, given, target in tiles:
            scored = score_input(model, given, target, lpips, n=SAMPLES, seed=seed)
            rows.append(tile_row(scored.numbers))
            if full:
                real.append(inception(target[None]))
                fake.append(inception(scored.samples[:KID_SAMPLES]))
        mean = {k: (float(np.mean([r[k] for r in rows])) if rows[0][k] is not None else None) for k in rows[0]}
        ratios = {f"ratio_{k}": None if mean["baseline"] is None else mean[k] / mean["baseline"] for k in ("best", "mean")}
        summary = {**mean, **ratios, "tiles": len(rows)}
        if full:
            real, fake = np.concatenate(real), np.concatenate(fake)
            summary["kid"] = fid_lib.kid(real, fake, seed=0)[0]
            summary.update(manifold.prdc(real, fake))
        out[set_name] = summary
    return out


# Jobs: calibration, and one training run scored ----------------------------------------------------------


def job_config(task: str, name: str, extra: list[str] = ()):
    return common.config(task, [*CONFIGS[name], *extra])


def cost_key(config) -> str:
    """The settings that decide what a round costs: configurations with equal keys take the same CPU time."""
    m, d, s, t = config.model, config.data, config.search, config.train
    return json.dumps([dataclasses.asdict(m), d.crop, d.crop_width, s.samples_per_level, s.flat, s.flat_samples,
                       s.zero_codes, s.max_batch, t.batch_size, t.steps_per_round, t.round_size, t.perceptual,
                       t.pixel_weight > 0, t.final_perceptual, t.final_rounds, t.channels_last,
                       str(devices.compute_dtype(t.precision, torch.device("cpu")))])


def round_seconds(config, device: torch.device = torch.device("cpu")) -> float:
    """Seconds of one round of `config` (CPU time of this process on a CPU, wall time on a GPU): one code search
    and `steps_per_round` steps, at the least of a few timed steps after a warm-up one (the least disturbed by
    other work). scripts/train_builtin.py's `--minutes` turns it into rounds too."""
    t = config.train
    clock = Clock(device)
    dataset = training.training_set(config)
    torch.manual_seed(t.seed)
    generator = training.make_generator(config, device)
    distance = training.make_distance(config).to(device)
    optimizer = training.make_optimizer(config, generator)
    started = clock.now()
    batch = training.draw_round(config, dataset, 0, device)
    search = training.search_round(config, generator, distance, batch)
    search_seconds = clock.now() - started
    batch.codes = codes_from(search, generator.code_sizes(generator.start([x[:1] for x in batch.inputs])), device)
    generator.train()
    times = []
    for i in range(5):
        started = clock.now()
        losses = training.step_losses(config, generator, distance, batch,
                                      training.batch_indices(config, i).to(device))
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        optimizer.step()
        times.append(clock.now() - started)
    return search_seconds + t.steps_per_round * min(times[1:])


class Clock:
    """CPU time of this process on a CPU; wall time, after the GPU's queued work, on a GPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return time.perf_counter()
        return time.process_time()


def one_distance(config, final: bool = False):
    """`config` with one distance for the whole run: train.perceptual's, or with `final` the one of its last
    train.final_rounds rounds (the two parts of a run that switches cost differently)."""
    t = config.train
    train = dataclasses.replace(t, perceptual=t.final_perceptual if final else t.perceptual, final_perceptual="",
                                final_rounds=0)
    return dataclasses.replace(config, train=train)


def relative_cost(reference, config) -> dict:
    """The CPU time of a round of `config` as a ratio to one of `reference`: 1 where the cost key is the same;
    otherwise both are timed alternately in this process and the least of each taken, so that other work on the
    machine affects both alike."""
    if cost_key(config) == cost_key(reference):
        return {"ratio": 1.0, "same_cost_as": REFERENCE}
    times = {"reference": [], "config": []}
    for _ in range(2):
        times["reference"].append(round_seconds(reference))
        times["config"].append(round_seconds(config))
    return {"ratio": min(times["config"]) / min(times["reference"]), "times": times}


def calibrate(task: str, name: str) -> dict:
    """What a round of the configuration costs: the reference's (REFERENCE) CPU seconds per round, measured once
    per task and kept, times this configuration's cost relative to it (relative_cost). A configuration that
    switches its distance for its last rounds (train.final_rounds) gets the ratio of each part ("final": the
    last rounds')."""
    reference, config = job_config(task, REFERENCE), job_config(task, name)
    if name == REFERENCE:
        return {"round_seconds": min(round_seconds(reference) for _ in range(3)), "ratio": 1.0}
    cost = relative_cost(reference, one_distance(config))
    if config.train.final_rounds:
        cost["final"] = relative_cost(reference, one_distance(config, final=True))
    return cost


def rounds_within(budget_rounds: float, cost: dict, final_rounds: int, name: str) -> int:
    """The rounds of a configuration that fit the CPU time of `budget_rounds` rounds of the reference, given its
    calibration (`cost`): its train.final_rounds at their own cost, the rest at the cost of the others."""
    if not final_rounds:
        return max(2, round(budget_rounds / cost["ratio"]))
    before = round((budget_rounds - final_rounds * cost["final"]["ratio"]) / cost["ratio"])
    if before < 1:
        last = final_rounds * cost["final"]["ratio"]
        raise SystemExit(f"{name}: its last {final_rounds} rounds alone take {last:.1f} rounds of {REFERENCE}, more "
                         f"than the budget's {budget_rounds:.1f}: give it a larger --budget or fewer train.final_rounds")
    return before + final_rounds


def snapshot_steps(rounds: int, steps_per_round: int, points: int) -> list[int]:
    """The steps after which a run of `rounds` rounds keeps a snapshot: the ends of `points` evenly spaced rounds,
    the last round included (fewer where the run has fewer rounds)."""
    return sorted({math.ceil(rounds * (k + 1) / points) * steps_per_round for k in range(points)})


def train_and_score(task: str, name: str, seed: int, budget: float, rounds: int, out: Path, photos: int | None,
                    points: int = SNAPSHOTS) -> dict:
    """Train one configuration for `rounds` rounds, keeping `points` model snapshots, then score them."""
    steps_per_round = job_config(task, name).train.steps_per_round
    config = job_config(task, name, [f"train.seed={seed}", f"train.rounds={rounds}", "train.passes=1"])
    marks = snapshot_steps(rounds, steps_per_round, points)
    shutil.rmtree(out, ignore_errors=True)  # a run killed half-way starts again: its CPU time must be whole
    snapshots = []
    started = time.process_time()

    def keep(step: int, model_file: Path) -> None:
        if step in marks:
            cpu = time.process_time() - started
            path = out / "snapshots" / f"step-{step:07d}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(model_file, path)
            snapshots.append({"step": step, "cpu_seconds": cpu, "file": str(path)})

    training.train(config, out / "run", device="cpu", on_save=keep)
    train_cpu = time.process_time() - started
    scoring_started = time.process_time()
    sets = heldout_sets(config, photos)
    lpips = LPIPS("vgg")
    inception = fid_lib.InceptionFeatures(None, torch.device("cpu"), 16)
    for snap in snapshots[:-1]:
        snap["scores"] = score(Path(snap["file"]), {"builtin": sets["builtin"]}, False, lpips)
    snapshots[-1]["scores"] = score(Path(snapshots[-1]["file"]), sets, True, lpips, inception)
    cpu = common.cpu()
    return {"task": task, "config": name, "overrides": CONFIGS[name], "settings": dataclasses.asdict(config),
            "seed": seed, "budget_minutes": budget,
            "cpu_model": cpu["cpu_model"], "cpu_flags": cpu["cpu_flags"], "rounds": rounds,
            "steps": rounds * steps_per_round, "train_cpu_seconds": train_cpu,
            "score_cpu_seconds": time.process_time() - scoring_started,
            "final": snapshots[-1]["scores"], "curve": [{k: s[k] for k in ("step", "cpu_seconds", "scores")}
                                                        for s in snapshots]}


def job_main(spec_file: Path) -> None:
    """Run one job in this (one-thread) process and write its result next to the spec."""
    spec = json.loads(spec_file.read_text())
    torch.set_num_threads(1)
    if spec["kind"] == "calibrate":
        result = calibrate(spec["task"], spec["config"])
    else:
        result = train_and_score(spec["task"], spec["config"], spec["seed"], spec["budget"], spec["rounds"],
                                 Path(spec["out"]), spec["photos"], spec.get("snapshots", SNAPSHOTS))
    tmp = Path(spec["result"]).with_suffix(".tmp")
    tmp.write_text(json.dumps({**result, "spec": spec}, indent=1) + "\n")
    os.replace(tmp, spec["result"])


# Scheduling ----------------------------------------------------------------------------------------------


def finished(spec: dict) -> bool:
    """Whether the job's result exists and was written for this very spec (a result left by an earlier version
    of this benchmark, or for other settings, is done again rather than misread)."""
    try:
        return json.loads(Path(spec["result"]).read_text()).get("spec") == spec
    except (OSError, ValueError, AttributeError):
        return False


def _exit_on_sigterm(signum, frame):
    """SIGTERM as SystemExit, so that `finally` blocks run (Python's default for it ends the process at once)."""
    raise SystemExit(128 + signum)


def label(spec: dict) -> str:
    """A job as the progress lines name it: "train small seed 0", "calibrate small"."""
    return f"{spec['kind']} {spec['config']}" + (f" seed {spec['seed']}" if "seed" in spec else "")


def run_jobs(specs: list[dict], jobs: int) -> None:
    """Run the jobs without a finished result, `jobs` one-thread processes at a time."""
    pending = [s for s in specs if not finished(s)]
    running: list[tuple[dict, subprocess.Popen]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                spec = pending.pop(0)
                spec_file = Path(spec["result"]).with_suffix(".spec")
                spec_file.parent.mkdir(parents=True, exist_ok=True)
                spec_file.write_text(json.dumps(spec))
                log = open(spec_file.with_name(Path(spec["result"]).stem + ".log"), "w")
                running.append((spec, subprocess.Popen([sys.executable, __file__, "--job", str(spec_file)], env=env,
                                                       stdout=log, stderr=subprocess.STDOUT)))
                print(f"started {label(spec)}", flush=True)
            time.sleep(2)
            for item in list(running):
                spec, process = item
                if process.poll() is not None:
                    running.remove(item)
                    status = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode}, see its .log)"
                    print(f"{status}: {label(spec)}", flush=True)
    finally:
        # The driver stopping (Ctrl-C, kill, an error) stops its jobs too, rather than leaving one-thread
        # processes training on; a stopped job's result was never written, so the next run does it again.
        for _, process in running:
            process.terminate()
        for _, process in running:
            process.wait()
        signal.signal(signal.SIGTERM, previous)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in name).strip("_")


def run(task: str, budget: float, names: list[str], seeds: list[int], jobs: int, work: Path,
        photos: int | None, snapshots: int = SNAPSHOTS) -> list[dict]:
    """Calibrate, then train and score every (configuration, seed); returns the results."""
    # Absolute, so that a job's spec (which names its folders) is the same whether --work was given as a relative
    # or an absolute path: a finished run is recognised, not trained again.
    base = work.resolve() / slug(task)

    def calibration(name):
        return {"kind": "calibrate", "task": task, "config": name, "result": str(base / slug(name) / "calibration.json")}

    run_jobs([calibration(REFERENCE)], jobs)
    run_jobs([calibration(n) for n in names if n != REFERENCE], jobs)
    anchor = json.loads(Path(calibration(REFERENCE)["result"]).read_text())["round_seconds"]
    runs = []
    for seed in seeds:
        for n in names:
            cost = json.loads(Path(calibration(n)["result"]).read_text())
            rounds = rounds_within(budget * 60 / anchor, cost, job_config(task, n).train.final_rounds, n)
            folder = base / slug(n) / f"budget-{budget:g}" / f"seed-{seed}"
            spec = {"kind": "train", "task": task, "config": n, "seed": seed, "budget": budget, "rounds": rounds,
                    "photos": photos, "out": str(folder), "result": str(folder.with_suffix(".json"))}
            if snapshots != SNAPSHOTS:  # only then, so that runs finished before the option existed still count
                spec["snapshots"] = snapshots
            runs.append(spec)
    run_jobs(runs, jobs)
    return [json.loads(Path(s["result"]).read_text()) for s in runs if Path(s["result"]).exists()]


# Report --------------------------------------------------------------------------------------------------

COLUMNS = [("ratio_best", "best-of-8 / baseline"), ("ratio_mean", "mean / baseline"), ("diversity", "diversity"),
           ("kid", "KID"), ("precision", "precision"), ("recall", "recall"), ("coverage", "coverage"),
           ("consistency", "consistency")]


def summarise(results: list[dict]) -> dict:
    """{(task, budget): {config: {set: {metric: spread over seeds}}}} plus rounds and CPU time."""
    out: dict = {}
    for r in results:
        out.setdefault(f"{r['task']} @ {r['budget_minutes']:g} CPU-min", {}).setdefault(r["config"], []).append(r)
    table = {}
    for key, configs in out.items():
        table[key] = {}
        for name, rs in sorted(configs.items(), key=lambda item: order(item[0])):
            sets = {s: {m: common.spread([r["final"][s].get(m) for r in rs]) for m, _ in COLUMNS}
                    for s in rs[0]["final"]}
            table[key][name] = {"sets": sets, "seeds": sorted(r["seed"] for r in rs), "rounds": rs[0]["rounds"],
                                "cpu_models": sorted({r["cpu_model"] for r in rs if r.get("cpu_model")}),
                                "train_cpu_minutes": common.spread([r["train_cpu_seconds"] / 60 for r in rs]),
                                "overrides": rs[0]["overrides"], "curve": curve_means(rs),
                                "baseline_lpips": {s: rs[0]["final"][s]["baseline"] for s in rs[0]["final"]}}
    return table


def curve_means(rs: list[dict]) -> list[dict]:
    """One configuration's learning curve, means over its seeds at each snapshot they all have: the round, the
    training CPU-minutes and the best-of-8 ratio on the builtin tiles (no points where a run kept no curve)."""
    points = min(len(r.get("curve") or []) for r in rs)
    steps_per_round = rs[0]["steps"] // rs[0]["rounds"] if rs[0].get("steps") else None
    curve = []
    for i in range(points):
        snaps = [r["curve"][i] for r in rs]
        curve.append({"round": snaps[0]["step"] // steps_per_round if steps_per_round else None,
                      "cpu_minutes": float(np.mean([s["cpu_seconds"] / 60 for s in snaps])),
                      "ratio_best": float(np.mean([s["scores"]["builtin"]["ratio_best"] for s in snaps]))})
    return curve


def markdown(table: dict, run: dict) -> str:
    lines = ["# Quality at a fixed CPU budget", "", common.run_line(run), "",
             f"Machine: {run['machine'].get('cpu_model')}; flags {run['machine'].get('cpu_flags')}.", ""]
    if run.get("earlier"):
        lines += ["Results kept from earlier runs of this benchmark (`--keep`; a budget is CPU-minutes of the machine "
                  "a row ran on, and each table says which machines its rows ran on where they recorded it):", ""]
        lines += [f"- `{e['command']}` on {e['machine'].get('cpu_model')} ({e['machine'].get('torch_cpu_capability')})"
                  for e in run["earlier"]]
        lines.append("")
    lines += [
             "Ratios are LPIPS-VGG to the ground truth divided by the baseline's (bicubic / grey / JPEG), mean ± std over "
             "seeds; lower is better. Diversity: mean LPIPS-VGG between two samples of one input. KID: Inception "
             f"pool3, {KID_SAMPLES} samples per input against the targets; precision and recall (k = 3) and coverage (k = 5) "
             "on the same features. Consistency: see chimle.tasks.Task.consistency "
             "(super-resolution and decompression: PSNR in dB of the re-degraded sample against the input, higher is "
             "better; colourization: mean |ΔL|, lower is better).", ""]
    for key, configs in table.items():
        lines += [f"## {key}", ""]
        machines = sorted({m for row in configs.values() for m in row.get("cpu_models", [])})
        if machines:
            lines += [f"Rows that recorded their machine ran on: {', '.join(machines)}.", ""]
        ref = reference_of(configs)
        sets = list(next(iter(configs.values()))["sets"])
        for s in sets:
            base = next(iter(configs.values()))["baseline_lpips"][s]
            lines += [f"### held-out set `{s}` (baseline LPIPS {base:.4f})", "",
                      "| configuration | seeds | rounds | train CPU-min | " + " | ".join(label for _, label in COLUMNS)
                      + f" | best-of-8 vs {ref} |", "|---" * (5 + len(COLUMNS)) + "|"]
            reference = configs.get(ref, {}).get("sets", {}).get(s, {}).get("ratio_best")
            for name, row in configs.items():
                if s not in row["sets"]:
                    continue
                cells = [common.pm(row["sets"][s][m], 4 if m == "kid" else 3) for m, _ in COLUMNS]
                lines.append(f"| {name} | {len(row['seeds'])} | {row['rounds']} | "
                             f"{row['train_cpu_minutes']['mean']:.1f} | " + " | ".join(cells) + " | "
                             + verdict(row["sets"][s]["ratio_best"], reference, name == ref) + " |")
            lines.append("")
        curves = {name: row["curve"] for name, row in configs.items() if len(row.get("curve") or []) > 1}
        if curves:
            lines += ["Learning curves: best-of-8 / baseline on the `builtin` tiles, mean over seeds, at round (train "
                      "CPU-minutes):", ""]
            lines += [f"- **{name}**: " + ", ".join(f"{p['round']} ({p['cpu_minutes']:.1f}) {p['ratio_best']:.3f}"
                                                     for p in curve) for name, curve in curves.items()]
            lines.append("")
        lines += [f"What each configuration changes from {REFERENCE} (on the `small` preset):", ""]
        lines += [f"- **{name}**: " + (f"`{' '.join(own_overrides(row['overrides']))}`"
                                         if row["overrides"] else "the preset as it stands, no overrides")
                  for name, row in configs.items() if name != REFERENCE]
        lines += [f"- **{REFERENCE}**: `{' '.join(BEFORE)}`", ""]
    return "\n".join(lines)


def own_overrides(overrides: list[str]) -> list[str]:
    """A configuration's overrides without BEFORE's where it is built on BEFORE (rows recorded before BEFORE pinned
    train.precision lack that one), else all of them."""
    on_before = all(o in overrides for o in BEFORE if o != "train.precision=float32")
    return [o for o in overrides if not (on_before and o in BEFORE)]


def order(name: str) -> tuple[int, int]:
    """Where a configuration's row goes: the references first (see reference_of), then CONFIGS' order."""
    return (name not in REFERENCES, list(CONFIGS).index(name) if name in CONFIGS else len(CONFIGS))


def reference_of(configs: dict) -> str | None:
    """The configuration a group's others are compared with: the first of REFERENCES the group ran, else its first
    row (a follow-up run that left the references out compares its candidates with the configuration it led with)."""
    return next((name for name in REFERENCES if name in configs), next(iter(configs), None))


def verdict(stats: dict, reference: dict | None, is_reference: bool) -> str:
    """The difference of mean best-of-8 ratios from the reference, and whether it exceeds the spread between seeds:
    twice the standard error of the difference where both have several seeds, else the reference's min..max."""
    if is_reference or reference is None or stats["mean"] is None or reference["mean"] is None:
        return ""
    delta = stats["mean"] - reference["mean"]
    if stats["n"] > 1 and reference["n"] > 1:
        noise = 2 * math.sqrt(stats["std"] ** 2 / stats["n"] + reference["std"] ** 2 / reference["n"])
        clear = abs(delta) > noise
    elif reference["n"] > 1:
        clear = not reference["min"] <= stats["mean"] <= reference["max"]
    else:
        return f"{delta:+.3f} (one seed each)"
    word = ("better" if delta < 0 else "worse") if clear else "within the seed spread"
    return f"{delta:+.3f}, {word}"


def plot(results: list[dict], path: Path) -> None:
    """Learning curves: builtin best-of-8 ratio against training CPU-minutes, mean over seeds, per configuration."""
    panels = []
    groups: dict = {}
    for r in results:
        groups.setdefault(f"{r['task']} @ {r['budget_minutes']:g} CPU-min", {}).setdefault(r["config"], []).append(r)
    for key, configs in groups.items():
        series = []
        for name, rs in configs.items():
            curve = curve_means(rs)
            series.append((name, [p["cpu_minutes"] for p in curve], [p["ratio_best"] for p in curve]))
        panels.append(common.line_panel(f"{key}: best-of-8 LPIPS / baseline (builtin tiles)", series,
                                        "training CPU-minutes", size=(900, 520),
                                        guides={"baseline": 1.0, "target": TARGETS[key.split(" @ ")[0]]}))
    if panels:
        common.stack(panels, 1).save(path)


def main(argv: list[str] | None = None) -> None:
    parser = common.parser(__doc__, "a smoke run: two configurations, one seed, a 0.4 CPU-minute budget",
                           "only rewrite the Markdown report and chart from a JSON report of an earlier run")
    parser.add_argument("--task", default="super-resolution", choices=["super-resolution", "colourization",
                                                                       "decompression"])
    parser.add_argument("--budget", type=float, default=4.0, help="training CPU-minutes per run (default 4)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    parser.add_argument("--configs", nargs="+", default=None, help=f"configurations to run (default all): {list(CONFIGS)}")
    parser.add_argument("--jobs", type=int, default=2, help="one-thread processes at a time (default 2)")
    parser.add_argument("--photos", type=int, default=30, help="held-out photos of the open photo set to score on")
    parser.add_argument("--snapshots", type=int, default=SNAPSHOTS, help="learning-curve points per run, evenly "
                        f"spaced rounds, the last one included (default {SNAPSHOTS}); a change trains the run again")
    parser.add_argument("--keep", type=Path, metavar="JSON", help="keep the results of an earlier report (e.g. "
                        "benchmarks/results/quality.json) beside this run's (or --rewrite's), which replace any of "
                        "the same task, budget, configuration and seed")
    parser.add_argument("--job", type=Path, help=argparse_suppress())
    args = parser.parse_args(argv)
    if args.job:
        return job_main(args.job)
    work = args.work or WORK
    if args.rewrite:
        saved = common.read_run(args.rewrite)
        results, record = saved["results"], {k: saved[k] for k in (*common.RUN_KEYS, "earlier") if k in saved}
    else:
        names = args.configs or list(CONFIGS)
        unknown = [n for n in names if n not in CONFIGS]
        if unknown:
            parser.error(f"unknown configuration(s) {unknown}; known: {list(CONFIGS)}")
        budget, seeds, photos = args.budget, args.seeds, args.photos
        for name in names:
            try:
                job_config(args.task, name)
            except ConfigError as error:
                parser.error(f"configuration {name!r} does not apply to {args.task}: {error}")
        if args.snapshots < 1:
            parser.error(f"--snapshots {args.snapshots}: give 1 or more (the last round is always one)")
        if 0 < photos < MIN_PHOTOS:
            parser.error(f"--photos {photos}: give 0 (the built-in tiles only) or at least {MIN_PHOTOS} (coverage "
                         f"looks at {MIN_PHOTOS - 1} nearest neighbours among the real images)")
        if args.quick:
            budget, seeds, photos, names = QUICK["budget"], QUICK["seeds"], QUICK["photos"], QUICK["configs"]
            work = work / "quick"
        load_before, clock = common.load_average(), common.Stopwatch()
        results = run(args.task, budget, names, seeds, args.jobs, work, photos, args.snapshots)
        record = common.run_record(clock, load_before)
    if args.keep:
        results, earlier = keep(common.read_run(args.keep), results)
        record["earlier"] = [*record.get("earlier", []), *earlier]
    table = summarise(results)
    text = markdown(table, record)
    common.write("quality", text, {**record, "summary": table, "results": results}, args.out)
    plot(results, args.out / "quality.png")
    print(text)
    print(f"wrote {args.out / 'quality.md'}, {args.out / 'quality.json'} and {args.out / 'quality.png'}")


def keep(earlier: dict, results: list[dict]) -> tuple[list[dict], list[dict]]:
    """An earlier report's results with this run's added (replacing any of the same task, budget, configuration
    and seed), and the records of the runs they came from (the earlier report's own, then those it kept)."""
    def identity(r):
        return r["task"], r["budget_minutes"], r["config"], r["seed"]

    new = {identity(r) for r in results}
    kept = [r for r in earlier["results"] if identity(r) not in new]
    return kept + results, [{k: earlier[k] for k in common.RUN_KEYS}, *earlier.get("earlier", [])]


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
