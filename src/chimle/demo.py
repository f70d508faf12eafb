"""`chimle demo` (= `make demo`): train a small x16 super-resolution model on the built-in photos on the CPU,
then show what it does on held-out photos it never saw.

    chimle demo                      # about 12 minutes on a 2-core CPU; writes runs/demo
    chimle demo --out runs/demo2 -o train.passes=2

For every held-out input (a 128 px crop, given to the model as 8 x 8 pixels) it writes a grid
    input (nearest) | bicubic | 8 samples | ground truth
and `demo.json` with, for ours and for bicubic: the best-of-8 and mean LPIPS-VGG (lower is better) and PSNR
against the ground truth, and the mean LPIPS between pairs of our samples (how different they are).
Running it again reuses the trained model.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from chimle import weights
from chimle.config import resolve
from chimle.data import builtin_photos, center_crop, list_images, load_image
from chimle.perceptual import LPIPS
from chimle.sample import Model, image_grid
from chimle.tasks import downsample
from chimle.train import RunFiles, train

SAMPLES = 8
TILE = 128  # held-out tile side, px: the model sees 8 x 8 pixels of it


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [0, 1], per image."""
    mse = (x - y).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1 / mse)


def heldout_targets(size: int) -> list[tuple[str, torch.Tensor]]:
    """Four size x size tiles from the centre of each held-out photo."""
    tiles = []
    for path in list_images(builtin_photos("heldout")):
        centre = center_crop(load_image(path), 2 * size)
        for i, (r, c) in enumerate(itertools.product((0, size), (0, size))):
            tiles.append((f"{path.stem}-{i}", centre[:, r : r + size, c : c + size]))
    return tiles


def evaluate(model: Model, out: Path, size: int) -> dict:
    """Samples, bicubic and metrics for every held-out tile; grids into out/heldout/."""
    lpips = LPIPS("vgg")
    factor = model.task.output_scale(model.levels)
    rows = {}
    for name, target in heldout_targets(size):
        low = downsample(target[None], factor)[0]
        samples = model.sample(low, n=SAMPLES, seed=0)
        bicubic = F.interpolate(low[None], size=target.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
        with torch.no_grad():
            ours_lpips = lpips(samples, target[None])
            bicubic_lpips = lpips(bicubic, target[None])
            pairs = torch.combinations(torch.arange(SAMPLES))
            diversity = lpips(samples[pairs[:, 0]], samples[pairs[:, 1]]).mean()
        ours_psnr, bicubic_psnr = psnr(samples, target[None]), psnr(bicubic, target[None])
        image_grid([[low, bicubic[0], *samples, target]], out / "heldout" / f"{name}_grid.png")
        rows[name] = {
            "ours_best_lpips": ours_lpips.min().item(), "ours_mean_lpips": ours_lpips.mean().item(),
            "ours_best_psnr": ours_psnr.max().item(), "ours_mean_psnr": ours_psnr.mean().item(),
            "bicubic_lpips": bicubic_lpips.item(), "bicubic_psnr": bicubic_psnr.item(),
            "ours_diversity_lpips": diversity.item(),
        }
    keys = next(iter(rows.values())).keys()
    mean = {k: sum(r[k] for r in rows.values()) / len(rows) for k in keys}
    return {
        "protocol": f"{len(rows)} held-out {size}x{size} px tiles, input downsampled x{factor} (bicubic, "
                    f"anti-aliased); {SAMPLES} samples per input, seed 0; LPIPS v0.1 VGG16; PSNR on RGB in [0, 1]",
        "mean": mean,
        "per_input": rows,
    }


def run_demo(out: str | Path = "runs/demo", preset: str = "small", overrides: list[str] | None = None) -> dict:
    # Fetch weights (once).
    weights.fetch(log=lambda line: None)
    # Train, or reuse the finished run.
    config = resolve(task="super-resolution", preset=preset, overrides=overrides)
    out = Path(out)
    resume = (out / "config.yaml").is_file()
    print(f"{'resuming' if resume else 'training'} a '{preset}' x16 super-resolution model on the built-in photos "
          f"-> {out}")
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
    print(f"{'bicubic':10s} {m['bicubic_lpips']:16.4f} {m['bicubic_lpips']:11.4f} {m['bicubic_psnr']:15.2f} "
          f"{m['bicubic_psnr']:10.2f}")
    print(f"\nmean LPIPS between two of our samples: {m['ours_diversity_lpips']:.4f} (0 = identical)")
    print(f"grids: {out / 'heldout'}   report: {out / 'demo.json'}")
    RunFiles(out).log(f"demo: best-of-8 LPIPS {m['ours_best_lpips']:.4f} vs bicubic {m['bicubic_lpips']:.4f}")
    if not math.isfinite(m["ours_best_lpips"]):
        raise FloatingPointError("the demo model produced non-finite outputs")
    return report
