"""Sampling: many outputs per input, each reproducible on its own.

    chimle sample --model runs/sr --input photo.png -n 8 --seed 0 --out samples/
    chimle sample --model runs/sr --input photo.png -n 8 --keep-levels 2 --from-seed 3 --out samples/   # vary details

    import chimle
    model = chimle.load("runs/sr")
    images = model.sample(image, n=8, seed=0)              # (8, 3, H, W) in [0, 1]
    details = model.vary(image, seed=0, index=3, keep_levels=2, n=8)

The code of each level of sample k is drawn from its own CPU generator seeded from (seed, k, level), then
moved to the device, so one sample can be regenerated alone and CPU and GPU draw the same codes. Keeping the
first K levels of sample S and drawing the rest afresh keeps the coarse structure and varies the details.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from chimle import tasks
from chimle.checkpoint import load_model
from chimle.config import Config, ConfigError
from chimle.data import DataError, list_images, load_image, save_image, seeded
from chimle.generator import Generator

Source = tuple[int, int]  # (seed, sample index) whose stream draws a level's code


def codes_from_sources(code_sizes: list[int], sources: list[Source]) -> list[torch.Tensor]:
    """Codes (1, size) per level, level l drawn from the stream of sources[l] = (seed, index)."""
    return [torch.randn(1, size, generator=seeded(seed, index, level)) for level, (size, (seed, index))
            in enumerate(zip(code_sizes, sources))]


class Model:
    """A trained generator with its task: turns user images into many outputs."""

    def __init__(self, generator: Generator, config: Config, device: torch.device | str = "cpu"):
        self.generator = generator.to(device).eval().requires_grad_(False)
        self.config = config
        self.task = tasks.get(config.task)
        self.device = torch.device(device)

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> Model:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        generator, config = load_model(path, device)
        return cls(generator, config, device)

    @property
    def levels(self) -> int:
        return self.config.model.levels

    def inputs(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The generator's input pyramid for one image (C, H, W) in [0, 1]."""
        if image.ndim != 3:
            raise DataError(f"expected one image (C, H, W), got a tensor of shape {tuple(image.shape)}")
        if self.config.model.in_channels == 1 and image.shape[0] == 3:
            image = image.mean(0, keepdim=True)
        multiple = 1 if self.config.model.wiring == "super-resolution" else 2 ** (self.levels - 1)
        h, w = image.shape[-2:]
        if h % multiple or w % multiple:
            raise DataError(f"an input of {w}x{h} px must have sides that are multiples of {multiple} for this model")
        return [x.to(self.device) for x in self.task.inputs(image[None].float(), self.levels)]

    @torch.no_grad()
    def render(self, image: torch.Tensor, sources: list[list[Source]], batch: int = 8) -> torch.Tensor:
        """Final outputs (len(sources), 3, H, W) for one image, one list of per-level code sources each."""
        inputs = self.inputs(image)
        sizes = self.generator.code_sizes(self.generator.start(inputs))
        outputs = []
        with self.generator.folded():
            for start in range(0, len(sources), batch):
                chunk = sources[start : start + batch]
                codes = [codes_from_sources(sizes, s) for s in chunk]
                stacked = [torch.cat([c[level] for c in codes]).to(self.device) for level in range(self.levels)]
                repeated = [x.expand(len(chunk), -1, -1, -1) for x in inputs]
                raw = self.generator(repeated, stacked)[-1]
                outputs.append(self.task.image(raw, repeated, self.levels - 1).cpu())
        return torch.cat(outputs)

    def sample(self, image: torch.Tensor, n: int = 8, seed: int = 0, keep_levels: int = 0,
               from_index: int = 0) -> torch.Tensor:
        """n outputs (n, 3, H, W); output k is sample (seed, k), with the first keep_levels levels of from_index."""
        if not 0 <= keep_levels <= self.levels:
            raise ValueError(f"keep_levels must be in 0..{self.levels}, got {keep_levels}")
        sources = [[(seed, from_index) if level < keep_levels else (seed, k) for level in range(self.levels)]
                   for k in range(n)]
        return self.render(image, sources)

    def vary(self, image: torch.Tensor, seed: int, index: int, keep_levels: int, n: int = 8) -> torch.Tensor:
        """n variations of sample (seed, index): its first keep_levels levels kept, the finer ones redrawn."""
        return self.sample(image, n=n, seed=seed, keep_levels=keep_levels, from_index=index)


def load(path: str | Path, device: str | None = None) -> Model:
    """A trained model (run directory or .safetensors file) ready to sample."""
    return Model.load(path, device)


def image_grid(rows: list[list[torch.Tensor]], path: str | Path | None = None, pad: int = 2) -> torch.Tensor:
    """Images (C, H, W) laid out in rows, each scaled (nearest) to the largest size; greyscale shown as grey."""
    height = max(img.shape[-2] for row in rows for img in row)
    width = max(img.shape[-1] for row in rows for img in row)
    columns = max(len(row) for row in rows)
    grid = torch.ones(3, len(rows) * (height + pad) + pad, columns * (width + pad) + pad)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            img = img.detach().float().cpu()
            img = img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]
            img = F.interpolate(img[None], size=(height, width), mode="nearest")[0]
            top, left = pad + r * (height + pad), pad + c * (width + pad)
            grid[:, top : top + height, left : left + width] = img.clamp(0, 1)
    if path is not None:
        save_image(grid, path)
    return grid


def sample_command(args) -> None:
    """`chimle sample`: every sample as STEM_K.png and a grid STEM_grid.png per input."""
    model = Model.load(args.model, args.device)
    if args.keep_levels > model.levels:
        raise ConfigError(f"--keep-levels {args.keep_levels}: the model has {model.levels} levels")
    files = list_images(args.input)
    targets = {p.stem: p for p in list_images(args.target)} if args.target else {}
    out = Path(args.out)
    for path in files:
        image = load_image(path, grey=model.config.model.in_channels == 1)
        samples = model.sample(image, n=args.num, seed=args.seed, keep_levels=args.keep_levels,
                               from_index=args.from_seed)
        for k, sample in enumerate(samples):
            save_image(sample, out / f"{path.stem}_{k}.png")
        row = [image, *samples]
        if path.stem in targets:
            row.append(load_image(targets[path.stem]))
        image_grid([row], out / f"{path.stem}_grid.png")
        print(f"{path.name}: {len(samples)} samples of {samples.shape[-1]}x{samples.shape[-2]} px -> {out}")
