"""What the speed benchmarks share (benchmarks/speed.py, benchmarks/gpu.py): examples and networks to time, the
clock, synchronisation, memory readings, multiply-accumulate counts, Markdown tables."""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chimle import tasks  # noqa: E402
from chimle.blocks import WNConv2d  # noqa: E402
from chimle.config import Config  # noqa: E402
from chimle.data import ImageFolder, builtin_photos  # noqa: E402
from chimle.generator import Generator  # noqa: E402
from chimle.perceptual import LPIPS  # noqa: E402

GIB = 2**30


def examples(config: Config, count: int, device: torch.device):
    """Input and target pyramids of `count` crops of the built-in photos."""
    folder = ImageFolder(builtin_photos("train"), config.data.crop)
    images = torch.stack([folder.example(0, i).image for i in range(count)])
    inputs, targets = tasks.get(config.task).pair(images, config)
    return [x.to(device) for x in inputs], [y.to(device) for y in targets]


def build(config: Config, device: torch.device, train: bool = False):
    torch.manual_seed(0)
    generator = Generator(config.model).to(device)
    generator.train(train).requires_grad_(train)
    return generator, LPIPS("vgg").to(device), tasks.get(config.task)


def clock(device: torch.device):
    """The clock of every measurement: on a CPU with one torch thread, the process's CPU time, which other
    processes on a shared machine cannot inflate and which equals wall time on an idle one; wall time
    otherwise (several threads, or a GPU)."""
    return time.process_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fn, reps: int, device: torch.device):
    """(seconds of the fastest of `reps` calls of `fn` after a warm-up call, by `clock`; the last call's output)."""
    fn()
    now, best, out = clock(device), float("inf"), None
    for _ in range(reps):
        sync(device)
        started = now()
        out = fn()
        sync(device)
        best = min(best, now() - started)
    return best, out


def rss_gib() -> float:
    """Resident memory now (Linux /proc), GiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux reports KiB


def _render_levels(generator: Generator, inputs: list[torch.Tensor], kinds: tuple, record) -> None:
    """Render one example level by level, calling record(level, module, output) after every module of `kinds`."""
    current = [0]
    handles = [m.register_forward_hook(lambda module, args, output: record(current[0], module, output))
               for m in generator.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            prefix = generator.start([x[:1] for x in inputs])
            for level, size in enumerate(generator.code_sizes(prefix)):
                current[0] = level
                _, prefix = generator.render_level(prefix, torch.zeros(1, size, device=inputs[0].device))
    finally:
        for h in handles:
            h.remove()


def _macs(module, output) -> int:
    if isinstance(module, WNConv2d):
        return module.weight_v.numel() * output.shape[-2] * output.shape[-1]
    return module.in_features * module.out_features


def level_macs(generator: Generator, inputs: list[torch.Tensor]) -> list[int]:
    """Multiply-accumulates of rendering each level for one example (convolutions and linear layers)."""
    counts = [0] * generator.cfg.levels

    def record(level, module, output):
        counts[level] += _macs(module, output)

    _render_levels(generator, inputs, (WNConv2d, torch.nn.Linear), record)
    return counts


def activities(device: torch.device):
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return acts


def gpu_memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / GIB}


def conv_costs(generator: Generator, inputs: list[torch.Tensor]) -> dict[tuple[int, int, int, int, int], int]:
    """Multiply-accumulates of one example's render, per convolution shape: {(level, in channels, out channels,
    height, width): MACs of all the level's convolutions of that shape}."""
    costs: dict[tuple[int, int, int, int, int], int] = {}

    def record(level, module, output):
        key = (level, module.weight_v.shape[1], module.weight_v.shape[0], output.shape[-2], output.shape[-1])
        costs[key] = costs.get(key, 0) + _macs(module, output)

    _render_levels(generator, inputs, (WNConv2d,), record)
    return costs


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
