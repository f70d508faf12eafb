"""`chimle demo` (= `make demo`): train a small model on the built-in data on the CPU, then show what it does on
held-out photos it never saw.

    chimle demo                                  # x16 super-resolution, < 10 minutes on a 2-core CPU; runs/demo
    chimle demo --task colourization             # runs/demo-colourization
    chimle demo --task decompression             # JPEG quality 10
    chimle demo --task layout                    # the built-in label maps (scripts/make_layouts.py)
    chimle demo --task paired                    # synthetic night -> day pairs made from the built-in photos
    chimle demo --out runs/demo2 -o train.rounds=24

For every held-out input (a 128 px crop) it writes a grid
    input | baseline | 8 samples | ground truth
where the baseline is the input brought to the output's size (bicubic upsampling, the grey image, the JPEG, the
night photo; none for layouts), and `demo.json` with, for ours and for the baseline: the best-of-8 and mean
LPIPS-VGG (lower is better) and PSNR against the ground truth, and the mean LPIPS between pairs of our samples
(how different they are). Running it again reuses the trained model.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import torch

from chimle import tasks, weights
from chimle.config import resolve
from chimle.data import builtin_photos, center_crop, list_images, load_image, save_image, seeded
from chimle.metrics.image import psnr
from chimle.perceptual import LPIPS
from chimle.sample import Model, image_grid
from chimle.train import RunFiles, train

SAMPLES = 8
TILE = 128  # held-out tile side, px
BASELINES = {"super-resolution": "bicubic", "colourization": "grey", "decompression": "JPEG", "paired": "night"}


def night(photo: torch.Tensor, seed: int) -> torch.Tensor:
    """A synthetic night shot of a (3, H, W) photo: much darker, blue, with sensor noise. The paired demo's input."""
    dark = photo.pow(2.2) * torch.tensor([0.25, 0.3, 0.5]).view(3, 1, 1)
    noise = torch.randn(photo.shape, generator=seeded(seed, 7)) * 0.015
    return (dark + noise).clamp(0, 1)


def make_night_pairs(out: Path) -> Path:
    """The built-in training photos as A|B pairs (night left, photo right) in out, for the paired task."""
    for i, path in enumerate(list_images(builtin_photos("train"))):
        photo = load_image(path)
        save_image(torch.cat([night(photo, i), photo], dim=-1), out / f"{path.stem}.png")
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
        elif task.name == "paired":
            given = night(photo, 1000 + number)
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


def evaluate(model: Model, out: Path, size: int) -> dict:
    """Samples, the baseline and metrics for every held-out tile; grids into out/heldout/."""
    lpips = LPIPS("vgg")
    task = model.task
    baseline = BASELINES.get(task.name)
    rows = {}
    for name, given, target in heldout(task, model, size):
        samples = model.sample(given, n=SAMPLES, seed=0)
        shown = task.show_input(given, model.config)
        row = {}
        with torch.no_grad():
            ours_lpips = lpips(samples, target[None])
            pairs = torch.combinations(torch.arange(SAMPLES))
            diversity = lpips(samples[pairs[:, 0]], samples[pairs[:, 1]]).mean()
            ours_psnr = psnr(samples, target[None])
            grid = [shown, *samples, target]
            if baseline:
                base = tasks.resize(given[None], target.shape[-2:])
                row = {"baseline_lpips": lpips(base, target[None]).item(), "baseline_psnr": psnr(base, target[None]).item()}
                grid.insert(1, base[0])
        image_grid([grid], out / "heldout" / f"{name}_grid.png")
        rows[name] = {
            "ours_best_lpips": ours_lpips.min().item(), "ours_mean_lpips": ours_lpips.mean().item(),
            "ours_best_psnr": ours_psnr.max().item(), "ours_mean_psnr": ours_psnr.mean().item(),
            **row, "ours_diversity_lpips": diversity.item(),
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


def run_demo(out: str | Path | None = None, task: str = "super-resolution", preset: str = "small",
             overrides: list[str] | None = None) -> dict:
    # Fetch weights (once).
    weights.fetch(log=lambda line: None)
    # Train, or reuse the finished run.
    out = Path(out or ("runs/demo" if task == "super-resolution" else f"runs/demo-{task}"))
    overrides = list(overrides or [])
    if task == "paired":
        overrides.insert(0, f"data.path={make_night_pairs(out / 'pairs')}")
    config = resolve(task=task, preset=preset, overrides=overrides)
    resume = (out / "config.yaml").is_file()
    print(f"{'resuming' if resume else 'training'} a '{preset}' {task} model on the built-in data -> {out}")
    model_file = train(config, out, resume=resume, device="cpu")
    # Evaluate on the held-out photos.
    model = Model.load(model_file, device="cpu")
    report = evaluate(model, out, size=TILE)
    (out / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["mean"]
    print(f"\n{report['protocol']}\n")
    print(f"{'':10s} {'best-of-8 LPIPS':>16s} {'mean LPIPS':>11s} {'best-of-8 PSNR':>15s} {'mean PSNR':>10s}")
    print(f"{'ours':10s} {m['ours_best_lpips']:16.4f} {m['ours_mean_lpips']:11.4f} {m['ours_best_psnr']:15.2f} "
          f"{m['ours_mean_psnr']:10.2f}")
    if "baseline_lpips" in m:
        name = BASELINES[task]
        print(f"{name:10s} {m['baseline_lpips']:16.4f} {m['baseline_lpips']:11.4f} {m['baseline_psnr']:15.2f} "
              f"{m['baseline_psnr']:10.2f}")
    print(f"\nmean LPIPS between two of our samples: {m['ours_diversity_lpips']:.4f} (0 = identical)")
    print(f"grids: {out / 'heldout'}   report: {out / 'demo.json'}")
    RunFiles(out).log(f"demo: best-of-8 LPIPS {m['ours_best_lpips']:.4f}"
                      + (f" vs baseline {m['baseline_lpips']:.4f}" if "baseline_lpips" in m else ""))
    if not math.isfinite(m["ours_best_lpips"]):
        raise FloatingPointError("the demo model produced non-finite outputs")
    return report
