"""`chimle demo` (= `make demo`): what a built-in model does on held-out photos it never saw, then the same for a
small model trained here on the built-in data on the CPU, side by side.

    chimle demo                                  # x16 super-resolution, < 15 minutes on a 2-core CPU; runs/demo
    chimle demo --task colourization             # runs/demo-colourization
    chimle demo --task decompression             # JPEG quality 10
    chimle demo --task layout                    # the built-in label maps (scripts/make_layouts.py)
    chimle demo --task paired                    # synthetic night -> day pairs made from the built-in photos
    chimle demo --out runs/demo2 -o train.rounds=36

First, if this version ships a built-in model for the task (chimle.builtin), it samples that model on the
held-out inputs and writes its grids to OUT/heldout-builtin/ and its numbers to `demo.json`, within a minute.
Then it trains its own model and does the same into OUT/heldout/. For every held-out input (a 128 px crop) a
grid shows
    input | baseline | 8 samples | ground truth
where the baseline is the input brought to the output's size (bicubic upsampling, the grey image, the JPEG, the
night photo; none for layouts). `demo.json` holds, for the trained model (`mean`, `per_input`) and the built-in
one (`builtin`, the same keys; null if there is none), the best-of-8 and mean LPIPS-VGG (lower is better) and
PSNR against the ground truth, the baseline's, and the mean LPIPS between pairs of samples (how different they
are); `ours_*` are the numbers of the model that block describes; `seconds`, the wall time of each part
(weights, built-in model, training, the trained model's samples and scores). Running it again reuses the trained
model.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path

import torch

from chimle import builtin, tasks, weights
from chimle.files import atomic_write, check_folder
from chimle.config import resolve
from chimle.data import builtin_photos, center_crop, list_images, load_image, save_image
from chimle.evaluate import score_input
from chimle.perceptual import LPIPS
from chimle.sample import Model, image_grid
from chimle.run import RunFiles
from chimle.train import train

SAMPLES = 8
TILE = 128  # held-out tile side, px
DEFAULT_TASK = "super-resolution"  # `chimle demo` without --task; its output goes to runs/demo


def make_pairs(task: tasks.Task, photos: Path, out: Path) -> Path:
    """The photos of a folder as A|B training pairs in `out` (the task's demo input left, the photo right), for a
    task whose inputs are not derived from its targets (the paired task: night shots); made once."""
    done = out / ".complete"
    if not done.is_file():
        for i, path in enumerate(list_images(photos)):
            photo = load_image(path)
            save_image(torch.cat([task.demo_input(photo, i), photo], dim=-1), out / f"{path.stem}.png")
        atomic_write(done, b"")
    return out


def heldout(task: tasks.Task, model: Model, size: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, model input, ground truth) for four size x size tiles from the centre of each held-out photo."""
    from chimle.labels import builtin_layouts, load_labels, one_hot, palette_of

    examples = []
    for number, path in enumerate(list_images(builtin_photos("heldout"))):
        photo = load_image(path)
        if task.input_kind == "labels":
            palette = palette_of(model.config)
            given = one_hot(load_labels(builtin_layouts("heldout") / f"{path.stem}.png", palette), palette.channels)
        elif task.demo_input is not None:
            given = task.demo_input(photo, 1000 + number)
        else:
            given = None
        centre = center_crop(photo, 2 * size)
        given_centre = None if given is None else center_crop(given, 2 * size)
        for i, (r, c) in enumerate(itertools.product((0, size), (0, size))):
            target = centre[:, r : r + size, c : c + size]
            if given_centre is None:
                given_tile = task.input_for(target[None], model.config)[0]
            else:
                given_tile = given_centre[:, r : r + size, c : c + size]
            examples.append((f"{path.stem}-{i}", given_tile, target))
    return examples


def evaluate(model: Model, grids: Path, size: int) -> dict:
    """Samples, the baseline and metrics for every held-out tile (chimle.evaluate.score_input); a grid per tile
    into `grids`."""
    lpips = LPIPS("vgg")
    task = model.task
    baseline = task.baseline
    rows = {}
    for name, given, target in heldout(task, model, size):
        scored = score_input(model, given, target, lpips, n=SAMPLES, seed=0)
        base = [] if scored.baseline is None else [scored.baseline[0]]
        image_grid([[task.show_input(given, model.config), *base, *scored.samples, target]], grids / f"{name}_grid.png")
        m = scored.numbers
        rows[name] = {
            "ours_best_lpips": m["best_lpips"], "ours_mean_lpips": m["mean_lpips"],
            "ours_best_psnr": m["best_psnr"], "ours_mean_psnr": m["mean_psnr"],
            **({"baseline_lpips": m["baseline_lpips"], "baseline_psnr": m["baseline_psnr"]} if base else {}),
            "ours_diversity_lpips": m["diversity"],
        }
    keys = next(iter(rows.values())).keys()
    mean = {k: sum(r[k] for r in rows.values()) / len(rows) for k in keys}
    return {
        "task": task.name,
        "protocol": f"{len(rows)} held-out {size}x{size} px tiles of the built-in held-out photos; "
                    f"{SAMPLES} samples per input, seed 0; LPIPS v0.1 VGG16; PSNR on RGB in [0, 1]"
                    + (f"; baseline: {baseline}" if baseline else ""),
        "mean": mean,
        "per_input": rows,
    }


def run_demo(out: str | Path | None = None, task: str = DEFAULT_TASK, preset: str = "small",
             overrides: list[str] | None = None) -> dict:
    laps = Laps()
    # Fetch weights (once).
    weights.fetch(log=lambda line: None)
    laps("weights")
    entry = tasks.get(task)
    out = Path(out or ("runs/demo" if task == DEFAULT_TASK else f"runs/demo-{task}"))
    check_folder(out)

    # The built-in model first: its grids and numbers within a minute.
    shipped = demo_builtin(task, out)
    laps("builtin")

    # Train, or reuse the finished run.
    overrides = list(overrides or [])
    if entry.demo_input is not None:
        overrides.insert(0, f"data.path={make_pairs(entry, builtin_photos('train'), out / 'pairs')}")
    config = resolve(task=task, preset=preset, overrides=overrides)
    files = RunFiles(out)
    resume = files.config_file.is_file()
    print(f"{'resuming' if resume else 'training'} a '{preset}' {task} model on the built-in data -> {out}")
    model_file = train(config, out, resume=resume, device="cpu")
    laps("train")

    # Evaluate on the held-out photos.
    model = Model.load(model_file, device="cpu")
    report = {**evaluate(model, out / "heldout", size=TILE), "builtin": shipped}
    laps("evaluate")
    report["seconds"] = laps.seconds
    atomic_write(out / "demo.json", (json.dumps(report, indent=2) + "\n").encode())
    print(f"\n{report['protocol']}\n")
    rows = [(f"built-in ({shipped['model']})", shipped["mean"])] if shipped else []
    rows.append((f"trained here ('{preset}')", report["mean"]))
    print("\n".join(table(rows, entry.baseline)))
    print(f"\ngrids: {out / 'heldout'}" + (f" and {out / 'heldout-builtin'}" if shipped else "")
          + f"   report: {out / 'demo.json'}")
    print(laps.line())
    m = report["mean"]
    files.log(f"demo: best-of-8 LPIPS {m['ours_best_lpips']:.4f}"
              + (f" vs baseline {m['baseline_lpips']:.4f}" if "baseline_lpips" in m else "")
              + (f" vs built-in {shipped['mean']['ours_best_lpips']:.4f}" if shipped else ""))
    if not math.isfinite(m["ours_best_lpips"]):
        raise FloatingPointError("the demo model produced non-finite outputs")
    return report


class Laps:
    """Wall seconds of each part of the demo, in order (what a user waits for, installs aside)."""

    NAMES = {"weights": "weights", "builtin": "built-in model", "train": "training",
             "evaluate": "samples and scores"}

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.last, 1)
        self.last = now

    def line(self) -> str:
        parts = ", ".join(f"{self.NAMES[k]} {duration(v)}" for k, v in self.seconds.items())
        return f"took {duration(sum(self.seconds.values()))}: {parts}"


def duration(seconds: float) -> str:
    """A duration as the demo prints it: "7 min 03 s", "41 s"."""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def demo_builtin(task: str, out: Path) -> dict | None:
    """Sample the built-in model of `task` on the held-out tiles: grids into out/heldout-builtin/, its numbers
    printed and written to out/demo.json. None, said in one line, if this version has no such model."""
    name = builtin.PREFIX + task
    if task not in builtin.names():
        print(f"no built-in {task} model in this version of chimle: only the model trained here is shown")
        return None
    print(f"sampling the built-in model {name} on the held-out photos")
    model = Model.load(name, device="cpu")
    report = evaluate(model, out / "heldout-builtin", size=TILE)
    shipped = {"model": name, "mean": report["mean"], "per_input": report["per_input"]}
    atomic_write(out / "demo.json", (json.dumps({"task": task, "protocol": report["protocol"], "builtin": shipped},
                                                indent=2) + "\n").encode())
    print(f"\n{report['protocol']}\n")
    print("\n".join(table([(f"built-in ({name})", report["mean"])], tasks.get(task).baseline)))
    print(f"\ngrids: {out / 'heldout-builtin'}   report: {out / 'demo.json'}\n")
    return shipped


def table(rows: list[tuple[str, dict]], baseline: str | None) -> list[str]:
    """Lines of a table of the mean numbers of each (label, mean) row, then the baseline's, if any."""
    width = max(24, *(len(label) for label, _ in rows))
    lines = [f"{'':{width}s} {'best-of-8 LPIPS':>16s} {'mean LPIPS':>11s} {'best-of-8 PSNR':>15s} {'mean PSNR':>10s} "
             f"{'diversity':>10s}" + (f" {'best-of-8 / ' + baseline:>22s}" if baseline else "")]
    for label, m in rows:
        ratio = f" {m['ours_best_lpips'] / m['baseline_lpips']:22.3f}" if baseline and "baseline_lpips" in m else ""
        lines.append(f"{label:{width}s} {m['ours_best_lpips']:16.4f} {m['ours_mean_lpips']:11.4f} "
                     f"{m['ours_best_psnr']:15.2f} {m['ours_mean_psnr']:10.2f} {m['ours_diversity_lpips']:10.4f}"
                     + ratio)
    # One baseline row, or one per model where their inputs differ (another number of levels: another scale).
    bases = {round(m["baseline_lpips"], 6): (label, m) for label, m in rows if baseline and "baseline_lpips" in m}
    for label, m in bases.values():
        name = baseline if len(bases) == 1 else f"{baseline} (input of {label.split(' (')[0]})"
        lines.append(f"{name:{width}s} {m['baseline_lpips']:16.4f} {m['baseline_lpips']:11.4f} "
                     f"{m['baseline_psnr']:15.2f} {m['baseline_psnr']:10.2f} {0:10.4f}")
    lines.append("diversity: mean LPIPS between two samples of one input (0 = identical)")
    return lines
