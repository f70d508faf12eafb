"""Semantic label maps for layout synthesis: palettes, reading colour-coded or index PNGs, one-hot encoding,
and rebalancing by how rare an example's appearance is (DESIGN.md §2.3).

A label map is either a colour PNG whose colours are those of a palette (Cityscapes' 19 classes by default, any
palette as JSON), or a single-channel PNG of class indices (255 = void). Inside, labels are (H, W) int64 class
numbers with void = the number of classes; the model takes them one-hot with a void channel.

A palette JSON file looks like
    {"classes": [{"name": "road", "colour": [128, 64, 128]}, ...], "void": [[0, 0, 0], [111, 74, 0]]}
where "void" lists extra colours that mean "no class" (optional).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from chimle import streams
from chimle.data import DataError, Example, PairedFolder, read_image
from chimle.streams import Draw

VOID_INDEX = 255  # the void value of index label maps (Cityscapes' trainId convention)


@dataclass(frozen=True)
class Palette:
    names: tuple[str, ...]
    colours: tuple[tuple[int, int, int], ...]  # one per class
    void: tuple[tuple[int, int, int], ...] = ()  # colours that mean "no class"

    @property
    def classes(self) -> int:
        return len(self.colours)

    @property
    def channels(self) -> int:
        """One-hot channels the model takes: the classes and void."""
        return self.classes + 1

    def flat(self) -> tuple[list[int], list[int]]:
        """The class and void colours as flat lists of numbers (how a config stores them)."""
        return [c for rgb in self.colours for c in rgb], [c for rgb in self.void for c in rgb]

    @classmethod
    def from_flat(cls, colours: list[int], void: list[int]) -> Palette:
        triples = [tuple(colours[i : i + 3]) for i in range(0, len(colours), 3)]
        return cls(tuple(f"class {i}" for i in range(len(triples))), tuple(triples),
                   tuple(tuple(void[i : i + 3]) for i in range(0, len(void), 3)))

    def colour_image(self, labels: torch.Tensor) -> torch.Tensor:
        """(H, W) labels as a (3, H, W) colour image in [0, 1] (void black), for grids and the web page."""
        table = torch.tensor([*self.colours, (0, 0, 0)], dtype=torch.float32) / 255
        return table[labels.clamp(0, self.classes)].permute(2, 0, 1)


# Cityscapes' 19 training classes (trainId order) and the colours of its other labels, which count as void.
CITYSCAPES = Palette(
    names=("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
           "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"),
    colours=((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
             (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
             (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)),
    void=((0, 0, 0), (111, 74, 0), (81, 0, 81), (250, 170, 160), (230, 150, 140), (180, 165, 180), (150, 100, 100),
          (150, 120, 90), (0, 0, 90), (0, 0, 110)),
)


def builtin_layouts(split: str = "train") -> Path:
    """The built-in label maps of the built-in photos (see scripts/make_layouts.py): 'train' or 'heldout'."""
    return Path(str(resources.files("chimle").joinpath(f"assets/layouts/{split}")))


def load_palette(spec: str) -> Palette:
    """'cityscapes', 'builtin' (the built-in layouts' palette) or a palette JSON file."""
    if spec == "cityscapes":
        return CITYSCAPES
    path = builtin_layouts().parent / "palette.json" if spec == "builtin" else Path(spec)
    if not path.is_file():
        raise DataError(f"palette '{spec}': no such file; give 'cityscapes', 'builtin' or a JSON palette file")
    try:
        data = json.loads(path.read_text())
        names = tuple(str(c.get("name", f"class {i}")) for i, c in enumerate(data["classes"]))
        colours = tuple(_rgb(c["colour"]) for c in data["classes"])
        void = tuple(_rgb(c) for c in data.get("void", []))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise DataError(f"{path}: not a palette file ({error.__class__.__name__}: {error}); expected "
                        '{"classes": [{"name": ..., "colour": [r, g, b]}, ...], "void": [[r, g, b], ...]}') from None
    if not colours:
        raise DataError(f"{path}: the palette has no classes")
    if len(set(colours)) != len(colours) or set(colours) & set(void):
        raise DataError(f"{path}: a colour appears twice in the palette")
    return Palette(names, colours, void)


def _rgb(value) -> tuple[int, int, int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, int) and 0 <= v < 256
                                                                         for v in value)):
        raise ValueError(f"{value!r} is not an [r, g, b] colour with values in 0..255")
    return tuple(value)


def palette_of(config) -> Palette:
    """The palette a layout config was trained with (stored in it as flat colour lists)."""
    d = config.data
    if d.palette_colours:
        return Palette.from_flat(d.palette_colours, d.void_colours)
    return load_palette(d.palette)


def _is_index_map(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as image:
        return image.mode in ("L", "P", "I", "I;16", "I;16L", "I;16B")


def read_labels(path: str | Path, palette: Palette) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """A label map file as (H, W) int64 labels (void = palette.classes), and the colours (or indices, as
    (i, i, i)) it holds that the palette does not know (empty when the file is fine)."""
    path = Path(path)
    if _is_index_map(path):
        from PIL import Image

        with Image.open(path) as image:
            values = torch.from_numpy(np.asarray(image, dtype=np.int64).copy())
        unknown = sorted({int(v) for v in values.unique()} - set(range(palette.classes)) - {VOID_INDEX})
        labels = torch.where((values >= 0) & (values < palette.classes), values, palette.classes)
        return labels, [(v, v, v) for v in unknown]
    rgb = read_image(path).long()  # (3, H, W)
    keys = (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]
    table = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(palette.colours)}
    table.update({(r << 16) | (g << 8) | b: palette.classes for r, g, b in palette.void})
    present, inverse = keys.unique(return_inverse=True)
    lookup = torch.tensor([table.get(int(k), -1) for k in present], dtype=torch.long)
    unknown = [(int(k) >> 16, (int(k) >> 8) & 255, int(k) & 255) for k, i in zip(present, lookup) if i < 0]
    return lookup.clamp_min(0)[inverse], unknown


def load_labels(path: str | Path, palette: Palette) -> torch.Tensor:
    """A label map file as (H, W) labels; a colour the palette does not know is an error naming it."""
    labels, unknown = read_labels(path, palette)
    if unknown:
        raise DataError(unknown_colours_message({Path(path): unknown}, palette))
    return labels


def unknown_colours_message(problems: dict[Path, list[tuple[int, int, int]]], palette: Palette) -> str:
    lines = [f"{path}: {', '.join(map(str, colours[:8]))}{' ...' if len(colours) > 8 else ''}"
             for path, colours in list(problems.items())[:20]]
    known = ", ".join(f"{n} {c}" for n, c in zip(palette.names, palette.colours))
    return (f"{len(problems)} label map(s) hold colours (or index values) not in the palette:\n  " + "\n  ".join(lines)
            + f"\nthe palette ({palette.classes} classes) is: {known}; void colours: {list(palette.void)}\n"
            "give the right palette with -o data.palette=FILE.json, or fix the label maps")


def one_hot(labels: torch.Tensor, channels: int) -> torch.Tensor:
    """(..., H, W) labels -> (..., channels, H, W) float one-hot."""
    return F.one_hot(labels, channels).movedim(-1, -3).float()


# Rebalancing by appearance rarity ------------------------------------------------------------------------------
# For each class, each image's appearance of it is summarised by the mean colour of its pixels; a Gaussian kernel
# density over those colours (one point per image holding the class) says how common that appearance is, and its
# inverse is the image's rarity for the class. Training examples are drawn in proportion to the mean rarity over
# a set of frequent classes, and the loss weighs each pixel of such a class by its image's rarity.


def class_colours(image: torch.Tensor, labels: torch.Tensor, classes: int, min_pixels: int = 16) -> torch.Tensor:
    """Mean RGB colour of each class's pixels in one image: (classes, 3), NaN where a class has too few pixels."""
    flat = labels.flatten()
    counts = torch.bincount(flat, minlength=classes + 1)[:classes].double()
    sums = torch.zeros(classes + 1, 3, dtype=torch.float64).index_add_(0, flat, image.flatten(1).T.double())[:classes]
    means = sums / counts.clamp_min(1)[:, None]
    means[counts < min_pixels] = float("nan")
    return means


def rarity(colours: torch.Tensor) -> torch.Tensor:
    """Per image, the inverse of a leave-one-out Gaussian kernel density (Scott's bandwidth) of its colour among
    the other images' colours, normalised to mean 1; (images,) with NaN where the image lacks the colour."""
    out = torch.full((colours.shape[0],), float("nan"), dtype=torch.float64)
    present = ~colours.isnan().any(1)
    points = colours[present]
    n = points.shape[0]
    if n < 3:
        out[present] = 1.0
        return out
    bandwidth = (points.std(0).mean().clamp_min(1e-3) * n ** (-1 / 7)).item()  # Scott's rule in 3 dimensions
    d2 = torch.cdist(points, points).pow(2)
    kernel = torch.exp(-d2 / (2 * bandwidth**2))
    density = (kernel.sum(1) - 1) / (n - 1) + 1e-12  # leave one out
    score = 1 / density
    out[present] = score / score.mean()
    return out


@dataclass
class Rebalancing:
    """What rebalancing needs: a sampling weight per image and a loss weight per (image, class)."""

    image_weights: torch.Tensor  # (images,), proportional to how often each image is drawn
    pixel_weights: torch.Tensor  # (images, classes + 1) loss weight of a pixel of each class; 1 for other classes
    classes: list[int]  # the classes that drive it


def rebalancing(images: list[torch.Tensor], labels: list[torch.Tensor], palette: Palette, classes: list[int],
                floor: float) -> Rebalancing:
    """Rarity-based sampling and loss weights for a set of (image, labels) pairs; `classes` empty = the
    classes present in at least half of the images."""
    colours = torch.stack([class_colours(x, y, palette.classes) for x, y in zip(images, labels)])  # (N, K, 3)
    if not classes:
        frequency = (~colours.isnan().any(2)).double().mean(0)
        classes = [k for k in range(palette.classes) if frequency[k] >= 0.5]
    n = len(images)
    scores = torch.stack([rarity(colours[:, k]) for k in classes], dim=1) if classes else torch.ones(n, 0)
    mean = torch.nanmean(scores, dim=1) if classes else torch.ones(n, dtype=torch.float64)
    image_weights = torch.nan_to_num(mean, nan=1.0)
    pixel_weights = torch.ones(n, palette.channels, dtype=torch.float64)
    for column, k in enumerate(classes):
        s = scores[:, column]
        top = torch.nan_to_num(s, nan=0.0).max().clamp_min(1e-12)
        pixel_weights[:, k] = torch.nan_to_num(s / top, nan=1.0).clamp(floor, 1.0)
    return Rebalancing(image_weights.float(), pixel_weights.float(), classes)





class LayoutFolder(PairedFolder):
    """Photos and their label maps, matched by file stem; label maps are read and checked against the palette up
    front (every unknown colour in every file is listed at once), and with `rebalance` the examples are drawn in
    proportion to their appearance rarity and carry per-pixel loss weights."""

    def __init__(self, photos: str | Path, labels: str | Path, palette: Palette, crop: int | tuple[int, int],
                 skip_bad: bool = False, augment: bool = True, rebalance: bool = False,
                 rebalance_classes: list[int] | None = None, floor: float = 0.1):
        if palette.classes > 254:
            raise DataError(f"a palette of {palette.classes} classes is too large (at most 254)")
        self.palette = palette
        super().__init__(photos, labels, crop, skip_bad, augment)
        self.labels, problems = [], {}
        for path in self.files:
            labels_of, unknown = read_labels(self.inputs[path.stem], palette)
            self.labels.append(labels_of.to(torch.uint8)[None])
            if unknown:
                problems[self.inputs[path.stem]] = unknown
        if problems:
            raise DataError(unknown_colours_message(problems, palette))
        self.balance = None
        if rebalance:
            photos_read = [read_image(path).float().div_(255) for path in self.files]
            self.balance = rebalancing(photos_read, [y[0].long() for y in self.labels], palette,
                                       list(rebalance_classes or []), floor)

    def _load(self, index: int) -> list[torch.Tensor]:
        return [read_image(self.files[index]), self.labels[index]]

    def _order(self, seed: int, number: int) -> list[int]:
        if self.balance is None:
            return super()._order(seed, number)
        first = int(torch.multinomial(self.balance.image_weights, 1, generator=streams.run(Draw.REBALANCE, seed, number)))
        return [(first + offset) % len(self.files) for offset in range(len(self.files))]

    def _example(self, planes: list[torch.Tensor], index: int, permutation: torch.Tensor | None) -> Example:
        image, labels = planes[0].float().div_(255), planes[1][0].long()
        weight = None if self.balance is None else self.balance.pixel_weights[index][labels][None]
        return Example(image.contiguous(), self.files[index], source=one_hot(labels, self.palette.channels),
                       weight=weight)
