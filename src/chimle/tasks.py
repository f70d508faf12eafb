"""The task registry: one entry per task, saying how a training example becomes input and target pyramids,
how the generator is wired, how its raw outputs become images, and how a target is degraded into the input a
user would give (the operator the metrics use for consistency checks and baselines).

Every image tensor here is float, (N, C, H, W), in [0, 1]. A target pyramid has one image per generator level,
at that level's output resolution; an input pyramid is what `Generator.start` takes.

    task                input given to the model                  levels see                   predicts
    super-resolution    the image downsampled by 2**levels         level 0 only                 RGB
    colourization       any image, reduced to its Lab L channel    L of each pyramid level      a, b chroma
    decompression       a JPEG-compressed image                    the pyramid of it            RGB
    layout              a semantic label map (one-hot + void)      nearest-neighbour pyramid    RGB
    paired              any aligned image (e.g. a night photo)     the pyramid of it            RGB
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from chimle import streams
from chimle.colour import grey, lab_to_rgb, lightness
from chimle.data import load_image, to_uint8
from chimle.labels import load_labels, one_hot, palette_of
from chimle.metrics.image import psnr
from chimle.streams import Draw

if TYPE_CHECKING:
    from chimle.config import Config


class TaskError(ValueError):
    """An input does not suit the task (wrong size, channels, ...)."""


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Anti-aliased bicubic resize of images in [0, 1], clamped back to [0, 1]."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def downsample(x: torch.Tensor, factor: int, mode: str = "bicubic") -> torch.Tensor:
    """x at 1/factor of its size: anti-aliased bicubic, or nearest neighbour (for label maps)."""
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise TaskError(f"an image of {w}x{h} px cannot be downsampled by {factor}: both sides must be multiples of it")
    if mode == "nearest":
        return x[..., ::factor, ::factor]
    return resize(x, (h // factor, w // factor))


def pyramid(x: torch.Tensor, levels: int, mode: str = "bicubic") -> list[torch.Tensor]:
    """x at 1/2**(levels-1), ..., 1/2, 1 of its size: the target resolutions of a generic tower."""
    return [downsample(x, 2 ** (levels - 1 - level), mode) for level in range(levels)]


def jpeg(x: torch.Tensor, quality: int, subsampling: str = "4:2:0") -> torch.Tensor:
    """Each image of a batch encoded and decoded by Pillow's JPEG (libjpeg-turbo, deterministic)."""
    out = []
    for image in x:
        buffer = io.BytesIO()
        Image.fromarray(to_uint8(image)).save(buffer, format="JPEG", quality=quality, subsampling=subsampling)
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.uint8)
        out.append(torch.from_numpy(decoded.copy()).permute(2, 0, 1).float().div_(255))
    return torch.stack(out).to(x.device)


# How raw tanh outputs become images ----------------------------------------------------------------------------


def tanh_to_unit(raw: torch.Tensor, level_input: torch.Tensor | None) -> torch.Tensor:
    return (raw + 1) / 2


def chroma_to_rgb(raw: torch.Tensor, level_input: torch.Tensor) -> torch.Tensor:
    """Colourization: the level's L input (L/100) and its two predicted chroma channels, pre-multiplied by
    luminance as in the official release (a = 127 * a_hat / max(L, 0.01), likewise b), as sRGB. Unlike the
    official release the Lab L is the input's own 100 L, not 100 max(L, 0.01): a sample keeps its input's
    lightness exactly (the clamp only guards the division). Out-of-gamut colours are clipped, without a
    gradient beyond the gamut (see chimle.colour._clip_to_gamut for why)."""
    L = level_input
    ab = 127 * raw / L.clamp_min(0.01)
    return lab_to_rgb(torch.cat([100 * L, ab], dim=1))


# Degradations: target -> the input a user would give ---------------------------------------------------------


def _sr_degrade(target: torch.Tensor, config: Config) -> torch.Tensor:
    return downsample(target, 2**config.model.levels)


def _colour_degrade(target: torch.Tensor, config: Config) -> torch.Tensor:
    return grey(target)


def _jpeg_degrade(target: torch.Tensor, config: Config) -> torch.Tensor:
    return jpeg(target, config.data.jpeg_quality, config.data.jpeg_subsampling)


# Baselines: a given input -> the image a method that adds nothing would output ---------------------------------


def _grey_resized(given: torch.Tensor, size) -> torch.Tensor:
    return grey(resize(given, size))  # a colour input too is reduced to what the model sees: its lightness


def baseline_image(given: torch.Tensor, size, to_baseline: Callable = resize) -> torch.Tensor:
    """The baseline (1, 3, H, W) of one given input (C, h, w) at output size (H, W) (grey inputs as RGB)."""
    x = to_baseline(given[None].float(), tuple(size))
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


# Agreement of outputs with the input they came from ------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    """How a sample's agreement with its input is measured, and when a sample counts as consistent with it."""

    measure: Callable  # (task, config, outputs (K, 3, H, W), given input (C, h, w)) -> (K,)
    protocol: Callable  # (config) -> one line saying how, for reports
    bound: float  # a consistent sample's agreement is at least (higher) or at most (not higher) this
    higher: bool  # whether higher agreement is better
    why: str  # where the bound comes from


def _psnr_to_input(task: Task, config: Config, outputs: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    return psnr(task.input_for(outputs, config), given[None].expand(len(outputs), -1, -1, -1))


def _lightness_difference(task: Task, config: Config, outputs: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    return (lightness(outputs) - lightness(given[None])).abs().flatten(1).mean(1)


def _psnr_protocol(how: Callable) -> Callable:
    return lambda config: f"PSNR (dB) between the sample {how(config)} and the input (higher is better)"


NTIRE = ("the LR-PSNR that the NTIRE 2021 Learning the Super-Resolution Space challenge set as its goal (Lugmayr et "
         "al. 2021; there for the mean over samples, here for each sample)")
SR_AGREEMENT = Agreement(_psnr_to_input, _psnr_protocol(
    lambda config: f"downsampled x{2 ** config.model.levels} (anti-aliased bicubic)"), 45.0, True,
    f"at least 45 dB, {NTIRE}")
JPEG_AGREEMENT = Agreement(_psnr_to_input, _psnr_protocol(
    lambda config: f"re-encoded as JPEG (quality {config.data.jpeg_quality}, {config.data.jpeg_subsampling})"),
    45.0, True, "at least 45 dB, the super-resolution rule (NTIRE 2021) applied to re-encoding")
LIGHTNESS_AGREEMENT = Agreement(
    _lightness_difference, lambda config: "mean |L(sample) - L(input)|, Lab L channel in 0..100 (lower is better)",
    2.3, False, "at most 2.3 L units, one just-noticeable CIELAB difference (Mahy et al. 1994)")


# Input pyramids: a given input -> what the generator's levels take ---------------------------------------------


def _sr_inputs(image: torch.Tensor, config: Config) -> list[torch.Tensor]:
    return [image]


def _colour_inputs(image: torch.Tensor, config: Config) -> list[torch.Tensor]:
    # The L of each level of the given (grey) image's pyramid, in training as at sampling time, where a grey image
    # is all there is; the official release takes L of the colour target's pyramid, which differs slightly.
    return [lightness(x) / 100 for x in pyramid(image, config.model.levels)]


def _generic_inputs(image: torch.Tensor, config: Config) -> list[torch.Tensor]:
    return pyramid(image, config.model.levels)


def _layout_inputs(onehot: torch.Tensor, config: Config) -> list[torch.Tensor]:
    return pyramid(onehot, config.model.levels, mode="nearest")


@dataclass(frozen=True)
class Task:
    name: str
    wiring: str  # generator wiring, see chimle.generator
    in_channels: int  # image channels fed to each level (layout: set from the palette)
    out_channels: int  # channels each level predicts
    summary: str  # one line for help texts
    make_inputs: Callable  # (input batch as given by a user, config) -> input pyramid
    degrade: Callable | None = None  # (target batch, config) -> the input batch a user would give; None: given
    to_image: Callable = tanh_to_unit  # (raw tanh output of a level, that level's input) -> RGB image in [0, 1]
    input_kind: str = "image"  # what the model is given: "image" or "labels" (a label map, see chimle.labels)
    baseline: str | None = None  # the name of the baseline, the input brought to the output's size; None: none
    to_baseline: Callable = resize  # (given input (1, C, h, w), output size) -> the baseline image
    agreement: Agreement | None = None  # how outputs are checked against their input; None: not measured
    colour_targets: bool = False  # training targets must be colour images (greyscale files are refused)
    describe: str = ""  # what a model of the task does, one line for model listings and cards ({scale}: factor)
    demo_input: Callable | None = None  # (photo (3, H, W), seed) -> the input the demo pairs with it; None: derived
    corrects_input: bool = True  # outputs are images like the inputs, so model.predict_residual can add them

    @property
    def upscales(self) -> bool:
        """Whether outputs are larger than inputs (by 2**levels)."""
        return self.wiring == "super-resolution"

    @property
    def derived(self) -> bool:
        """Whether the input is made from the target (so a folder of photos is training data)."""
        return self.degrade is not None

    def model_overrides(self) -> dict:
        return {"model": {"wiring": self.wiring, "in_channels": self.in_channels, "out_channels": self.out_channels}}

    def image(self, raw: torch.Tensor, inputs: list[torch.Tensor], level: int) -> torch.Tensor:
        """The RGB image in [0, 1] of a level's raw output (colourization needs the level's L input)."""
        return self.to_image(raw, None if self.upscales else inputs[level])

    def output_scale(self, levels: int) -> int:
        """How many times larger than the input the final output is."""
        return 2**levels if self.upscales else 1

    def input_multiple(self, levels: int) -> int:
        """What an input's sides must be multiples of: the generic towers halve the input levels - 1 times."""
        return 1 if self.upscales else 2 ** (levels - 1)

    def too_small(self, width: int, height: int, levels: int) -> str | None:
        """Why an input of this size is too small for the tower, or None: its coarsest level (the input, or the
        input 2**(levels-1) times smaller) needs sides of 2 px or more, as instance norm needs several pixels."""
        side = 2 * self.input_multiple(levels)
        if min(width, height) < side:
            return f"an input of {width}x{height} px is too small for this model: it needs sides of at least {side} px"
        return None

    def input_for(self, target: torch.Tensor, config: Config) -> torch.Tensor:
        """The input a user would give for these targets (N, 3, h, w)."""
        if self.degrade is None:
            raise TaskError(f"the '{self.name}' task cannot make its input from a target image: give the inputs "
                            "(paired folders, or label maps) as well")
        return self.degrade(target, config)

    def pair(self, target: torch.Tensor, config: Config, source: torch.Tensor | None = None
             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Input and target pyramids of a batch of training targets; `source` is the given input for tasks that
        do not derive it."""
        if source is None:
            source = self.input_for(target, config)
        return self.inputs(source, config), pyramid(target, config.model.levels)

    def inputs(self, image: torch.Tensor, config: Config) -> list[torch.Tensor]:
        """The input pyramid of a batch of inputs as a user gives them."""
        return self.make_inputs(image, config)

    def check_input(self, image: torch.Tensor, config: Config) -> torch.Tensor:
        """One user input (C, H, W) checked for this model: channels, and sides the tower can halve; (H, W)
        integer labels are accepted for layouts and made one-hot."""
        if self.input_kind == "labels" and image.ndim == 2 and not image.is_floating_point():
            image = one_hot(image.long(), config.model.in_channels)
        if image.ndim != 3:
            raise TaskError(f"expected one input (C, H, W), got a tensor of shape {tuple(image.shape)}")
        allowed = (config.model.in_channels,) if self.input_kind == "labels" else (1, 3)
        if image.shape[0] not in allowed:
            what = f"a one-hot label map of {allowed[0]} channels" if self.input_kind == "labels" else "1 or 3 channels"
            raise TaskError(f"the {self.name} model takes {what}, got {image.shape[0]} channels")
        if self.input_kind == "image" and self.in_channels == 3 and image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        multiple = self.input_multiple(config.model.levels)
        h, w = image.shape[-2:]
        problem = self.too_small(w, h, config.model.levels)
        if problem:
            raise TaskError(problem)
        if h % multiple or w % multiple:
            raise TaskError(f"an input of {w}x{h} px must have sides that are multiples of {multiple} for this model; "
                            f"crop or pad it to {w // multiple * multiple or multiple}x{h // multiple * multiple or multiple}")
        return image

    def load_input(self, path, config: Config) -> torch.Tensor:
        """A user's input file as a model takes it: an RGB image, or a one-hot label map."""
        if self.input_kind == "labels":
            palette = palette_of(config)
            return one_hot(load_labels(path, palette), palette.channels)
        return load_image(path)

    def baseline_image(self, given: torch.Tensor, size) -> torch.Tensor:
        """The baseline (1, 3, H, W) of one given input (C, h, w) at output size (H, W): bicubic upsampling, or
        the grey image for colourization."""
        return baseline_image(given, size, self.to_baseline)

    def consistency(self, outputs: torch.Tensor, given: torch.Tensor | None, config: Config) -> torch.Tensor | None:
        """(K,) agreement of each output (K, 3, H, W) with the input (C, h, w) it came from (see `agreement`), or
        None where the task measures none or there is no input."""
        if given is None or self.agreement is None:
            return None
        return self.agreement.measure(self, config, outputs, given)

    def show_input(self, level_input: torch.Tensor, config: Config) -> torch.Tensor:
        """One example's level input (C, H, W) as an image for grids: label maps in their palette colours."""
        if self.input_kind == "labels":
            return palette_of(config).colour_image(level_input.argmax(0).cpu())
        return level_input[:3]


def night_shot(photo: torch.Tensor, seed: int) -> torch.Tensor:
    """A synthetic night shot of a (3, H, W) photo: much darker, blue, with sensor noise. The paired demo's input."""
    dark = photo.pow(2.2) * torch.tensor([0.25, 0.3, 0.5]).view(3, 1, 1)
    noise = torch.randn(photo.shape, generator=streams.run(Draw.NIGHT_NOISE, seed)) * 0.015
    return (dark + noise).clamp(0, 1)


TASKS: dict[str, Task] = {  # in the order of listings (`chimle models`)
    "super-resolution": Task(
        name="super-resolution",
        wiring="super-resolution",
        in_channels=3,
        out_channels=3,
        summary="a 2**levels times downsampled image -> the full image (paper: 32 px -> 512 px)",
        make_inputs=_sr_inputs,
        degrade=_sr_degrade,
        baseline="bicubic",
        agreement=SR_AGREEMENT,
        describe="x{scale} super-resolution: an image {scale} times smaller in each direction -> the full image",
    ),
    "colourization": Task(
        name="colourization",
        corrects_input=False,
        wiring="colourization",
        in_channels=1,
        out_channels=2,
        summary="the L channel (Lab) of any image -> colour image",
        make_inputs=_colour_inputs,
        degrade=_colour_degrade,
        to_image=chroma_to_rgb,
        baseline="grey image",
        to_baseline=_grey_resized,
        agreement=LIGHTNESS_AGREEMENT,
        colour_targets=True,
        describe="colourization: a greyscale photo -> colour photos",
    ),
    "decompression": Task(
        name="decompression",
        wiring="generic",
        in_channels=3,
        out_channels=3,
        summary="JPEG at a very low quality -> clean image",
        make_inputs=_generic_inputs,
        degrade=_jpeg_degrade,
        baseline="JPEG",
        agreement=JPEG_AGREEMENT,
        describe="JPEG decompression: a JPEG at a very low quality (10) -> clean images",
    ),
    "paired": Task(
        name="paired",
        wiring="generic",
        in_channels=3,
        out_channels=3,
        summary="any aligned pair of images, e.g. night -> day",
        make_inputs=_generic_inputs,
        baseline="input",
        describe="night -> day: a dark, blue, noisy night shot -> the daylight photo",
        demo_input=night_shot,
    ),
    "layout": Task(
        name="layout",
        corrects_input=False,
        wiring="generic",
        in_channels=20,  # the palette's classes + void; Cityscapes by default
        out_channels=3,
        summary="semantic label map -> photo",
        make_inputs=_layout_inputs,
        input_kind="labels",
        describe="layout synthesis: a label map of the built-in palette -> photos",
    ),
}


def get(name: str) -> Task:
    if name not in TASKS:
        raise TaskError(f"unknown task '{name}'; choose one of: {', '.join(TASKS)}")
    return TASKS[name]
