"""Sampling: many outputs per input, each reproducible on its own.

    chimle sample --model runs/sr --input photo.png -n 8 --seed 0 --out samples/
    chimle sample --model runs/sr --input photo.png -n 8 --keep-levels 2 --from-seed 3 --out samples/   # vary details
    chimle sample --model runs/sr --input photo.png --sources 3:1,3:1,8:0,8:0 --out chosen/            # one exact image
    chimle sample --model runs/sr --input big.png -n 4 --tile 32 --overlap 8 --out samples/           # bounded memory

    import chimle
    model = chimle.load("runs/sr")
    images = model.sample(image, n=8, seed=0)              # (8, 3, H, W) in [0, 1]
    details = model.vary(image, seed=0, keep_levels=2, n=8, index=3)          # keep the coarse levels of sample 3
    structure = model.vary(image, seed=5, keep_levels=[2, 3], n=8, index=3)   # keep its fine levels instead

The code of level l of a sample is drawn from its own CPU generator seeded from (seed, index, l), its
*source* (seed, index), then moved to the device, so one sample can be regenerated alone and CPU and GPU draw
the same codes. Sample k of a seed takes every level from (seed, k). A variation keeps the sources of some
levels of the sample it varies and draws the others from (new seed, j): keeping the coarse levels keeps the
structure and varies the details; keeping the fine ones does the reverse. After any number of variations an
image is named exactly by its list of per-level sources, which every saved sample records (a PNG text chunk)
and `--sources` renders again.
"""

from __future__ import annotations

import io
import json
import math
import re
import shlex
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from chimle import __version__, builtin, devices, streams, tasks
from chimle.checkpoint import load_model
from chimle.files import atomic_write, check_folder
from chimle.config import Config, ConfigError
from chimle.data import DataError, list_images, load_image, save_image, to_uint8
from chimle.generator import Generator
from chimle.search import fix
from chimle.tasks import TaskError
from chimle.tiling import Tiling, render_tiled

Source = tuple[int, int]  # (seed, sample index) whose stream draws a level's code


def codes_from_sources(code_sizes: list[int], sources: list[Source]) -> list[torch.Tensor]:
    """Codes (1, size) per level, level l drawn from the stream of sources[l] = (seed, index)."""
    return [torch.randn(1, size, generator=streams.sample_code(seed, index, level)) for level, (size, (seed, index))
            in enumerate(zip(code_sizes, sources))]


def format_sources(sources: list[Source]) -> str:
    """'seed:index,seed:index,...', coarse level first: how an image is named on the command line."""
    return ",".join(f"{seed}:{index}" for seed, index in sources)


SOURCES_PATTERN = re.compile(r"\d+:\d+(,\d+:\d+)*")
MAX_DIGITS = 18  # seeds and sample indices are below 10**18


def parse_sources(text: str, levels: int) -> list[Source]:
    """The per-level sources of 'seed:index,...' (one pair per level, coarse to fine)."""
    text = text.strip().replace(" ", "")
    shown = repr(text) if len(text) <= 60 else repr(text[:57] + "...")
    if not SOURCES_PATTERN.fullmatch(text):
        raise ConfigError(f"sources {shown}: give seed:index for each level, coarse to fine, e.g. "
                          f"{format_sources([(3, 1)] * levels)}")
    if any(len(number) > MAX_DIGITS for number in re.split("[:,]", text)):
        raise ConfigError(f"sources {shown}: seeds and sample indices are whole numbers below 10**{MAX_DIGITS}")
    sources = [(int(seed), int(index)) for seed, index in (pair.split(":") for pair in text.split(","))]
    if len(sources) != levels:
        raise ConfigError(f"sources {shown} name {len(sources)} level(s); the model has {levels}")
    return sources


def kept_levels(keep_levels: int | Iterable[int], levels: int) -> set[int]:
    """The levels a variation keeps: K means the K coarsest (0..K-1); a collection names them (0 = coarsest)."""
    if isinstance(keep_levels, int):
        if not 0 <= keep_levels <= levels:
            raise ValueError(f"keep_levels must be in 0..{levels}, got {keep_levels}")
        return set(range(keep_levels))
    keep = {int(level) for level in keep_levels}
    if not keep <= set(range(levels)):
        raise ValueError(f"kept levels must be in 0..{levels - 1}, got {sorted(keep)}")
    return keep


def variations(base: list[Source], keep: set[int], seed: int, n: int) -> list[list[Source]]:
    """n per-level source lists: the levels in `keep` from `base`, the others from (seed, j) for variation j."""
    return [[base[level] if level in keep else (seed, j) for level in range(len(base))] for j in range(n)]


class Model:
    """A trained generator with its task: turns user images into many outputs.

    A Model's weights never change, so it prepares its generator once (chimle.search.fix, the lasting form of the
    code search's fixed_weights): weight normalisation folded into plain weights and 4-D weights in channels-last layout (oneDNN's
    convolutions run 1.3-1.5x faster that way on a CPU), every render in inference mode. The generator it is given
    is changed accordingly; give it a copy to keep training the original."""

    def __init__(self, generator: Generator, config: Config, device: torch.device | str = "cpu",
                 tiling: Tiling | None = None, path: str | Path | None = None):
        self.generator = fix(generator.to(device).eval().requires_grad_(False))
        self.config = config
        self.task = tasks.get(config.task)
        self.device = torch.device(device)
        self.tiling = tiling  # render inputs larger than one tile tile by tile (see chimle.tiling)
        self.path = path  # the file or run directory it was loaded from, recorded with its samples

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, tile: int | None = None, overlap: int = 8,
             tile_stats: str = "image") -> Model:
        """A model file or run directory; `tile` (input px), `overlap` and `tile_stats` switch on tiled
        rendering (see chimle.tiling)."""
        device = devices.pick(device)
        devices.configure()
        generator, config = load_model(builtin.locate(path), device)
        return cls(generator, config, device, Tiling(tile, overlap, tile_stats) if tile else None, path)

    @property
    def levels(self) -> int:
        return self.config.model.levels

    def inputs(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The generator's input pyramid for one image (C, H, W) in [0, 1]."""
        image = self.task.check_input(image, self.config)
        return [x.to(self.device) for x in self.task.inputs(image[None].float(), self.config)]

    def load_input(self, path: str | Path) -> torch.Tensor:
        """A user's input file as this model takes it (an image in [0, 1], or a one-hot label map)."""
        return self.task.load_input(path, self.config)

    def as_input(self, image: torch.Tensor | str | Path | Image.Image) -> torch.Tensor:
        """A tensor (C, H, W) in [0, 1] as it is; a file path read with `load_input`; a PIL image as RGB."""
        if isinstance(image, (str, Path)):
            return self.load_input(image)
        if isinstance(image, Image.Image):
            return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).float().div_(255)
        return image

    @torch.no_grad()
    def render(self, image: torch.Tensor | str | Path | Image.Image, sources: list[list[Source]],
               batch: int = 1) -> torch.Tensor:
        """Final outputs (len(sources), 3, H, W) for one image, one list of per-level code sources each (tile by
        tile if the model has a tiling and the input is larger than a tile).

        Each output is rendered alone by default, so its pixels do not depend on which other samples were drawn
        with it: a batch > 1 is faster on a GPU but changes the last float bits (and so, rarely, a rounded
        pixel), and then `--sources` reproduces a sample only to within that."""
        if any(len(s) != self.levels for s in sources):
            raise ValueError(f"every list of sources needs one (seed, index) per level ({self.levels})")
        image = self.as_input(image)
        inputs = self.inputs(image)
        size = tuple(image.shape[-2:])
        sizes = self.generator.code_sizes(self.generator.start(inputs))
        tiled = self.tiling is not None and max(size) > self.tiling.size
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(sources), batch):
                chunk = sources[start : start + batch]
                codes = [codes_from_sources(sizes, s) for s in chunk]
                stacked = [torch.cat([c[level] for c in codes]).to(self.device) for level in range(self.levels)]
                repeated = [x.expand(len(chunk), -1, -1, -1) for x in inputs]
                if tiled:
                    outputs.append(render_tiled(self.generator, self.task, repeated, stacked, self.tiling, size).cpu())
                else:
                    raw = self.generator(repeated, stacked)[-1]
                    outputs.append(self.task.image(raw, repeated, self.levels - 1).cpu())
        return torch.cat(outputs)  # outside inference mode: an ordinary tensor

    def sample(self, image: torch.Tensor | str | Path | Image.Image, n: int = 8, seed: int = 0,
               keep_levels: int | Iterable[int] = 0, from_index: int = 0, batch: int = 1) -> torch.Tensor:
        """n outputs (n, 3, H, W); output k is sample (seed, k), with the levels `keep_levels` names (K: the K
        coarsest) taken from sample (seed, from_index). `batch`: see `render`."""
        keep = kept_levels(keep_levels, self.levels)
        return self.render(image, variations([(seed, from_index)] * self.levels, keep, seed, n), batch)

    def vary(self, image: torch.Tensor | str | Path | Image.Image, seed: int, keep_levels: int | Iterable[int],
             n: int = 8, index: int = 0, base: list[Source] | None = None) -> torch.Tensor:
        """n variations (n, 3, H, W) of one sample: the levels `keep_levels` names (an int K: the K coarsest, so
        the details vary; a collection such as [2, 3]: those levels, so the structure varies) keep the codes of
        `base` (per-level sources; default: sample (seed, index)); the others of variation j come from (seed, j).
        With the default base, variation `index` is the sample itself."""
        base = base if base is not None else [(seed, index)] * self.levels
        if len(base) != self.levels:
            raise ValueError(f"base needs one (seed, index) per level ({self.levels}), got {len(base)}")
        return self.render(image, variations(list(base), kept_levels(keep_levels, self.levels), seed, n))

    @torch.no_grad()
    def zero_codes(self, image: torch.Tensor) -> torch.Tensor:
        """The output (1, 3, H, W) with every code zero (the codes' mean): one fixed output, what a deterministic
        model would give; a baseline for evaluations."""
        inputs = self.inputs(image)
        sizes = self.generator.code_sizes(self.generator.start(inputs))
        with torch.inference_mode():
            raw = self.generator(inputs, [torch.zeros(1, size, device=self.device) for size in sizes])[-1]
            output = self.task.image(raw, inputs, self.levels - 1).cpu()
        return output.clone()  # outside inference mode: an ordinary tensor


def load(path: str | Path, device: str | None = None, tile: int | None = None, overlap: int = 8,
         tile_stats: str = "image") -> Model:
    """A trained model (run directory or .safetensors file) ready to sample; see `Model`."""
    return Model.load(path, device, tile, overlap, tile_stats)


PROVENANCE_KEY = "chimle"  # the PNG text chunk that holds a sample's provenance (JSON)


def provenance(model: Model, sources: list[Source], input_name: str) -> dict:
    """What names a sample: its model, input and per-level sources, and the command that renders it again."""
    tiling = model.tiling
    tile = [tiling.size, tiling.overlap, tiling.stats] if tiling else None
    command = ["chimle", "sample", "--model", str(model.path or "MODEL"), "--input", input_name,
               "--sources", format_sources(sources)]
    if tiling:
        command += ["--tile", str(tiling.size), "--overlap", str(tiling.overlap), "--tile-stats", tiling.stats]
    return {"sources": format_sources(sources), "model": str(model.path), "task": model.config.task,
            "levels": model.levels, "tile": tile, "input": input_name, "device": model.device.type,
            "command": shlex.join([*command, "--out", "OUT"]), "chimle": __version__}


def sources_tag(sources: list[Source]) -> str:
    """Sources as a file-name part: 3:1,8:0 -> 3-1_8-0."""
    return format_sources(sources).replace(":", "-").replace(",", "_")


def png_bytes(image: torch.Tensor, info: dict | None = None) -> bytes:
    """A (C, H, W) image in [0, 1] as PNG bytes (8 bits, rounded), `info` as JSON in its text chunk."""
    array = to_uint8(image)
    text = PngImagePlugin.PngInfo()
    if info is not None:
        text.add_text(PROVENANCE_KEY, json.dumps(info, sort_keys=True))
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buffer, format="PNG", pnginfo=text)
    return buffer.getvalue()


def save_sample(image: torch.Tensor, path: str | Path, info: dict) -> None:
    """Write a sample as PNG with its provenance, atomically (see chimle.files.atomic_write)."""
    atomic_write(path, png_bytes(image, info))


def read_provenance(path: str | Path) -> dict:
    """The provenance a sample PNG written by chimle records."""
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get(PROVENANCE_KEY)
    except (OSError, UnidentifiedImageError) as error:
        raise DataError(f"{path}: not a readable PNG ({error})") from None
    if text is None:
        raise DataError(f"{path}: records no chimle sources (it was not saved by `chimle sample` or the web page)")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise DataError(f"{path}: its chimle record is not valid JSON") from None


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


def sources_option(text: str, levels: int) -> list[Source]:
    """`--sources`: 'seed:index,...' per level, or a PNG written by chimle (its recorded sources)."""
    if not SOURCES_PATTERN.fullmatch(text.strip().replace(" ", "")) and _is_file(text):
        return parse_sources(read_provenance(text)["sources"], levels)
    return parse_sources(text, levels)


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # a name too long for the file system, or with a NUL byte
        return False


def sample_command(args) -> None:
    """`chimle sample`: every sample as STEM_K.png and a grid STEM_grid.png per input; with --sources, the one
    image those sources name as STEM_SOURCES.png. Every sample records its sources in a PNG text chunk. Every
    input is checked before anything is rendered, and samples are rendered and written one at a time."""
    out = check_folder(args.out)
    model = Model.load(args.model, args.device, args.tile, args.overlap, args.tile_stats)
    if args.keep_levels > model.levels:
        raise ConfigError(f"--keep-levels {args.keep_levels}: the model has {model.levels} levels")
    chosen = sources_option(args.sources, model.levels) if args.sources else None
    files = list_images(args.input)
    targets = {p.stem: p for p in list_images(args.target)} if args.target else {}
    check_inputs(model, files, args.max_output_pixels)
    for path in files:
        image = model.load_input(path)
        if chosen is not None:
            name = out / f"{path.stem}_{sources_tag(chosen)}.png"
            save_sample(model.render(image, [chosen])[0], name, provenance(model, chosen, path.name))
            print(f"{path.name}: sources {format_sources(chosen)} -> {name}")
            continue
        sources = variations([(args.seed, args.from_seed)] * model.levels, kept_levels(args.keep_levels, model.levels),
                             args.seed, args.num)
        row = [model.task.show_input(image, model.config)]
        for k, chosen_k in enumerate(sources):
            sample = model.render(image, [chosen_k])[0]
            save_sample(sample, out / f"{path.stem}_{k}.png", provenance(model, chosen_k, path.name))
            row.append(_thumbnail(sample, len(sources) + 2))
        if path.stem in targets:
            row.append(_thumbnail(load_image(targets[path.stem]), len(sources) + 2))
        image_grid([row], out / f"{path.stem}_grid.png")
        print(f"{path.name}: {len(sources)} samples of {sample.shape[-1]}x{sample.shape[-2]} px -> {out}")


GRID_PIXELS = 16 * 2**20  # largest sample grid a command writes, pixels; larger samples are shown downscaled


def _thumbnail(image: torch.Tensor, columns: int) -> torch.Tensor:
    """`image` as one of `columns` cells of a grid of at most GRID_PIXELS pixels (downscaled by an integer
    factor where needed), so that a grid of large samples needs no more memory than that."""
    factor = math.ceil((columns * image.shape[-2] * image.shape[-1] / GRID_PIXELS) ** 0.5)
    return image if factor <= 1 else F.avg_pool2d(image[None], factor, ceil_mode=True)[0]


def check_inputs(model: Model, files: list[Path], max_output_pixels: int) -> None:
    """Refuse, listing every one, the inputs the model cannot take: unreadable, of sides it cannot use, or whose
    output would be larger than `max_output_pixels` (the network's memory grows with it)."""
    problems = []
    scale = model.task.output_scale(model.levels)
    for path in files:
        try:
            image = model.task.check_input(model.load_input(path), model.config)
        except DataError as error:
            problems.append(str(error))
            continue
        except TaskError as error:
            problems.append(f"{path}: {error}")
            continue
        height, width = image.shape[-2:]
        if width * height * scale * scale > max_output_pixels:
            problems.append(f"{path}: {width}x{height} px gives a {width * scale}x{height * scale} px output, more "
                            f"than --max-output-pixels {max_output_pixels:,}: downscale it, or render it in tiles "
                            "(--tile PX) with a larger --max-output-pixels")
    if problems:
        listing = "\n  ".join(problems[:20]) + (f"\n  ... {len(problems)} in all" if len(problems) > 20 else "")
        raise DataError(f"{len(problems)} input(s) cannot be sampled (nothing was rendered):\n  {listing}")
