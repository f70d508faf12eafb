"""Speed of the code search, the training step and sampling at the paper's widths, against a naive reference mode
that does the official implementation's work (chimle.naive), with the speed levers measured one by one.

    python benchmarks/speed.py --quick                 # a rehearsal: 1 RRDB per level instead of 6, pools 40/40/20/10
    python benchmarks/speed.py                         # the full report (about 1.5 h on an idle 2-core CPU)
    python benchmarks/speed.py --examples 4 --naive-examples 1 --bf16-examples 12 --tasks super-resolution \
        --skip memory --no-compile --bf16-models builtin:super-resolution,runs/paper-sr-150-steps --bf16-rescores 0,2
                                                       # the committed report, after training runs/paper-sr-150-steps:
    chimle train --task super-resolution --preset paper --out runs/paper-sr-150-steps -o data.crop=128 \
        -o train.round_size=16 -o train.steps_per_round=50 -o train.rounds=3 \
        -o "search.samples_per_level=[50,50,20,10]"   # 16-37 min, 2 cores
    python benchmarks/speed.py --device cuda           # one GPU
    python benchmarks/speed.py --tasks super-resolution --examples 4 --naive-examples 1 --no-compile \
        --skip memory,levers,bf16,train,sample --out benchmarks/results/cpu-avx2
                                                       # the report of a CPU without native bf16 (20 min)
    python benchmarks/speed.py --tasks super-resolution --skip levers,bf16 --resume   # finish an interrupted run
    python benchmarks/speed.py --examples 4 --naive-examples 1 --tasks super-resolution --no-compile \
        --skip memory,levers,bf16,train,sample --keep benchmarks/results/speed.json
                                                       # measure the search again, keep the other phases' numbers

Model: the `paper` preset (210.6 M parameters, 6 RRDBs per level, LPIPS-VGG) at scaled resolutions:
super-resolution 8 -> 128 px (levels render 16, 32, 64, 128 px) and the generic wiring (the decompression task)
at 64 px (levels render 8 ... 64 px); pools (200, 200, 20, 10). Weights as initialised (speed does not depend on
their values), inputs cropped from the built-in photos.

Each measurement runs in a child process of its own, so that its peak resident memory (the child's getrusage
ru_maxrss: Python, PyTorch, the model, LPIPS and the measurement) is its own. Phases:
    search   naive vs ours on 1 and --examples examples; a ladder adding one lever at a time on 1 example;
             where the time goes (torch.profiler over the record_function stages of the search, top operators, in a
             second run of the same search: every search is timed without the profiler);
             ours through torch.compile (search.compile=true) on --examples examples, after compiling every level
             on another example: whether it pays over a 400-example round
    roofline the GMAC/s of one plain 3x3 convolution of the shape that costs the search most, at its batch:
             the ladder reads its GMAC/s against it; and the per-shape roofline: every convolution shape of the
             search alone at its level's batch, summed into the seconds per example the convolutions alone take
    memory   the search's peak memory where it is largest (a full group of examples), without the profiler
    levers   one render of 16 candidates at the second level + LPIPS, each inference lever alone: weight-norm
             folding, channels-last, inference mode, torch.compile, bfloat16 autocast
    bf16     whether a bfloat16-autocast search chooses the float32 codes, on trained models (--bf16-models: the
             built-in one, a paper-width one trained for some steps) with the distance each was trained with, for
             each rescoring width (--bf16-rescores); and a bf16 training step and its effect on the loss (on
             devices without bf16 arithmetic, the step and the `initialised` model at 1/8 of the widths: bf16 is
             10-40x slower there)
    train    one float32 training step at batch 1: naive (anomaly detection on), then each training lever
    layout   the training step at `small`'s widths and batch (its preset as it stands), with the generator in the
             default layout and in channels-last (train.channels_last), steps of the two interleaved in one
             process; each task's crop of `small`, in its step's precision (train.precision=auto) and in float32
    sample   images per second: naive, fixed weights, chimle.sample as shipped; batch 1 and batched
With one torch thread on a CPU (--threads 1) every time is the process's CPU time, which other work on a shared
machine cannot inflate; otherwise wall time. Writes OUT/speed.json and OUT/speed.md (OUT: benchmarks/results).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import timing  # noqa: E402

from chimle import builtin, tasks  # noqa: E402
from chimle.blocks import WNConv2d, folded  # noqa: E402
from chimle.checkpoint import CheckpointError, load_model, model_path  # noqa: E402
from chimle.devices import compute_dtype, native_bf16  # noqa: E402
from chimle.config import Config, SearchConfig, resolve  # noqa: E402
from chimle.generator import Generator, count_parameters  # noqa: E402
from chimle.naive import naive_search, naive_step  # noqa: E402
from chimle.search import channels_last, fixed_weights, hierarchical_search, level_batch  # noqa: E402
from chimle.train import Round, level_losses, make_distance, make_generator, make_optimizer, step_losses  # noqa: E402

TASKS = {"super-resolution": 128, "decompression": 64}  # task -> crop (target side), px
PHASES = ("search", "roofline", "memory", "levers", "bf16", "train", "layout", "sample")
LAYOUT_TASKS = ("super-resolution", "decompression", "colourization")  # the layout phase's
NARROW = ["model.channels=[16,8,8,8]", "model.growth=[32,24,16,8]"]  # 1/8 of the paper's widths (bf16 on CPU)


# Setup shared by the phases ------------------------------------------------------------------------------------


OVERRIDES: list[str] = []  # --override values, set in each child from its spec


def make_config(task: str, quick: bool, extra: list[str] = ()) -> Config:
    return resolve(task=task, preset="paper", overrides=[f"data.crop={TASKS[task]}", *(["model.blocks=1"] if quick else []),
                                                          *extra, *OVERRIDES])


def search_macs(macs: list[int], pools: list[int], mode: str, mini_batch: int = 20) -> float:
    """Generator GMAC per example. Every candidate renders its level; besides, the naive search re-renders the
    lower levels for every copy in each mini-batch, its prefix-caching variants once per level, ours renders
    each winner once as the next level's prefix, none after the last level (in bfloat16, the candidates in bf16,
    then their `RESCORE` nearest again in float32)."""
    total = 0
    for level, m in enumerate(pools):
        total += m * macs[level]
        if mode == NAIVE:
            total += -(-m // mini_batch) * min(m, mini_batch) * sum(macs[:level])
        elif mode in (PREFIX, FOLDED):
            total += sum(macs[:level])
        else:
            total += ((RESCORE if mode == BF16 else 0) + (level + 1 < len(pools))) * macs[level]
    return total / 1e9


# Phase: search -------------------------------------------------------------------------------------------------

RESCORE = SearchConfig().rescore  # the default
NAIVE, PREFIX, FOLDED, BATCHED, OURS, BF16, COMPILED = (
    "naive", "+ prefix caching", "+ weight-norm folding", "+ batching, inference mode", "ours (+ channels-last)",
    f"+ bfloat16, {RESCORE} rescored (search.precision=auto)", "+ torch.compile (search.compile=true)")
SEARCHES = {  # name -> how it searches; the ladder adds one lever at a time
    NAIVE: lambda g, d, t, x, y, s, p, b: naive_search(g, d, t, x, y, s, p),
    PREFIX: lambda g, d, t, x, y, s, p, b: naive_search(g, d, t, x, y, s, p, reuse_prefix=True),
    FOLDED: lambda g, d, t, x, y, s, p, b: _folded_naive(g, d, t, x, y, s, p),
    BATCHED: lambda g, d, t, x, y, s, p, b: hierarchical_search(g, d, t, x, y, s, p, b, layout=False),
    OURS: lambda g, d, t, x, y, s, p, b: hierarchical_search(g, d, t, x, y, s, p, b),
    BF16: lambda g, d, t, x, y, s, p, b: hierarchical_search(g, d, t, x, y, s, p, b, torch.bfloat16, rescore=RESCORE),
    COMPILED: lambda g, d, t, x, y, s, p, b: hierarchical_search(g, d, t, x, y, s, p, b, compile=True),
}


def _folded_naive(g, d, t, x, y, s, p):
    with folded(g):
        return naive_search(g, d, t, x, y, s, p, reuse_prefix=True)


def phase_search(spec: dict, device: torch.device) -> dict:
    config = make_config(spec["task"], spec["quick"])
    generator, lpips, task = timing.build(config, device)
    inputs, targets = timing.examples(config, spec["examples"], device)
    seeds = torch.arange(1000, 1000 + spec["examples"])
    pools = spec["pools"]
    macs = timing.level_macs(generator, inputs)
    compile_seconds = None
    if spec["mode"] == COMPILED:  # compile every level first, on another example: a round compiles once
        started = time.perf_counter()  # wall time: the compiler works in worker processes too
        SEARCHES[COMPILED](generator, lpips, task, [x[:1] for x in inputs], [y[:1] for y in targets],
                           torch.tensor([999]), pools, config.search.max_batch)
        compile_seconds = time.perf_counter() - started
    before = timing.rss_gib()

    def search():
        timing.sync(device)
        started, cpu = time.perf_counter(), time.process_time()
        result = SEARCHES[spec["mode"]](generator, lpips, task, inputs, targets, seeds, pools, config.search.max_batch)
        timing.sync(device)
        return result, time.perf_counter() - started, time.process_time() - cpu

    result, seconds, cpu = search()  # timed without the profiler: it slows some searches more than others
    peak = timing.peak_rss_gib()
    profiled = {}
    if spec.get("profile"):  # where the time goes: the same search again, under the profiler
        with torch.profiler.profile(activities=timing.activities(device)) as prof:
            again, wall, _ = search()
        assert torch.equal(again.winners, result.winners)
        events = prof.key_averages()
        ops = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)[:8]
        profiled = {"profiled_seconds": wall, "operators": {e.key: e.self_cpu_time_total / 1e6 for e in ops},
                    "stages": {e.key.removeprefix("search."): e.cpu_time_total / 1e6 for e in events
                               if e.key.startswith("search.")}}
    wall = seconds
    if timing.clock(device) is time.process_time:
        seconds = cpu
    return {"seconds": seconds, "seconds_per_example": seconds / spec["examples"], "cpu_seconds": cpu,
            "wall_seconds_search": wall, **profiled,
            "generator_gmac_per_example": search_macs(macs, pools, spec["mode"]), "level_gmac": [m / 1e9 for m in macs],
            "rss_before_gib": before, "peak_rss_gib": peak, **timing.gpu_memory(device),
            "winners": result.winners.tolist(), "distances": result.distances.tolist(),
            **({"compile_and_first_example_seconds": compile_seconds} if compile_seconds is not None else {})}


# Phase: the float32 roofline of the search ------------------------------------------------------------------


def phase_roofline(spec: dict, device: torch.device) -> dict:
    """The float32 ceiling of the search's generator work, two ways (channels-last, inference mode, each
    convolution alone and repeated, best of its repeats):
    top        GMAC/s of one plain 3x3 convolution of the shape that costs the search the most (its MACs weighted
               by the pool of its level), at the batch the search renders that level in: about the most this
               device does for the search's work, against which its measured GMAC/s are read
    per shape  every convolution shape of the search alone at its level's batch (`level_batch`): the seconds per
               example if each of the search's convolutions ran as fast as it does alone, with nothing else
               (no concatenation, norm, activation, LPIPS); its GMAC/s are what the search's own shapes allow"""
    config = make_config(spec["task"], spec["quick"])
    generator, _, _ = timing.build(config, device)
    inputs, targets = timing.examples(config, 1, device)
    pools = spec["pools"]
    costs = timing.conv_costs(generator, inputs)
    del generator
    weighted = {key: macs * pools[key[0]] for key, macs in costs.items()}
    top = max(weighted, key=weighted.get)

    def measure(key: tuple[int, int, int, int, int], macs: int) -> dict:
        level, cin, cout, h, w = key
        batch = min(pools[level], level_batch(config.search.max_batch, targets[level]))
        conv = torch.nn.Conv2d(cin, cout, 3, padding=1).to(device).to(memory_format=torch.channels_last)
        x = torch.randn(batch, cin, h, w, device=device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            seconds, _ = timing.best_of(lambda: conv(x), spec["reps"], device)
        return {"level": level, "shape": [cin, cout, h, w], "batch": batch, "gmac_per_example": macs / 1e9,
                "gmac_per_second": batch * cout * cin * 9 * h * w / 1e9 / seconds}

    shapes = {key: measure(key, macs) for key, macs in sorted(weighted.items())}
    return {**shapes[top], "share_of_search_macs": weighted[top] / sum(weighted.values()),
            "native_bf16": native_bf16(device), "per_shape": list(shapes.values()),
            "peak_rss_gib": timing.peak_rss_gib()}


# Phase: peak memory of the search ------------------------------------------------------------------------------


def phase_memory(spec: dict, device: torch.device) -> dict:
    """Peak memory of the search where it is largest: a full group of examples (max_batch // smallest pool),
    whose last level fills a batch of about max_batch renders at the largest size. The group's pools are all
    the smallest of the paper's (10): the same groups and last-level batches, without the long first levels."""
    config = make_config(spec["task"], spec["quick"])
    generator, lpips, task = timing.build(config, device)
    pools = [min(spec["pools"])] * config.model.levels
    group = config.search.max_batch // pools[0]
    inputs, targets = timing.examples(config, group, device)
    before = timing.rss_gib()
    hierarchical_search(generator, lpips, task, inputs, targets, torch.arange(group), pools, config.search.max_batch)
    return {"examples": group, "memory_pools": pools, "max_batch": config.search.max_batch, "rss_before_gib": before,
            "peak_rss_gib": timing.peak_rss_gib(), **timing.gpu_memory(device)}


# Phase: levers on one render -----------------------------------------------------------------------------------


def phase_levers(spec: dict, device: torch.device) -> dict:
    """Level-1 render of `batch` candidates + their LPIPS features, each lever alone against the plain render."""
    config = make_config("super-resolution", spec["quick"])
    generator, lpips, task = timing.build(config, device)
    inputs, _ = timing.examples(config, 1, device)
    level, batch = 1, spec["batch"]
    with torch.no_grad():
        sizes = generator.code_sizes(generator.start(inputs))
        _, prefix = generator.render_level(generator.start(inputs), torch.randn(1, sizes[0], device=device))
    codes = torch.randn(batch, sizes[level], generator=torch.Generator().manual_seed(0)).to(device)

    def render(prefix, codes):
        raw, _ = generator.render_level(prefix.repeat(codes.shape[0]), codes)
        return lpips.features(task.image(raw, inputs, level))[-1]

    def timed(fn, reps: int) -> float:
        """Milliseconds per candidate, best of `reps` after a warm-up."""
        seconds, out = timing.best_of(fn, reps, device)
        return seconds / out.shape[0] * 1000

    reps = spec["reps"]
    rows = {}
    with torch.no_grad():
        rows["plain (weight norm every forward, NCHW, no_grad)"] = timed(lambda: render(prefix, codes), reps)
        with folded(generator):
            rows["weight-norm folding alone"] = timed(lambda: render(prefix, codes), reps)
        with channels_last(generator):
            rows["channels-last alone"] = timed(lambda: render(prefix, codes), reps)
    with torch.inference_mode():
        rows["inference mode alone"] = timed(lambda: render(prefix, codes), reps)
    with fixed_weights(generator, device):
        rows["all three (chimle.search.fixed_weights)"] = timed(lambda: render(prefix, codes), reps)
        if spec["compile"]:
            compiled = torch.compile(render)
            started = time.perf_counter()  # wall time: the compiler works in worker processes too
            compiled(prefix, codes)
            compile_seconds = time.perf_counter() - started
            rows["all three + torch.compile"] = timed(lambda: compiled(prefix, codes), reps)
    # bfloat16 on a few candidates only: on CPUs without bf16 arithmetic it is very slow.
    few = codes[: spec["bf16_batch"]]
    with fixed_weights(generator, device):
        fp32_few = timed(lambda: render(prefix, few), 1)
    with fixed_weights(generator, device, dtype=torch.bfloat16):
        bf16_few = timed(lambda: render(prefix, few), 1)
    out = {"ms_per_candidate": rows, "batch": batch, "level": level,
           "bf16": {"batch": len(few), "fp32_ms_per_candidate": fp32_few, "bf16_ms_per_candidate": bf16_few},
           "native_bf16": native_bf16(device), "peak_rss_gib": timing.peak_rss_gib()}
    if spec["compile"]:
        out["compile_seconds"] = compile_seconds
    return out


# Phase: does a bf16 search choose what a float32 search chooses? -----------------------------------------------


INITIALISED = "initialised"  # --bf16-models: the paper's widths as initialised instead of a trained model


def bf16_model(ref: str, quick: bool, device: torch.device):
    """The generator, its config and its search distance for the bf16 agreement check: `initialised` (the
    paper's widths, or 1/8 of them on a device without bf16 arithmetic, with LPIPS-VGG), or a trained model
    (builtin:TASK, a run directory or a model file) with the distance it was trained with."""
    if ref == INITIALISED:
        narrow = not native_bf16(device)
        config = make_config("super-resolution", quick, NARROW if narrow else [])
        generator, lpips, _ = timing.build(config, device)
        return generator, config, lpips, narrow
    generator, config = load_model(builtin.locate(ref), device)
    generator.requires_grad_(False)
    distance = make_distance(config).to(device)
    return generator, config, distance, False


def phase_bf16(spec: dict, device: torch.device) -> dict:
    generator, config, distance, narrow = bf16_model(spec["model"], spec["quick"], device)
    task = tasks.get(config.task)
    inputs, targets = timing.examples(config, spec["examples"], device)
    seeds = torch.arange(2000, 2000 + spec["examples"])
    runs, seconds, now = {}, {}, timing.clock(device)
    variants = {"float32": (None, 0), **{rescore_name(k): (torch.bfloat16, k) for k in spec["rescores"]}}
    for name, (dtype, rescore) in variants.items():
        started = now()
        runs[name] = hierarchical_search(generator, distance, task, inputs, targets, seeds, spec["pools"],
                                         config.search.max_batch, dtype=dtype, rescore=rescore)
        seconds[name] = now() - started
    a = runs["float32"]
    agreement = {}
    for name, b in list(runs.items())[1:]:
        same = (a.winners == b.winners).all(dim=1)
        agreement[name] = {
            "examples_with_identical_codes": int(same.sum()), "fraction_identical": float(same.float().mean()),
            "per_level_agreement": (a.winners == b.winners).float().mean(0).tolist(),
            "first_differing_level": [int((a.winners[i] != b.winners[i]).nonzero()[0])
                                      for i in range(len(same)) if not same[i]],
            "mean_distance": b.distances.mean(0).tolist()}
    return {"model": spec["model"], "narrow_model": narrow, "task": config.task,
            "widths": {"channels": config.model.channels, "growth": config.model.growth},
            "parameters": count_parameters(generator), "distance": distance_name(config, spec["model"]),
            "schedule": None if spec["model"] == INITIALISED else schedule(config),
            "examples": spec["examples"], "pools": spec["pools"], "agreement": agreement,
            "distance_fp32": a.distances.mean(0).tolist(), "seconds": seconds, "peak_rss_gib": timing.peak_rss_gib()}


def schedule(config: Config) -> str:
    """How a trained model was trained, from the config in its file."""
    t = config.train
    length = f"{t.rounds} rounds" if t.rounds else f"{t.passes} passes"
    return (f"{length} of {t.steps_per_round} steps at batch {t.batch_size}, lr {t.lr:g}, {t.round_size} examples "
            f"per round, pools {config.search.samples_per_level}, {config.data.crop} px crops")


def rescore_name(k: int) -> str:
    return f"bfloat16, {k} rescored" if k else "bfloat16"


def distance_name(config: Config, ref: str) -> str:
    if ref == INITIALISED:
        return "LPIPS-VGG"
    name = {"vgg": "LPIPS-VGG", "alex": "LPIPS-AlexNet"}[config.train.perceptual]
    return f"{name} + {config.train.pixel_weight:g} x L1" if config.train.pixel_weight else name


# Phase: training step ------------------------------------------------------------------------------------------

TRAIN_AS_IT_IS = "+ fused Adam (chimle.train as it is)"
TRAIN_PLAIN = "- anomaly detection"  # the naive step as the official code would run without anomaly detection
TRAIN_COMPILED = "+ torch.compile (train.compile=true)"
TRAIN_LADDER = {  # name -> (anomaly detection, Adam, channels-last, weight norm as separate ops, torch.compile)
    "naive (anomaly detection on, for-loop Adam)": (True, "for-loop", False, False, False),
    TRAIN_PLAIN: (False, "for-loop", False, False, False),
    "+ foreach Adam": (False, "foreach", False, False, False),
    TRAIN_AS_IT_IS: (False, "fused", False, False, False),
    "+ fused Adam, channels-last": (False, "fused", True, False, False),
    "chimle.train with weight norm as separate ops (before)": (False, "fused", False, True, False),
    TRAIN_COMPILED: (False, "fused", False, False, True),
}


def separate_weight_norm(conv: WNConv2d) -> torch.Tensor:
    """g * v / ||v|| built from norm, divide and multiply, as WNConv2d did before it called torch._weight_norm."""
    if conv._folded is not None:
        return conv._folded
    norm = conv.weight_v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return conv.weight_v * (conv.weight_g / norm)


def train_setup(config: Config, device: torch.device, kind: str, layout: bool):
    generator, lpips, task = timing.build(config, device, train=True)
    if layout:
        generator.to(memory_format=torch.channels_last)
    inputs, targets = timing.examples(config, 1, device)
    sizes = generator.code_sizes(generator.start(inputs))
    codes = [torch.randn(1, s, generator=torch.Generator().manual_seed(level)).to(device) for level, s in enumerate(sizes)]
    batch = Round(number=0, ids=torch.zeros(1, dtype=torch.long), inputs=inputs, targets=targets, codes=codes)
    return generator, lpips, task, make_optimizer(config, generator, kind), batch


def with_precision(config: Config, precision: str) -> Config:
    return dataclasses.replace(config, train=dataclasses.replace(config.train, precision=precision))


def train_steps(config: Config, generator, lpips, task, optimizer, batch: Round, device, warmup: int, steps: int,
                anomaly: bool = False, losses_of=level_losses) -> dict:
    """Seconds per step (best of `steps` after `warmup`), split into forward, backward and Adam; the seconds
    of the first step (where a compiled `losses_of` compiles) besides. The forward is training's own
    (chimle.train.step_losses, in config's train.precision); with `anomaly`, the naive mode's step."""
    index = torch.zeros(1, dtype=torch.long, device=device)
    first = None
    best, now = None, timing.clock(device)
    for step in range(warmup + steps):
        started = now()
        if anomaly:  # forward and backward together: anomaly mode is one context around both
            naive_step(generator, lpips, task, optimizer, batch.inputs, batch.targets, batch.codes)
            timing.sync(device)
            times = {"forward": now() - started, "backward": 0.0, "optimizer": 0.0}
        else:
            losses = step_losses(config, generator, lpips, batch, index, losses=losses_of)
            timing.sync(device)
            t1 = now()
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            timing.sync(device)
            t2 = now()
            optimizer.step()
            timing.sync(device)
            times = {"forward": t1 - started, "backward": t2 - t1, "optimizer": now() - t2}
        first = sum(times.values()) if first is None else first
        if step >= warmup and (best is None or sum(times.values()) < sum(best.values())):
            best = times
    return {"seconds_per_step": sum(best.values()), "breakdown": best, "steps": steps, "first_step_seconds": first}


def phase_train(spec: dict, device: torch.device) -> dict:
    config = make_config("super-resolution", spec["quick"])
    anomaly, kind, layout, separate, compiled = TRAIN_LADDER[spec["variant"]]
    if separate:  # this phase runs in its own process: the change ends with it
        WNConv2d.weight = separate_weight_norm
    generator, lpips, task, optimizer, batch = train_setup(config, device, kind, layout)
    result = train_steps(config, generator, lpips, task, optimizer, batch, device, spec["warmup"], spec["steps"], anomaly,
                         losses_of=torch.compile(level_losses, dynamic=False) if compiled else level_losses)
    return {**result, "peak_rss_gib": timing.peak_rss_gib(), **timing.gpu_memory(device)}


def phase_train_bf16(spec: dict, device: torch.device) -> dict:
    """bf16 autocast against float32, same weights: step time and the effect on the loss and its gradient. On
    a device without bf16 arithmetic, at 1/8 of the widths (the paper's would take many minutes a step)."""
    narrow = not native_bf16(device)
    config = make_config("super-resolution", spec["quick"], NARROW if narrow else [])
    generator, lpips, task, optimizer, batch = train_setup(config, device, "fused", False)
    configs = {name: with_precision(config, name) for name in ("float32", "bfloat16")}
    effect = bf16_effect(configs, generator, lpips, batch, device)
    times = {name: train_steps(c, generator, lpips, task, optimizer, batch, device, spec["warmup"], spec["steps"])
             for name, c in configs.items()}
    return {"narrow_model": narrow, "widths": {"channels": config.model.channels, "growth": config.model.growth},
            "parameters": count_parameters(generator), "steps": times, "effect": effect,
            "peak_rss_gib": timing.peak_rss_gib()}


def phase_layout(spec: dict, device: torch.device) -> dict:
    """`small`'s training step (batch 8) for spec["task"] in spec["precision"], the generator in the default layout
    and in channels-last: same initial weights, each with its own Adam, steps alternating between the two so that
    other work on the machine slows both alike; the median of each after a warm-up."""
    config = resolve(task=spec["task"], preset="small", overrides=[f"train.precision={spec['precision']}", *OVERRIDES])
    torch.manual_seed(0)
    default = make_generator(dataclasses.replace(config, train=dataclasses.replace(config.train, channels_last=False)),
                             device)
    layouts = {"default": default, "channels-last": copy.deepcopy(default).to(memory_format=torch.channels_last)}
    distance, b = make_distance(config).to(device), config.train.batch_size
    inputs, targets = timing.examples(config, b, device)
    codes = [torch.randn(b, s, generator=torch.Generator().manual_seed(level)).to(device)
             for level, s in enumerate(default.code_sizes(default.start(inputs)))]
    batch = Round(number=0, ids=torch.arange(b), inputs=inputs, targets=targets, codes=codes)
    optimizers = {name: make_optimizer(config, g) for name, g in layouts.items()}
    index, now, times = torch.arange(b, device=device), timing.clock(device), {name: [] for name in layouts}
    for step in range(spec["warmup"] + spec["steps"]):
        for name, generator in layouts.items():
            started = now()
            losses = step_losses(config, generator, distance, batch, index)
            optimizers[name].zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizers[name].step()
            timing.sync(device)
            if step >= spec["warmup"]:
                times[name].append(now() - started)
    dtype = compute_dtype(config.train.precision, device) or torch.float32
    return {"crop": config.data.crop, "batch": b, "step_dtype": str(dtype).removeprefix("torch."),
            "seconds_per_step": {name: statistics.median(t) for name, t in times.items()}, "times": times,
            "peak_rss_gib": timing.peak_rss_gib()}


def bf16_effect(configs: dict[str, Config], generator, lpips, batch: Round, device) -> dict:
    """Per-level losses and the gradient of the training step's forward in float32 and in bfloat16 (configs:
    precision -> config), same weights and batch."""
    grads, losses = [], []
    for precision in ("float32", "bfloat16"):
        generator.zero_grad(set_to_none=True)
        loss = step_losses(configs[precision], generator, lpips, batch, torch.zeros(1, dtype=torch.long, device=device))
        loss.sum().backward()
        losses.append(loss.detach().float())
        grads.append(torch.cat([p.grad.flatten() for p in generator.parameters() if p.grad is not None]))
    generator.zero_grad(set_to_none=True)
    return {"loss_fp32": losses[0].tolist(), "loss_bf16": losses[1].tolist(),
            "max_relative_loss_difference": float(((losses[1] - losses[0]).abs() / losses[0]).max()),
            "gradient_cosine": float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0))}


# Phase: sampling -----------------------------------------------------------------------------------------------


def sampler(generator: Generator, task, inputs: list[torch.Tensor], n: int):
    """A function rendering n fixed-code samples of one input in batches of a given size, brought to the CPU."""
    sizes = generator.code_sizes(generator.start(inputs))
    codes = [torch.randn(n, s, generator=torch.Generator().manual_seed(level)).to(inputs[0].device)
             for level, s in enumerate(sizes)]

    def render(size: int) -> None:
        for start in range(0, n, size):
            chunk = [c[start : start + size] for c in codes]
            raw = generator([x.expand(chunk[0].shape[0], -1, -1, -1) for x in inputs], chunk)[-1]
            task.image(raw, inputs, generator.cfg.levels - 1).cpu()

    return render


def phase_sample(spec: dict, device: torch.device) -> dict:
    """Images per second: the naive way, under `fixed_weights`, and `chimle.sample.Model` as shipped (which
    prepares a copy of the weights the same way once)."""
    from chimle.sample import Model, variations

    config = make_config("super-resolution", spec["quick"])
    generator, _, task = timing.build(config, device)
    inputs, _ = timing.examples(config, 1, device)
    n, batch = spec["images"], spec["batch"]
    render = sampler(generator, task, inputs, n)
    now = timing.clock(device)

    def rate(fn) -> float:
        fn()  # warm-up
        timing.sync(device)
        started = now()
        fn()
        timing.sync(device)
        return n / (now() - started)

    rows = {}
    with torch.no_grad():
        rows["naive (weight norm every forward, NCHW, no_grad), batch 1"] = rate(lambda: render(1))
    with fixed_weights(generator, device):
        rows["fixed_weights (folded, channels-last, inference mode), batch 1"] = rate(lambda: render(1))
        rows[f"fixed_weights, batch {batch}"] = rate(lambda: render(batch))
    model = Model(copy.deepcopy(generator), config, device)
    image, sources = inputs[0][0].cpu(), variations([(0, 0)] * config.model.levels, set(), 0, n)
    rows["chimle.sample.Model.sample as shipped, batch 1"] = rate(lambda: model.sample(image, n=n, seed=0))
    rows[f"chimle.sample.Model.render, batch {batch}"] = rate(lambda: model.render(image, sources, batch=batch))
    return {"images_per_second": rows, "images": n, "output_px": TASKS["super-resolution"],
            "peak_rss_gib": timing.peak_rss_gib()}


PHASE_FUNCTIONS = {"search": phase_search, "roofline": phase_roofline, "memory": phase_memory, "levers": phase_levers, "bf16": phase_bf16, "train": phase_train,
                   "train_bf16": phase_train_bf16, "layout": phase_layout, "sample": phase_sample}


# Plan, children, report ----------------------------------------------------------------------------------------


def plan(args) -> list[dict]:
    """Every measurement as a child-process spec."""
    quick = args.quick
    pools = [40, 40, 20, 10] if quick else [200, 200, 20, 10]
    native = native_bf16(torch.device(args.device))
    specs = []
    if "search" in args.phases:
        for i, task in enumerate(args.tasks):
            counts = {NAIVE: sorted({1, args.naive_examples}), OURS: sorted({1, args.examples})}
            if native:  # the search as configured by default (search.precision=auto) renders in bfloat16 here
                counts[BF16] = sorted({1, args.examples})
            if i == 0:  # the ladder, on the first task's single example; the compiled search as a round runs it
                counts.update({mode: [1] for mode in (PREFIX, FOLDED, BATCHED)})
                counts[COMPILED] = [args.examples] if args.compile else []
            for mode in SEARCHES:
                for n in counts.get(mode, []):  # profiled again: the stages and operators of the report
                    profile = i == 0 and (mode == OURS or (mode == NAIVE and n == 1))
                    specs.append({"phase": "search", "task": task, "mode": mode, "examples": n, "pools": pools,
                                  "profile": profile})
    if "roofline" in args.phases:
        specs.append({"phase": "roofline", "task": args.tasks[0], "pools": pools, "reps": 3 if quick else 5})
    if "memory" in args.phases:
        for task in args.tasks:
            specs.append({"phase": "memory", "task": task, "pools": pools})
    if "levers" in args.phases:
        specs.append({"phase": "levers", "batch": 16, "reps": 2 if quick else 3, "bf16_batch": 2,
                      "compile": args.compile})
    if "bf16" in args.phases:
        for model in args.bf16_models:
            specs.append({"phase": "bf16", "model": model, "examples": args.bf16_examples, "pools": pools,
                          "rescores": args.bf16_rescores})
    if "train" in args.phases:
        for variant in TRAIN_LADDER:
            if TRAIN_LADDER[variant][4] and (quick or not args.compile):  # compiling takes minutes even in --quick
                continue
            specs.append({"phase": "train", "variant": variant, "warmup": 1, "steps": 2 if quick else 5})
    if "bf16" in args.phases:
        specs.append({"phase": "train_bf16", "warmup": 1, "steps": 2})
    if "layout" in args.phases:
        for task in LAYOUT_TASKS:
            for precision in ("auto", "float32"):
                specs.append({"phase": "layout", "task": task, "precision": precision, "warmup": 2,
                              "steps": 3 if quick else 15})
    if "sample" in args.phases:
        specs.append({"phase": "sample", "images": 8, "batch": 8})
    for spec in specs:
        spec.update(quick=quick, device=args.device, threads=args.threads, overrides=args.override)
    return specs


def run_child(spec: dict) -> dict:
    """Run one measurement in a fresh process; its last stdout line is the result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    load = common.load_average()
    started = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sys.stderr.write("".join(line for line in done.stderr.splitlines(keepends=True)
                             if not line.startswith("USDT:")))  # the profiler's start/stop lines
    if done.returncode != 0:
        raise SystemExit(f"the measurement {spec} failed (exit code {done.returncode})")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**spec, **result, "wall_seconds": time.perf_counter() - started, "load_average_before": load}


def child(spec: dict) -> None:
    OVERRIDES[:] = spec["overrides"]
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    warnings.filterwarnings("ignore", message=".*[Aa]nomaly.*")
    device = torch.device(spec["device"])
    result = PHASE_FUNCTIONS[spec["phase"]](spec, device)
    result["clock"] = "process CPU time" if timing.clock(device) is time.process_time else "wall time"
    print(json.dumps(result))


def kept_results(path: Path, report: dict, measured: set[str]) -> list[dict]:
    """The results of an earlier report (`path`) in the phases this run does not measure, each with the run that
    measured it under "kept" (its command and the load before it; a result that report had kept itself keeps its
    own). Refused unless the earlier report ran on the same kind of device: the report compares only within one
    machine."""
    try:
        earlier = json.loads(path.read_text())
        results = earlier["results"]
    except (OSError, ValueError, KeyError) as error:
        raise SystemExit(f"--keep {path}: not a speed report ({error})") from None
    same = ("cpu_model", "cpu_flags", "torch_cpu_capability", "cpus", "torch")
    differ = [k for k in same if earlier["machine"].get(k) != report["machine"].get(k)]
    if differ or earlier["device"] != report["device"] or earlier["quick"] != report["quick"]:
        raise SystemExit(f"--keep {path}: measured on another machine or setting ({', '.join(differ) or 'device/quick'} "
                         "differ); its numbers cannot stand beside this run's")
    source = {"command": earlier["command"], "uptime_before": earlier.get("uptime_before")}
    return [{**r, "kept": r.get("kept") or source} for r in results if r["phase"] not in measured]


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], stdout=subprocess.PIPE, text=True).stdout.strip()
    except OSError:
        return ""


# Markdown ------------------------------------------------------------------------------------------------------

STAGES = ["prefix", "candidates", "candidate_features", "target_features", "distance", "argmin", "draw_codes",
          "repeat_prefix"]


def _find(results: list[dict], **match) -> dict | None:
    return next((r for r in results if all(r.get(k) == v for k, v in match.items())), None)


def _profiled(search: dict) -> float:
    """The seconds of a search's profiled run (reports before the timed and the profiled runs were two: its only)."""
    return search.get("profiled_seconds", search["wall_seconds_search"])


def _per_shape_roofline(roof: dict) -> tuple[float, float]:
    """(seconds per example, GMAC/s) of the search's convolutions each as fast as alone (the roofline phase)."""
    seconds = sum(s["gmac_per_example"] / s["gmac_per_second"] for s in roof["per_shape"])
    return seconds, sum(s["gmac_per_example"] for s in roof["per_shape"]) / seconds


def render(report: dict) -> str:
    results = report["results"]
    searches = [r for r in results if r["phase"] == "search"]
    out = [f"# Speed: search, training step, sampling ({'quick run' if report['quick'] else 'full run'})\n",
           f"`{report['command']}` on {report['device']}; {report['machine']['cpus']} CPUs, torch "
           f"{report['machine']['torch']} with {report['machine']['torch_threads']} threads; "
           f"{report['total_minutes']:.0f} min in all.  ",
           f"CPU: {report['machine'].get('cpu_model')} (flags: {report['machine'].get('cpu_flags')}; PyTorch's "
           f"CPU capability: {report['machine'].get('torch_cpu_capability')}).  ",
           f"Load before: `{report['uptime_before']}`; after: `{report['uptime_after']}`.  ",
           f"Clock: {', '.join(sorted({r.get('clock', 'wall time') for r in results}))} (with one torch thread, the "
           "process's CPU time: other work on a shared machine cannot inflate it; on an idle one it equals wall "
           "time).  ",
           f"Generator: {report['model']['parameters'] / 1e6:.1f} M parameters (paper widths"
           f"{', 1 RRDB per level' if report['quick'] else ''}); LPIPS-VGG.  "]
    sources: dict[str, dict] = {}  # the earlier runs whose numbers this report kept (--keep), by command
    for r in results:
        if r.get("kept"):
            sources.setdefault(r["kept"]["command"], {**r["kept"], "phases": set()})["phases"].add(r["phase"])
    for source in sources.values():
        out.append(f"Phases {', '.join(f'`{p}`' for p in sorted(source['phases']))} were not measured by this "
                   f"command: their numbers are kept (`--keep`) from an earlier run on the same kind of machine, "
                   f"`{source['command']}` (load before it: `{source['uptime_before']}`); every comparison below is "
                   "within one run.  ")
    if not report["gpu_measured"]:
        out.append("GPU numbers were not measured here (no GPU); `--device cuda` runs the same measurements on one.")
    out.append("")
    targets = []

    # Search: naive vs ours (and ours in bfloat16, the default where the device has it natively).
    rows = []
    native = any(r["mode"] == BF16 for r in searches)
    for task, mode in [(t, m) for t in dict.fromkeys(r["task"] for r in searches) for m in (OURS, BF16)]:
        for n in sorted({r["examples"] for r in searches if r["task"] == task and r["mode"] == mode}):
            b = _find(searches, task=task, mode=mode, examples=n)
            # The naive search takes one example at a time, so its time per example does not depend on n; where it
            # was not run on n examples, its 1-example time stands in (marked *).
            a = _find(searches, task=task, mode=NAIVE, examples=n) or _find(searches, task=task, mode=NAIVE, examples=1)
            if a is None:
                continue
            ratio = a["seconds_per_example"] / b["seconds_per_example"]
            shared = min(n, a["examples"])
            same = sum(x == y for x, y in zip(a["winners"][:shared], b["winners"][:shared]))
            star = "" if a["examples"] == n else "*"
            rows.append([task, rescore_name(RESCORE) if mode == BF16 else "float32", n,
                         f"{a['seconds_per_example']:.1f}{star}", f"{b['seconds_per_example']:.1f}",
                         f"**{ratio:.2f}x**", f"{a['generator_gmac_per_example']:.0f} / {b['generator_gmac_per_example']:.0f}",
                         f"{a['peak_rss_gib']:.2f} / {b['peak_rss_gib']:.2f}", f"{same}/{shared}"])
            if mode == BF16:  # the default where bf16 is native; without it the target is the roofline's (below)
                targets.append((f"search {task}, {n} example(s), with native bf16, in bf16: >= 3x faster than naive",
                                f"{ratio:.2f}x", ratio >= 3))
    if rows:
        pools = searches[0]["pools"]
        out += [f"## Code search, pools {pools}: seconds per example\n",
                timing.table(["task", "ours renders in", "examples", "naive s/ex", "ours s/ex", "speed-up",
                              "generator GMAC/ex naive / ours",
                        "peak RSS GiB naive / ours",
                        "same codes as naive"], rows),
                "Naive: `chimle.naive.naive_search`, the official sampler's work (levels below l re-rendered for each "
                "mini-batch of 20 candidates, target features per mini-batch, weight norm in every forward, NCHW, "
                "no_grad); * its time on 1 example (it takes one example at a time). Ours: "
                "`chimle.search.hierarchical_search` with its defaults, in float32, and (where the device computes "
                f"bfloat16 natively, so that `search.precision=auto` picks it) in bfloat16 with each level's {RESCORE} "
                "nearest candidates rescored in float32; the codes it chooses are compared with float32's on trained "
                "models below. Every search here is timed without torch.profiler (which slows some searches more "
                "than others); the shares of its stages come from the same search run again under it. Peak RSS: "
                "ru_maxrss of the measurement's own process (Python, PyTorch, model, LPIPS, search) before that "
                "profiled run.\n"]

    # The ladder.
    first = searches[0]["task"] if searches else None
    ladder = [_find(searches, task=first, mode=mode, examples=1) for mode in SEARCHES
              if mode != COMPILED and (mode != BF16 or native)]
    roof = _find(results, phase="roofline")
    if all(ladder):
        base = ladder[0]["seconds_per_example"]
        rows = [[r["mode"], f"{r['seconds_per_example']:.1f}", f"{base / r['seconds_per_example']:.2f}x",
                 f"{(ladder[i - 1]['seconds_per_example'] if i else base) / r['seconds_per_example']:.2f}x",
                 f"{r['generator_gmac_per_example']:.0f}",
                 f"{r['generator_gmac_per_example'] / r['seconds_per_example']:.0f}",
                 *([f"{r['generator_gmac_per_example'] / r['seconds_per_example'] / roof['gmac_per_second']:.0%}"]
                   if roof else []),
                 f"{r['peak_rss_gib']:.2f}"] for i, r in enumerate(ladder)]
        out += [f"## Search levers one at a time ({first}, 1 example)\n",
                timing.table(["search", "s/example", "vs naive", "this lever", "generator GMAC", "GMAC/s overall",
                              *(["of the roofline"] if roof else []), "peak RSS GiB"], rows)]
    compiled = next((r for r in searches if r["task"] == first and r["mode"] == COMPILED), None)
    ours = compiled and _find(searches, task=first, mode=OURS, examples=compiled["examples"])
    if ours:
        saved = ours["seconds_per_example"] - compiled["seconds_per_example"]
        compiling = compiled["compile_and_first_example_seconds"] - compiled["seconds_per_example"]
        verdict = (f"it pays after {compiling / saved:.0f} examples; over a round of 400 examples it saves "
                   f"{(400 * saved - compiling) / 60:.0f} minutes net ({400 * saved / compiling:.1f}x its compile "
                   "time)" if saved > 0 else "it does not pay: the compiled search is no faster")
        speedup = ours["seconds_per_example"] / compiled["seconds_per_example"]
        same = sum(a == b for a, b in zip(ours["winners"], compiled["winners"]))
        out.append(f"**The search through torch.compile** (`search.compile=true`; {first}, {compiled['examples']} "
                   f"examples): {compiled['seconds_per_example']:.1f} s per example against ours "
                   f"{ours['seconds_per_example']:.1f} s ({speedup:.2f}x), the same codes for {same} of "
                   f"{compiled['examples']} examples. Compiling every level (one graph per level, each batch padded "
                   f"to `search.max_batch`) with a first example took "
                   f"{compiled['compile_and_first_example_seconds']:.0f} s (wall), about {compiling:.0f} s more than "
                   f"searching that example; {verdict}.\n")
        targets.append(("search.compile pays over a 400-example round",
                        f"{speedup:.2f}x per example, {compiling:.0f} s to compile",
                        saved > 0 and 400 * saved > compiling))
    if roof:
        level, (cin, cout, h, w) = roof["level"], roof["shape"]
        out.append(f"Roofline (phase `roofline`): one plain 3x3 convolution {cin} -> {cout} channels at {h}x{w}, "
                   f"batch {roof['batch']}, float32, channels-last, inference mode — the shape that costs the search "
                   f"most ({roof['share_of_search_macs']:.0%} of its generator MACs, level {level}) at the batch the "
                   f"search renders that level in: **{roof['gmac_per_second']:.0f} GMAC/s** (best of its repeats). "
                   "GMAC/s overall counts the generator's MACs only (not LPIPS), over the whole search's time.\n")
        ours = _find(searches, task=first, mode=OURS, examples=1)
        if "per_shape" in roof:
            rows = []
            for lv in sorted({s["level"] for s in roof["per_shape"]}):
                shapes = [s for s in roof["per_shape"] if s["level"] == lv]
                gmac = sum(s["gmac_per_example"] for s in shapes)
                seconds = sum(s["gmac_per_example"] / s["gmac_per_second"] for s in shapes)
                rates = [s["gmac_per_second"] for s in shapes]
                rows.append([lv, len(shapes), shapes[0]["batch"], f"{gmac:.0f}", f"{seconds:.1f}",
                             f"{gmac / seconds:.0f}", f"{min(rates):.0f}-{max(rates):.0f}"])
            per_shape, per_shape_rate = _per_shape_roofline(roof)
            mine = (f" Ours (float32, 1 example) took {ours['seconds_per_example']:.1f} s: "
                    f"{per_shape / ours['seconds_per_example']:.0%} of the per-shape roofline."
                    if ours else "")
            out += ["The per-shape roofline (same phase): every convolution shape of the search alone, at its level's "
                    "batch, repeated; seconds per example if each of the search's convolutions ran that fast with "
                    f"nothing between them: **{per_shape:.1f} s, {per_shape_rate:.0f} GMAC/s**."
                    f"{mine}\n",
                    timing.table(["level", "shapes", "batch", "generator GMAC/ex", "seconds alone",
                                  "GMAC/s", "GMAC/s per shape"], rows)]
        if ours and not roof["native_bf16"]:
            rate = ours["generator_gmac_per_example"] / ours["seconds_per_example"]
            targets.append(("search without native bf16: within 15% of the float32 roofline",
                            f"{rate / roof['gmac_per_second']:.0%} of {roof['gmac_per_second']:.0f} GMAC/s",
                            rate >= 0.85 * roof["gmac_per_second"]))
            if "per_shape" in roof:
                per_shape, per_shape_rate = _per_shape_roofline(roof)
                share = per_shape / ours["seconds_per_example"]
                targets.append(("(the same against the per-shape roofline, for reference)",
                                f"{share:.0%} of {per_shape_rate:.0f} GMAC/s", share >= 0.85))

    # Where the time goes.
    picks = [(f"naive, {n}", _find(searches, task=first, mode=NAIVE, examples=n)) for n in (1,)] + \
            [(f"ours, {n}", _find(searches, task=first, mode=OURS, examples=n))
             for n in sorted({r["examples"] for r in searches if r["task"] == first and r["mode"] == OURS})]
    picks = [(k, r) for k, r in picks if r]
    if picks:
        rows = []
        for stage in STAGES + ["other"]:
            cells = []
            for _, r in picks:
                wall = _profiled(r)  # the profiled run's clock; its shares are carried over to `seconds`
                value = wall - sum(r["stages"].values()) if stage == "other" else r["stages"].get(stage, 0.0)
                cells.append(f"{value / wall * r['seconds_per_example']:.2f} ({100 * value / wall:.0f}%)")
            rows.append([stage, *cells])
        rows.append(["total", *[f"{r['seconds_per_example']:.2f}" for _, r in picks]])
        out += [f"## Where the search's time goes ({first}; seconds per example, share)\n",
                timing.table(["stage", *[f"{k} example(s)" for k, _ in picks]], rows),
                "Stages are the `record_function` ranges of chimle.search / chimle.naive; torch.profiler gives "
                "their shares in a second, profiled run of the same search, applied to the unprofiled time. "
                "prefix = rendering the chosen codes of lower levels (naive: again for every mini-batch of 20); "
                "candidates = rendering the level being searched; features = LPIPS-VGG; other = folding weight "
                "norm, changing the weights' layout, bookkeeping.\n"]
        ops = {k: r["operators"] for k, r in picks[:2]}
        names = list(dict.fromkeys(n for o in ops.values() for n in list(o)[:6]))
        out += ["Top operators (share of the profiled time):\n",
                timing.table(["operator", *ops], [[n, *[f"{100 * o.get(n, 0) / _profiled(r):.1f}%" for (_, r), o
                                                  in zip(picks, ops.values())]] for n in names])]

    for memory in [r for r in results if r["phase"] == "memory"]:
        out.append(f"{memory['task']}: "
                   f"peak memory of the search at its largest (a full group of {memory['examples']} examples, "
                   f"{memory['max_batch']} renders at once; phase `memory`, no profiler): "
                   f"**{memory['peak_rss_gib']:.2f} GiB** resident, {memory['rss_before_gib']:.2f} GiB of it before "
                   "the search (Python, PyTorch, the generator, LPIPS).\n")
        targets.append((f"search {memory['task']}, a full group of {memory['examples']} examples: peak RSS <= 3 GiB",
                        f"{memory['peak_rss_gib']:.2f} GiB", memory["peak_rss_gib"] <= 3))

    # Levers on one render.
    levers = _find(results, phase="levers")
    if levers:
        rows = []
        plain = next(iter(levers["ms_per_candidate"].values()))
        for name, ms in levers["ms_per_candidate"].items():
            rows.append([name, f"{ms:.0f}", f"{plain / ms:.2f}x"])
        bf = levers["bf16"]
        rows.append([f"bfloat16 autocast (batch {bf['batch']}; float32 at that batch: {bf['fp32_ms_per_candidate']:.0f})",
                     f"{bf['bf16_ms_per_candidate']:.0f}", f"{bf['fp32_ms_per_candidate'] / bf['bf16_ms_per_candidate']:.2f}x vs fp32"])
        out += [f"## Each lever on one render (level {levers['level'] + 1} of {levers['batch']} candidates + LPIPS; "
                "ms per candidate)\n", timing.table(["lever", "ms/candidate", "vs plain"], rows)]
        if "compile_seconds" in levers:
            out.append(f"torch.compile took {levers['compile_seconds']:.0f} s (wall) to compile this one level and batch "
                       "size; every other level and batch size compiles again.\n")
        out.append(f"Native bf16 arithmetic on this device: {'yes' if levers['native_bf16'] else 'no'}.\n")

    # bf16 agreement.
    agreements = [r for r in results if r["phase"] == "bf16"]
    if agreements:
        out += ["## bfloat16 search: same codes as float32?\n",
                "Each model's search run in float32 and under bfloat16 autocast on the same examples and pools. "
                "Rescored: each example's k nearest candidates by the bf16 distance rendered again in float32 at "
                f"every level, the float32 distance deciding (`search.rescore`, default {RESCORE}); whenever the "
                "float32 winner is among those k, the choice is exactly float32's.\n"]
    for bf in agreements:
        bf = {"model": INITIALISED, "task": "super-resolution", "distance": "LPIPS-VGG", **bf}  # older reports' defaults
        widths = f"channels {bf['widths']['channels']}, growth {bf['widths']['growth']}"
        if bf["model"] == INITIALISED:
            what = (f"a 1/8-width model ({widths}) as initialised, as this device has no bf16 arithmetic"
                    if bf["narrow_model"] else f"the paper's widths as initialised ({widths})")
        else:
            what = (f"`{bf['model']}`, trained ({bf['parameters'] / 1e6:.1f} M parameters; {widths}; "
                    f"{bf.get('schedule')})")
        rows = [["float32", "-", "-", f"{bf['seconds']['float32']:.0f}"]]
        for name, g in bf["agreement"].items():
            rows.append([name, f"{g['examples_with_identical_codes']}/{bf['examples']} "
                               f"({100 * g['fraction_identical']:.0f}%)",
                         ", ".join(f"{100 * a:.0f}%" for a in g["per_level_agreement"]), f"{bf['seconds'][name]:.0f}"])
        out += [f"**{what}**, {bf['task']}, distance {bf['distance']}; pools {bf['pools']}, {bf['examples']} "
                "examples:\n",
                timing.table(["search", "examples with the float32 codes", "agreement per level", "seconds"], rows)]
        default = bf["agreement"].get(rescore_name(RESCORE))
        if default:
            targets.append((f"bfloat16, {RESCORE} rescored (the default), {bf['model']}: the float32 codes on >= 95% of "
                            "examples", f"{100 * default['fraction_identical']:.0f}%",
                            default["fraction_identical"] >= 0.95))

    # Training step.
    trains = [r for r in results if r["phase"] == "train"]
    if trains:
        base = trains[0]["seconds_per_step"]
        rows = [[r["variant"], f"{r['seconds_per_step']:.2f}", f"{base / r['seconds_per_step']:.2f}x",
                 *[f"{r['breakdown'][k]:.2f}" for k in ("forward", "backward", "optimizer")],
                 f"{r['peak_rss_gib']:.2f}"] for r in trains]
        out += [f"## Training step (super-resolution, batch 1, float32; best of {trains[0]['steps']} steps)\n",
                timing.table(["variant", "s/step", "vs naive", "forward", "backward", "Adam", "peak RSS GiB"], rows),
                "Naive: `chimle.naive.naive_step`, anomaly detection on (its forward column holds forward and "
                "backward). The levers accumulate down to chimle.train as it is; the row after channels-last is "
                "chimle.train as it is with weight normalisation built from separate norm, divide and multiply "
                "ops, as before it called the fused `torch._weight_norm` (the op the official code's "
                "`weight_norm` runs).\n"]
        compiled = next((r for r in trains if r["variant"] == TRAIN_COMPILED), None)
        if compiled:
            out.append(f"{TRAIN_COMPILED}: chimle.train as it is with its forward and backward compiled; its first "
                       f"step, which compiles them, took {compiled['first_step_seconds']:.0f} s.\n")
        best = min(trains[1:], key=lambda r: r["seconds_per_step"], default=None)
        if best:
            targets.append(("training step fp32 >= 1.3x faster than naive",
                            f"{base / best['seconds_per_step']:.2f}x ({best['variant']})",
                            base / best["seconds_per_step"] >= 1.3))
        ours = next((r for r in trains if r["variant"] == TRAIN_AS_IT_IS), None)
        plain = next((r for r in trains if r["variant"] == TRAIN_PLAIN), None)
        if ours and plain:
            targets.append(("training step as it is no slower than naive without anomaly detection",
                            f"{plain['seconds_per_step'] / ours['seconds_per_step']:.2f}x",
                            ours["seconds_per_step"] <= plain["seconds_per_step"]))
    bf = _find(results, phase="train_bf16")
    if bf:
        e, steps = bf["effect"], bf["steps"]
        model = (f"a 1/8-width model ({bf['parameters'] / 1e6:.1f} M parameters), as this device has no bf16 "
                 "arithmetic" if bf["narrow_model"] else f"{bf['parameters'] / 1e6:.1f} M parameters")
        out += ["## Training step under bf16 autocast\n",
                f"On {model}: float32 {steps['float32']['seconds_per_step']:.2f} s/step, bf16 autocast "
                f"{steps['bfloat16']['seconds_per_step']:.2f} s/step "
                f"({steps['float32']['seconds_per_step'] / steps['bfloat16']['seconds_per_step']:.2f}x). "
                f"Effect on the loss, same weights and batch: per-level losses float32 "
                f"{', '.join(f'{v:.4f}' for v in e['loss_fp32'])}, bf16 {', '.join(f'{v:.4f}' for v in e['loss_bf16'])} "
                f"(largest relative difference {100 * e['max_relative_loss_difference']:.2f}%); cosine between the "
                f"float32 and bf16 gradients {e['gradient_cosine']:.4f}.\n"]

    layouts = [r for r in results if r["phase"] == "layout"]
    if layouts:
        rows = [[r["task"], r["crop"], r["step_dtype"],
                 *(f"{r['seconds_per_step'][k]:.3f}" for k in ("default", "channels-last")),
                 f"{r['seconds_per_step']['default'] / r['seconds_per_step']['channels-last']:.2f}x"] for r in layouts]
        out += [f"## Training step at `small`'s widths: default layout against channels-last (batch "
                f"{layouts[0]['batch']}; median of {len(layouts[0]['times']['default'])} steps each, interleaved)\n",
                timing.table(["task", "crop px", "step", "default s/step", "channels-last s/step", "speed-up"], rows),
                "`small` as it stands, its step's precision (`train.precision=auto`: bf16 where the device has it) "
                "and float32; the same initial weights in both layouts, each with its own Adam (the layout "
                "`train.channels_last` chooses; the paper's widths are the training ladder above).\n"]

    # Sampling.
    sample = _find(results, phase="sample")
    if sample:
        out += [f"## Sampling ({sample['images']} outputs of {sample['output_px']} px, super-resolution)\n",
                timing.table(["how", "images/s"], [[k, f"{v:.2f}"] for k, v in sample["images_per_second"].items()])]
        targets.append(("sampling reported as images per second",
                        f"{max(sample['images_per_second'].values()):.2f} images/s", True))

    if targets:
        out += ["## Targets\n", timing.table(["target", "measured", "met"],
                                       [[t, m, "yes" if ok else "**no**"] for t, m, ok in targets])]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 RRDB per level, pools 40/40/20/10, 2 examples")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    parser.add_argument("--examples", type=int, default=None, help="examples of the batched search (default 8; quick 2)")
    parser.add_argument("--naive-examples", type=int, default=None, help="examples of the naive search (default: --examples; quick 1)")
    parser.add_argument("--bf16-examples", type=int, default=None, help="examples of the bf16 agreement check (default 8; quick 3)")
    parser.add_argument("--bf16-models", default=f"builtin:super-resolution,{INITIALISED}",
                        help="comma-separated models of the bf16 agreement check: builtin:TASK, run directories, model "
                             f"files, or {INITIALISED} (the paper's widths as initialised) (default: %(default)s)")
    parser.add_argument("--bf16-rescores", default="0,2,4",
                        help="comma-separated rescoring widths of the bf16 agreement check; 0 = none (default: %(default)s)")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    parser.add_argument("--skip", default="", help=f"comma-separated phases to skip, of {', '.join(PHASES)}")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile lever and the compiled training step (--quick skips the latter)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each measurement (default: torch's)")
    parser.add_argument("--override", "-o", action="append", default=[],
                        help="config override for every model, e.g. -o model.blocks=2 (repeatable)")
    parser.add_argument("--out", type=Path, default=common.RESULTS, help="folder of speed.json and speed.md")
    parser.add_argument("--resume", action="store_true",
                        help="keep the measurements of an interrupted run (OUT/speed.partial.json) and do the rest")
    parser.add_argument("--keep", type=Path, metavar="JSON",
                        help="keep the measurements of the phases this run skips from an earlier report of this "
                             "machine (e.g. benchmarks/results/speed.json); the report says which they are")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))

    args.examples = args.examples or (2 if args.quick else 8)
    args.naive_examples = args.naive_examples or (1 if args.quick else args.examples)
    args.bf16_examples = args.bf16_examples or (3 if args.quick else 8)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.bf16_models = [m for m in args.bf16_models.split(",") if m]
    args.bf16_rescores = [int(k) for k in args.bf16_rescores.split(",") if k]
    args.phases = [p for p in PHASES if p not in args.skip.split(",")]
    unknown = [t for t in args.tasks if t not in TASKS] + [p for p in args.skip.split(",") if p and p not in PHASES]
    if unknown:
        raise SystemExit(f"unknown task or phase: {', '.join(unknown)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this PyTorch sees no CUDA device")
    for ref in args.bf16_models:  # a missing model fails now, not after an hour of measurements
        if ref != INITIALISED:
            try:
                model_path(builtin.locate(ref))
            except (CheckpointError, ValueError) as error:
                raise SystemExit(f"--bf16-models: {error}") from None

    specs = plan(args)
    report = {"command": common.command_line(), "machine": common.machine(), "uptime_before": uptime(),
              "device": args.device, "quick": args.quick, "gpu_measured": args.device.startswith("cuda"),
              "results": []}
    earlier = kept_results(args.keep, report, {spec["phase"] for spec in specs}) if args.keep else []
    OVERRIDES[:] = args.override
    report["model"] = {"parameters": count_parameters(Generator(make_config("super-resolution", args.quick).model)),
                       "overrides": args.override}
    partial = args.out / "speed.partial.json"
    done = []
    if args.resume and partial.is_file():  # the run goes on: its start is the interrupted run's
        interrupted = json.loads(partial.read_text())
        done, report["uptime_before"] = interrupted["results"], interrupted["uptime_before"]
    for i, spec in enumerate(specs, 1):
        label = " ".join(str(spec.get(k)) for k in ("phase", "task", "mode", "variant", "examples") if spec.get(k))
        kept = next((r for r in done if all(r.get(k) == v for k, v in spec.items())), None)
        if kept is not None:
            print(f"[{i}/{len(specs)}] {label}: kept from {partial}", file=sys.stderr)
            report["results"].append(kept)
            continue
        print(f"[{i}/{len(specs)}] {label} ...", file=sys.stderr, flush=True)
        result = run_child(spec)
        report["results"].append(result)
        print(f"    {result['wall_seconds']:.0f} s, peak RSS {result['peak_rss_gib']:.2f} GiB", file=sys.stderr)
        args.out.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(report, indent=2) + "\n")  # survives a crash; see --resume
    report["total_minutes"] = sum(r["wall_seconds"] for r in report["results"]) / 60  # its measurements, resumed or not
    report["uptime_after"] = uptime()
    report["results"] += earlier
    markdown = render(report)
    md, js = common.write("speed", markdown, report, args.out)
    partial.unlink(missing_ok=True)
    print(markdown)
    print(f"wrote {md} and {js}")


if __name__ == "__main__":
    main()
