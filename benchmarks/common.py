"""Helpers shared by the science benchmarks (modes.py, ablations.py): their configs, generator sizes (parameters,
multiply-accumulates), the machine's state, mean ± spread over seeds, Markdown/JSON reports, and PNG charts drawn
with Pillow (matplotlib is not a dependency)."""

from __future__ import annotations

import argparse

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from chimle import __version__, tasks
from chimle.config import Config, resolve
from chimle.generator import Generator, count_parameters

RESULTS = Path(__file__).resolve().parent / "results"
LOG_QUIET = ["train.checkpoint_every=100000", "train.grid_every=100000", "train.log_every=10"]


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (as `uptime` prints them), or None where unknown."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def cpu() -> dict:
    """The CPU's model name and the instruction-set flags that decide the speed of float32 and bfloat16 kernels
    (from /proc/cpuinfo where there is one), and PyTorch's view of them."""
    model, flags = platform.processor() or None, []
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                    if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        model = info.get("model name", model)
        flags = sorted(f for f in info.get("flags", "").split() if f.startswith(("avx", "amx", "fma", "f16c")))
    except OSError:
        pass
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: None)()
    return {"cpu_model": model, "cpu_flags": " ".join(flags) or None, "torch_cpu_capability": capability}


def machine() -> dict:
    """What the numbers were measured on."""
    return {**cpu(), "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "chimle": __version__,
            "python": platform.python_version(), "platform": platform.platform(), "load_average": load_average()}


def command_line() -> str:
    """The command that ran this script, as one could type it again (with OMP_NUM_THREADS if it was set)."""
    threads = os.environ.get("OMP_NUM_THREADS")
    return (f"OMP_NUM_THREADS={threads} " if threads else "") + shlex.join(["python", *sys.argv])


def run_record(clock: "Stopwatch", load_before) -> dict:
    """How a benchmark run went: its command, wall and CPU time, the load around it, the machine."""
    return {"command": command_line(), "wall_seconds": clock.seconds, "cpu_seconds": clock.cpu_seconds,
            "load_average_before": load_before, "load_average_after": load_average(), "machine": machine()}


def run_line(run: dict) -> str:
    """The report's first line: the command and what the run cost."""
    m = run["machine"]
    return (f"Command: `{run['command']}` (wall time {run['wall_seconds'] / 60:.1f} min, CPU time "
            f"{run['cpu_seconds'] / 60:.1f} min, on {m['cpus']} CPUs with OMP_NUM_THREADS={m['omp_num_threads']}; "
            f"load average before / after: {run['load_average_before']} / {run['load_average_after']}: the CPU was "
            "shared with other work, so wall times are inflated and the CPU time is the better guide to an idle run).")


def parser(doc: str, quick_help: str, rewrite_help: str) -> argparse.ArgumentParser:
    """The options every training benchmark takes: --quick, --out, --work, --rewrite."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", type=Path, default=RESULTS, help="report folder (default: benchmarks/results)")
    p.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--rewrite", type=Path, metavar="JSON", help=rewrite_help)
    return p


def read_run(path: Path) -> dict:
    """A report's JSON, for rewriting its Markdown without running again."""
    return json.loads(Path(path).read_text())


RUN_KEYS = ("command", "wall_seconds", "cpu_seconds", "load_average_before", "load_average_after", "machine")


def config(task: str, overrides: list[str]) -> Config:
    """A benchmark's config: the `small` preset for `task` with the benchmark's overrides on top."""
    return resolve(task=task, preset="small", overrides=[*overrides, *LOG_QUIET])


def macs(model_config, crop: int, per_level: bool = False) -> int | list[int]:
    """Multiply-accumulates of one generator forward pass on one crop x crop example (generic wiring: the
    input pyramid of the crop; super-resolution: a crop / 2**levels input), counted over its convolutions and
    linear layers with forward hooks; `per_level` gives one count per level."""
    from chimle.blocks import WNConv2d

    generator = Generator(model_config).eval()
    counts = [0] * model_config.levels

    def hook(level):
        def count(module, inputs, output):
            if isinstance(module, WNConv2d):
                counts[level] += module.weight_v.numel() * output.shape[-2] * output.shape[-1]
            else:
                counts[level] += module.in_features * module.out_features
        return count

    handles = [m.register_forward_hook(hook(level)) for level, block in enumerate(generator.levels)
               for m in block.modules() if isinstance(m, (WNConv2d, torch.nn.Linear))]
    if model_config.wiring == "super-resolution":
        inputs = [torch.zeros(1, model_config.in_channels, crop >> model_config.levels, crop >> model_config.levels)]
    else:
        inputs = tasks.pyramid(torch.zeros(1, model_config.in_channels, crop, crop), model_config.levels)
    with torch.no_grad():
        sizes = generator.code_sizes(generator.start(inputs))
        generator(inputs, [torch.zeros(1, s) for s in sizes])
    for handle in handles:
        handle.remove()
    return counts if per_level else sum(counts)


def model_size(cfg: Config) -> dict:
    """Parameters and forward MACs of a config's generator at its training crop."""
    return {"parameters": count_parameters(Generator(cfg.model)), "macs_per_forward": macs(cfg.model, cfg.data.crop)}


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (ddof 1), min and max of per-seed values."""
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if not len(a):
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max()), "n": int(len(a))}


def pm(stats: dict, digits: int = 3) -> str:
    """'mean ± std' for a table cell."""
    if stats["mean"] is None:
        return "–"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def write(name: str, markdown: str, data: dict, out: Path = RESULTS) -> tuple[Path, Path]:
    """Write OUT/NAME.md and OUT/NAME.json."""
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / f"{name}.md", out / f"{name}.json"
    md.write_text(markdown)
    js.write_text(json.dumps(data, indent=2) + "\n")
    return md, js


def cpu_time() -> float:
    """CPU seconds of this process (all its threads) and of the child processes it has waited for: a benchmark
    whose work runs in one-thread jobs (quality.py, speed.py) costs what its children cost."""
    times = os.times()
    return time.process_time() + times.children_user + times.children_system


class Stopwatch:
    """Wall time and the CPU time of this process and its finished children (cpu_time) since construction, in
    seconds. On a shared machine the CPU time (summed over threads) is the better guide to what the work costs on
    an idle one."""

    def __init__(self):
        self.start, self.cpu_start = time.perf_counter(), cpu_time()

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 1)

    @property
    def cpu_seconds(self) -> float:
        return round(cpu_time() - self.cpu_start, 1)


# PNG drawing with Pillow ------------------------------------------------------------------------------------

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
INK = (30, 30, 30)


def font(size: int = 14) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def text_width(draw: ImageDraw.ImageDraw, text: str, f) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=f)
    return right - left


def bar_panel(title: str, groups: list[tuple[str, list[tuple[str, float | None, float | None]]]],
              size: tuple[int, int] = (420, 300), lower_is_better: bool | None = None) -> Image.Image:
    """A bar chart: groups of (label, mean, std) bars with error bars of ± std, the value printed above each."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    f, small = font(15), font(12)
    arrow = "" if lower_is_better is None else (" (lower better)" if lower_is_better else " (higher better)")
    draw.text((10, 6), title + arrow, fill=INK, font=f)
    top, bottom, left, right = 48, height - 46, 60, width - 10
    values = [(m or 0) + (s or 0) for _, bars in groups for _, m, s in bars]
    peak = max(values + [1e-9]) * 1.15
    draw.line([(left, bottom), (right, bottom)], fill=INK)
    draw.line([(left, top), (left, bottom)], fill=INK)
    for tick in np.linspace(0, peak, 5):
        y = bottom - (bottom - top) * tick / peak
        draw.line([(left - 4, y), (left, y)], fill=INK)
        draw.text((2, y - 7), f"{tick:.3g}", fill=INK, font=small)
    bars_total = sum(len(bars) for _, bars in groups) + len(groups) - 1
    step = (right - left - 10) / max(bars_total, 1)
    x = left + 8
    for g, (group, bars) in enumerate(groups):
        start = x
        for b, (label, mean, std) in enumerate(bars):
            colour = COLOURS[b % len(COLOURS)] if len(groups) > 1 else COLOURS[g % len(COLOURS)]
            if mean is not None:
                y = bottom - (bottom - top) * mean / peak
                draw.rectangle([x + 2, y, x + step - 4, bottom], fill=colour)
                if std:
                    centre = x + step / 2 - 1
                    ys = [bottom - (bottom - top) * v / peak for v in (mean - std, mean + std)]
                    draw.line([(centre, ys[0]), (centre, ys[1])], fill=INK, width=2)
                    draw.line([(centre - 5, ys[1]), (centre + 5, ys[1])], fill=INK, width=2)
                    draw.line([(centre - 5, ys[0]), (centre + 5, ys[0])], fill=INK, width=2)
                value = f"{mean:.3g}"
                draw.text((x + step / 2 - text_width(draw, value, small) / 2, min(y, ys[1] if std else y) - 15),
                          value, fill=INK, font=small)
            tw = text_width(draw, label, small)
            draw.text((x + step / 2 - tw / 2, bottom + 4), label, fill=INK, font=small)
            x += step
        if len(groups) > 1:
            tw = text_width(draw, group, small)
            draw.text(((start + x) / 2 - tw / 2, bottom + 22), group, fill=(90, 90, 90), font=small)
        x += step
    return image


def line_panel(title: str, series: list[tuple[str, list[float], list[float]]], x_label: str,
               size: tuple[int, int] = (640, 420), guides: dict[str, float] | None = None) -> Image.Image:
    """A line chart: one (label, xs, ys) line with dots per series, a legend on the right, and dashed horizontal
    `guides` {label: y} (e.g. a baseline and a target)."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    f, small = font(15), font(12)
    draw.text((10, 6), title, fill=INK, font=f)
    legend = max([text_width(draw, label, small) for label, _, _ in series] + [0]) + 30
    top, bottom, left, right = 40, height - 40, 56, width - 10 - legend
    xs = [x for _, sx, _ in series for x in sx] or [0, 1]
    ys = [y for _, _, sy in series for y in sy] + list((guides or {}).values()) or [0, 1]
    x0, x1 = 0.0, max(xs) * 1.05 or 1.0
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.08 or 0.05
    y0, y1 = y0 - pad, y1 + pad

    def at(x, y):
        return left + (right - left) * (x - x0) / (x1 - x0), bottom - (bottom - top) * (y - y0) / (y1 - y0)

    draw.line([(left, bottom), (right, bottom)], fill=INK)
    draw.line([(left, top), (left, bottom)], fill=INK)
    for tick in np.linspace(y0, y1, 6):
        _, y = at(x0, tick)
        draw.line([(left - 4, y), (left, y)], fill=INK)
        draw.text((2, y - 7), f"{tick:.3f}", fill=INK, font=small)
    for tick in np.linspace(x0, x1, 6):
        x, _ = at(tick, y0)
        draw.line([(x, bottom), (x, bottom + 4)], fill=INK)
        draw.text((x - 10, bottom + 6), f"{tick:.1f}", fill=INK, font=small)
    draw.text(((left + right) / 2 - text_width(draw, x_label, small) / 2, bottom + 22), x_label, fill=INK, font=small)
    for label, value in (guides or {}).items():
        _, y = at(x0, value)
        for x in range(int(left), int(right), 12):
            draw.line([(x, y), (min(x + 6, right), y)], fill=(120, 120, 120))
        draw.text((left + 6, y - 15), label, fill=(90, 90, 90), font=small)
    palette = COLOURS + [(23, 190, 207), (188, 189, 34), (127, 127, 127), (227, 119, 194), (0, 0, 0),
                         (100, 100, 255), (255, 100, 100), (50, 150, 50)]
    for i, (label, sx, sy) in enumerate(series):
        colour = palette[i % len(palette)]
        points = [at(x, y) for x, y in zip(sx, sy)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        ly = top + 4 + 17 * i
        draw.line([(right + 12, ly + 7), (right + 24, ly + 7)], fill=colour, width=3)
        draw.text((right + 28, ly), label, fill=INK, font=small)
    return image


def stack(images: list[Image.Image], columns: int, background: str = "white", pad: int = 6) -> Image.Image:
    """Images laid out left to right in `columns` columns, top to bottom."""
    rows = [images[i : i + columns] for i in range(0, len(images), columns)]
    width = max(sum(im.width for im in row) + pad * (len(row) + 1) for row in rows)
    height = sum(max(im.height for im in row) for row in rows) + pad * (len(rows) + 1)
    sheet = Image.new("RGB", (width, height), background)
    y = pad
    for row in rows:
        x = pad
        for im in row:
            sheet.paste(im, (x, y))
            x += im.width + pad
        y += max(im.height for im in row) + pad
    return sheet


def titled(image: Image.Image, title: str, size: int = 16) -> Image.Image:
    """`image` with a line of text above it."""
    f = font(size)
    out = Image.new("RGB", (image.width, image.height + size + 12), "white")
    ImageDraw.Draw(out).text((6, 4), title, fill=INK, font=f)
    out.paste(image, (0, size + 12))
    return out


def to_pil(grid: torch.Tensor) -> Image.Image:
    """A (3, H, W) tensor in [0, 1] as a Pillow image."""
    array = grid.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)
