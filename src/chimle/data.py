"""Images in: reading files safely, folders of training images, deterministic crops, the built-in sample set.

Every image comes out as a float tensor (3, H, W) in [0, 1] (or (1, H, W) for greyscale requests), with EXIF
orientation applied. Anything unreadable raises `DataError` naming the file and what to do; a training folder
can instead skip bad files with a warning (`--skip-bad`).

Training examples are drawn deterministically from (seed, example number): which image (a fresh shuffle per
pass over the data), where the crop lies and which of the 8 flips/transposes is applied. A resumed run
therefore sees exactly the examples an uninterrupted one would.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from chimle import streams
from chimle.streams import Draw

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
MAX_PIXELS = 40_000_000  # larger images are refused (decompression-bomb guard); about 7300 x 5500 px


class DataError(ValueError):
    """An input file or folder cannot be used; the message names it and says what to do."""


def _open(path: Path) -> Image.Image:
    """Open and fully decode an image, turning every failure into a DataError that names the file."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            if image.width * image.height > MAX_PIXELS:
                raise DataError(
                    f"{path}: {image.width}x{image.height} px is larger than the {MAX_PIXELS:,}-pixel limit; "
                    "downscale it first"
                )
            image.load()
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{path}: the image is implausibly large (decompression-bomb guard); downscale it first") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"{path}: the image could not be decoded ({error}); it may be truncated") from None
    return ImageOps.exif_transpose(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16-bit and float greyscale rescaled, palettes expanded, alpha composited
    on white, CMYK converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        # Mode I holds 16-bit data (16-bit PNG, PGM and TIFF files), whatever its values: a dark 16-bit image is
        # not an 8-bit one. Only 32-bit integer data can go beyond, and is scaled by its maximum.
        if image.mode == "F":
            top = 65535.0 if array.max() > 255 else 255.0
        else:
            top = max(65535.0, float(array.max()))
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def read_image(path: str | Path, grey: bool = False) -> torch.Tensor:
    """A file as a (3, H, W) uint8 tensor (or (1, H, W) if grey)."""
    image = _to_rgb(_open(Path(path)))
    if grey:
        image = image.convert("L")
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def load_image(path: str | Path, grey: bool = False) -> torch.Tensor:
    """A file as a (3, H, W) float tensor in [0, 1] (or (1, H, W) if grey)."""
    return read_image(path, grey).float().div_(255)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """A (C, H, W) image in [0, 1] as the (H, W, C) uint8 array of its 8-bit values (rounded)."""
    return image.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def save_image(image: torch.Tensor, path: str | Path) -> None:
    """Write a (C, H, W) image in [0, 1] as PNG (or any extension Pillow knows), atomically (see
    chimle.files.atomic_write)."""
    from chimle.files import atomic_write

    path = Path(path)
    kind = Image.registered_extensions().get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: cannot tell the image format from its extension; use .png or .jpg")
    array = to_uint8(image)
    if array.shape[2] == 1:
        array = array[:, :, 0]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=kind)
    atomic_write(path, buffer.getbuffer())


def list_images(folder: str | Path) -> list[Path]:
    """The image files of a folder and its subfolders, sorted; an error if there are none."""
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def builtin_photos(split: str = "train") -> Path:
    """The folder of the built-in sample photos: 'train' or 'heldout' (see assets/photos/ATTRIBUTION.md)."""
    return Path(str(resources.files("chimle").joinpath(f"assets/photos/{split}")))


# Dihedral transforms: k quarter turns, then an optional horizontal flip (all 8 symmetries of the square).
def dihedral(x: torch.Tensor, index: int) -> torch.Tensor:
    x = torch.rot90(x, index % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if index >= 4 else x


@dataclass
class Example:
    image: torch.Tensor  # the (3, h, w) target crop
    file: Path  # the file it came from
    source: torch.Tensor | None = None  # the given input, aligned with `image` (paired, layout); None: derived
    weight: torch.Tensor | None = None  # per-pixel loss weights (1, h, w) (layout rebalancing); None: uniform


def _crop_size(crop: int | tuple[int, int]) -> tuple[int, int]:
    return (crop, crop) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file as it will be read (EXIF rotation applied), from its header only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            size = image.size
            # A PNG without an eXIf chunk has no orientation (and getexif() would decode the whole image).
            has_exif = image.format != "PNG" or "exif" in image.info
            if has_exif and image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # orientation swaps width and height
                size = size[::-1]
    return size


def image_mode(path: Path) -> str:
    """The Pillow mode of an image file, from its header."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            return image.mode


GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F"}


def _listing(problems: list[str]) -> str:
    return "\n  ".join(problems[:20]) + (f"\n  ... {len(problems)} in all" if len(problems) > 20 else "")


class ImageFolder:
    """The training images of a folder, checked up front (readable header, large enough for the crop).

    Subclasses hold several aligned planes per example (an input and its target, a label map and its photo);
    every plane of an example gets the same crop and flip."""

    def __init__(self, folder: str | Path, crop: int | tuple[int, int], skip_bad: bool = False, augment: bool = True,
                 shuffle_channels: bool = False, colour: bool = False):
        self.crop = _crop_size(crop)
        self.colour = colour  # refuse greyscale images (colourization learns colour from its targets)
        self.skip_bad, self.augment, self.shuffle_channels = skip_bad, augment, shuffle_channels
        self.files: list[Path] = []
        problems = []
        for path in self._candidates(folder):
            problem = self._check(path)
            if problem is None:
                self.files.append(path)
            elif skip_bad:
                warnings.warn(f"skipping {problem}", stacklevel=2)
            else:
                problems.append(problem)
        if problems:
            raise DataError(f"{len(problems)} unusable training image(s):\n  {_listing(problems)}\n"
                            "remove them, or give --skip-bad to skip such files")
        if not self.files:
            raise DataError(f"{folder}: none of the images can be used for {self.crop[1]}x{self.crop[0]} px crops")
        self._cache: dict[int, list[torch.Tensor]] = {}
        self._bad: set[int] = set()

    def _candidates(self, folder: str | Path) -> list[Path]:
        return list_images(folder)

    def _check(self, path: Path) -> str | None:
        """Why `path` cannot be used, or None."""
        problem = self._check_size(path, self.crop)
        if problem is None and self.colour and image_mode(path) in GREY_MODES:
            return f"{path}: greyscale image; the colourization task learns colour from its targets"
        return problem

    @staticmethod
    def _check_size(path: Path, crop: tuple[int, int], factor: int = 1) -> str | None:
        if path.stat().st_size == 0:
            return f"{path}: empty file"
        try:
            width, height = image_size(path)
        except Image.DecompressionBombError:
            width = height = MAX_PIXELS
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            return f"{path}: not a readable image ({error.__class__.__name__})"
        if width * height > MAX_PIXELS:
            return f"{path}: the image is implausibly large (decompression-bomb guard, {MAX_PIXELS:,} px); downscale it first"
        width //= factor
        if height < crop[0] or width < crop[1]:
            return f"{path}: {width}x{height} px is smaller than the {crop[1]}x{crop[0]} px crop"
        return None

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, index: int) -> list[torch.Tensor]:
        """The aligned planes of example file `index` at full size, as uint8 (C, H, W): here just the image."""
        image = read_image(self.files[index])
        if self.colour and torch.equal(image[0], image[1]) and torch.equal(image[1], image[2]):
            raise DataError(f"{self.files[index]}: greyscale image (its RGB channels are equal); the colourization "
                            "task learns colour from its targets")
        return [image]

    def _planes(self, index: int) -> list[torch.Tensor]:
        """`_load`, with the first 256 files kept in memory (all of a small folder)."""
        if index not in self._cache:
            planes = self._load(index)
            if len(self._cache) < 256:
                self._cache[index] = planes
            return planes
        return self._cache[index]

    def _order(self, seed: int, number: int) -> list[int]:
        """File indices to try for example `number`: a fresh shuffle per pass over the data."""
        n = len(self.files)
        order = torch.randperm(n, generator=streams.run(Draw.ORDER, seed, number // n))
        return [int(order[(number + offset) % n]) for offset in range(n)]

    def example(self, seed: int, number: int) -> Example:
        """Training example `number` of the run seeded `seed`: a shuffled pass order, a random crop, a random
        dihedral transform; the same (seed, number) always gives the same example. With skip_bad, a file that
        fails to decode is replaced by the next one in the pass order (the same one every time)."""
        for index in self._order(seed, number):
            if index in self._bad:
                continue
            try:
                planes = self._planes(index)
                break
            except DataError as error:
                if not self.skip_bad:
                    raise DataError(f"{error}; remove it or give --skip-bad") from None
                warnings.warn(f"skipping {error}", stacklevel=2)
                self._bad.add(index)
        else:
            raise DataError(f"none of the {len(self.files)} training images could be decoded")
        g = streams.run(Draw.CROP, seed, number)
        (ch, cw), (h, w) = self.crop, planes[0].shape[-2:]
        top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
        planes = [p[:, top : top + ch, left : left + cw] for p in planes]
        if self.augment:
            # All 8 flips/transposes of square crops; non-square crops keep their shape (no transposes).
            choice = int(torch.randint(0, 8, (1,), generator=g)) if ch == cw else 2 * int(torch.randint(0, 4, (1,), generator=g))
            planes = [dihedral(p, choice) for p in planes]
        permutation = torch.randperm(3, generator=g) if self.shuffle_channels else None
        return self._example(planes, index, permutation)

    def _example(self, planes: list[torch.Tensor], index: int, permutation: torch.Tensor | None) -> Example:
        image = planes[0].float().div_(255)
        if permutation is not None:
            image = image[permutation]
        return Example(image.contiguous(), self.files[index])


class PairedFolder(ImageFolder):
    """Aligned (input, target) pairs: two folders matched by file stem, or single images holding the input on the
    left and the target on the right (the pix2pix "A|B" format) when `inputs` is None."""

    def __init__(self, folder: str | Path, inputs: str | Path | None, crop: int | tuple[int, int],
                 skip_bad: bool = False, augment: bool = True, shuffle_channels: bool = False):
        self.inputs: dict[str, Path] = {}
        if inputs is not None:
            targets = {p.stem: p for p in list_images(folder)}
            self.inputs = {p.stem: p for p in list_images(inputs)}
            missing = sorted(set(targets) ^ set(self.inputs))
            if missing:
                where = [f"{stem}: only in {folder if stem in targets else inputs}" for stem in missing]
                raise DataError(f"{len(missing)} unmatched pair(s) (inputs and targets are matched by file stem):\n  "
                                f"{_listing(where)}\nadd or remove files so both folders hold the same stems")
        super().__init__(folder, crop, skip_bad, augment, shuffle_channels)

    def _check(self, path: Path) -> str | None:
        if not self.inputs:
            problem = self._check_size(path, self.crop, factor=2)
            if problem is None and image_size(path)[0] % 2:
                return f"{path}: an A|B image must have an even width (input left, target right)"
            return problem
        source = self.inputs[path.stem]
        problem = self._check_size(path, self.crop) or self._check_size(source, self.crop)
        if problem is None and image_size(path) != image_size(source):
            (w, h), (iw, ih) = image_size(path), image_size(source)
            return f"{path} is {w}x{h} px but its input {source} is {iw}x{ih} px: a pair must have the same size"
        return problem

    def _load(self, index: int) -> list[torch.Tensor]:
        path = self.files[index]
        if not self.inputs:
            both = read_image(path)
            half = both.shape[-1] // 2
            return [both[..., half:], both[..., :half]]
        return [read_image(path), read_image(self.inputs[path.stem])]

    def _example(self, planes: list[torch.Tensor], index: int, permutation: torch.Tensor | None) -> Example:
        image, source = (p.float().div_(255) for p in planes)
        if permutation is not None:
            image, source = image[permutation], source[permutation]
        return Example(image.contiguous(), self.files[index], source=source.contiguous())


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    if min(h, w) < size:
        raise DataError(f"an image of {w}x{h} px is smaller than the {size} px crop")
    top, left = (h - size) // 2, (w - size) // 2
    return image[..., top : top + size, left : left + size]
