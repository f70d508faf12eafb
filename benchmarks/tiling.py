"""How far a tiled render is from the untiled one, and what it costs (chimle.tiling).

    python benchmarks/tiling.py --model runs/demo                     # 32 x 32 input (x16: 512 x 512 out)
    python benchmarks/tiling.py --model runs/demo --size 48 --tiles 8/4 16/8 24/8 --json tiling.json

The input is the centre of a held-out built-in photo resized to --size px. For each tile/overlap (input px) and
each kind of instance-norm statistics it prints the mean, 99th percentile and largest absolute difference to
the untiled render of the same sample (images in [0, 1]), and the time per sample; for scale, the mean
difference between two different samples of the untiled model.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from chimle.data import builtin_photos, center_crop, list_images, load_image
from chimle.sample import Model
from chimle.tasks import resize
from chimle.tiling import Tiling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="run directory or model file")
    parser.add_argument("--size", type=int, default=32, help="input side, px (default: 32)")
    parser.add_argument("--tiles", nargs="+", default=["8/0", "8/4", "16/4", "16/8"], help="TILE/OVERLAP, input px")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the table here")
    args = parser.parse_args()

    model = Model.load(args.model, device="cpu")
    photo = load_image(list_images(builtin_photos("heldout"))[0])
    image = resize(center_crop(photo, min(photo.shape[-2:]))[None], (args.size, args.size))[0]
    pair = [[(args.seed, k)] * model.levels for k in range(2)]
    start = time.perf_counter()
    untiled = model.render(image, pair)
    untiled_time = (time.perf_counter() - start) / 2
    between = (untiled[0] - untiled[1]).abs().mean().item()
    print(f"{model.config.task}, {model.levels} levels: {args.size}x{args.size} px in, "
          f"{untiled.shape[-1]}x{untiled.shape[-2]} px out; untiled {untiled_time:.2f} s per sample; "
          f"two samples differ by {between:.4f} on average\n")
    print(f"{'tile/overlap':>12s} {'stats':>6s} {'mean':>8s} {'p99':>7s} {'max':>7s} {'s/sample':>9s}")
    rows = []
    for spec in args.tiles:
        size, overlap = (int(v) for v in spec.split("/"))
        for stats in ("tile", "image"):
            model.tiling = Tiling(size, overlap, stats)
            start = time.perf_counter()
            tiled = model.render(image, pair[:1])[0]
            seconds = time.perf_counter() - start
            error = (tiled - untiled[0]).abs().flatten()
            row = {"tile": size, "overlap": overlap, "stats": stats, "mean": error.mean().item(),
                   "p99": torch.quantile(error, 0.99).item(), "max": error.max().item(), "seconds": seconds}
            rows.append(row)
            print(f"{spec:>12s} {stats:>6s} {row['mean']:8.4f} {row['p99']:7.3f} {row['max']:7.3f} {seconds:9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "size": args.size, "between_samples": between,
                       "untiled_seconds": untiled_time, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
