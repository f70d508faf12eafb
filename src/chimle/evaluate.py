"""`chimle evaluate`: score a model, or any method's saved samples, on held-out ground truth (DESIGN.md §2.6).

    chimle evaluate --model runs/demo --crop 128 --tiles -n 10 --seed 0 --out runs/demo/eval     # CPU, minutes
    chimle evaluate --model runs/sr --data photos/test -n 10 --lpips alex --out eval/sr            # faster on a CPU
    chimle evaluate --model runs/sr --data photos/test -n 10 --device cuda --out eval/sr           # one GPU
    chimle evaluate --model runs/n2d --data day/ --inputs night/ --out eval/n2d                    # inputs given
    chimle evaluate --samples bicyclegan/ --real test/ --inputs low/ --task super-resolution --out eval/bg

Writes REPORT.json (the protocol, every summary number, and the per-sample numbers of every input) and
REPORT.md (the protocol and a table). For every held-out target y (a file of --data, centre-cropped or cut
into tiles) the model gets x = the task's degradation of y (`Task.input_for`), or the file of --inputs with
y's stem, and draws n samples, sample k from seed (seed, k). The methods scored on the same targets:

    model        the n samples
    zero codes   the model with every code zero: one fixed output, what a deterministic model would give
    baseline     x brought to the output size: bicubic (super-resolution), the grey image (colourization),
                 the compressed image (decompression), the input itself (paired)

and the metrics: FID and KID on Inception pool3 features (`chimle.metrics.fid`); PSNR, SSIM and LPIPS to y per
sample, their mean and best-of-n (`chimle.metrics.image`); LPIPS diversity and faithfulness-weighted variance
(`chimle.metrics.diversity`); consistency with x (the sample degraded again and compared with x).

External samples (--samples DIR): the file STEM_K.png is sample K for the target STEM of --real; the same
protocol applies, so outputs of other methods (BicycleGAN, diffusion models) compare with ours. `--save-samples
DIR` writes a model's samples, targets and inputs in that layout (DIR/samples, DIR/real, DIR/inputs).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from chimle import __version__, devices, tasks
from chimle.checkpoint import atomic_write, check_folder
from chimle.config import Config, ConfigError, resolve
from chimle.data import DataError, builtin_photos, list_images, load_image, save_image
from chimle.metrics import diversity, fid
from chimle.metrics.image import SSIM_WINDOW, batched, psnr, ssim
from chimle.perceptual import LPIPS
from chimle.weights import sha256_file

BASELINES = {"super-resolution": "bicubic", "colourization": "grey input", "decompression": "compressed input"}


@dataclass
class Options:
    """What `chimle evaluate` does besides its data: see `chimle evaluate --help` for each option."""

    samples_per_input: int = 10  # samples drawn per input (model mode)
    seed: int = 0  # sample k of every input uses seed (seed, k)
    crop: int = 0  # side of the centre crop (or tiles) of each target, px; 0 = whole images
    tiles: bool = False  # cut every target into all whole crop x crop tiles instead of one centre crop
    lpips: str = "vgg"  # LPIPS backbone of every LPIPS number: vgg (paper) | alex (faster)
    fwv_distance: str = "lpips"  # d of FWV, a key of chimle.metrics.diversity.DISTANCES
    fwv_spread: str = "lpips"  # s of FWV, a key of chimle.metrics.diversity.SPREADS
    sigmas: tuple[float, ...] = diversity.SIGMAS  # FWV bandwidths
    batch: int = 16  # images per network call (bounds memory)
    kid_subset_size: int = fid.KID_SUBSET_SIZE
    kid_subsets: int = fid.KID_SUBSETS
    inception: str | None = None  # FID weights file; None = the cache of `chimle weights fetch`
    save_samples: str | None = None  # folder to write samples/, real/, inputs/ into (model mode)
    device: str | None = None  # None: cuda if available


# ---------------------------------------------------------------------------------------------------------
# Data: targets, their inputs, external samples.


def crop_boxes(height: int, width: int, crop: int, tiles: bool, multiple: int, align: int
               ) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of the parts of an image to evaluate: the whole image trimmed to multiples of
    `multiple`, one centred crop x crop square, or all whole crop x crop tiles of a centred grid; corners on
    multiples of `align` so that an input `align` times smaller crops to exactly the same region."""
    if crop and crop % multiple:
        raise ConfigError(f"--crop {crop} must be a multiple of {multiple} for this model")
    if crop and min(height, width) < crop:
        raise DataError(f"an image of {width}x{height} px is smaller than the {crop} px crop")
    rows, cols = (height // crop, width // crop) if crop and tiles else (1, 1)
    h = crop or height // multiple * multiple
    w = crop or width // multiple * multiple
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise DataError(f"an image of {width}x{height} px is too small to evaluate (SSIM needs {SSIM_WINDOW} px)")
    top = (height - rows * h) // 2 // align * align
    left = (width - cols * w) // 2 // align * align
    return [(top + r * h, left + c * w, h, w) for r in range(rows) for c in range(cols)]


def by_stem(folder: str | Path) -> dict[str, Path]:
    """The images of a folder by file stem; two files with one stem are an error."""
    files: dict[str, Path] = {}
    for path in list_images(folder):
        if path.stem in files:
            raise DataError(f"{path} and {files[path.stem]} have the same stem; matching by stem needs unique names")
        files[path.stem] = path
    return files


def samples_by_stem(folder: str | Path) -> dict[str, list[Path]]:
    """External samples STEM_K.png grouped by STEM, ordered by K; other file names are ignored."""
    groups: dict[str, dict[int, Path]] = {}
    for path in list_images(folder):
        match = re.fullmatch(r"(.+)_(\d+)", path.stem)
        if match:
            groups.setdefault(match[1], {})[int(match[2])] = path
    return {stem: [group[k] for k in sorted(group)] for stem, group in groups.items()}


@dataclass
class Item:
    """One evaluated target: its name, the ground truth, the input (None where unknown), external samples."""

    name: str
    target: torch.Tensor  # (3, H, W)
    input: torch.Tensor | None  # (C, h, w) as the model takes it
    samples: torch.Tensor | None = None  # (K, 3, H, W), external mode


def _stack(images: list[torch.Tensor], stem: str) -> torch.Tensor:
    if len({tuple(x.shape) for x in images}) > 1:
        raise DataError(f"the samples of {stem} differ in size; all samples of one image must have its size")
    return torch.stack(images)


def items(targets: dict[str, Path], inputs: dict[str, Path] | None, load_input, options: Options,
          multiple: int, scale: int, samples: dict[str, list[Path]] | None = None):
    """Yield the Items of every target file, one image at a time (memory stays flat)."""
    for stem, path in tqdm(targets.items(), desc="evaluating", unit="image", dynamic_ncols=True, disable=None):
        target = load_image(path)
        given = load_input(inputs[stem]) if inputs else None
        outputs = _stack([load_image(p) for p in samples[stem]], stem) if samples else None
        height, width = target.shape[-2:]
        if given is not None and tuple(given.shape[-2:]) != (height // scale, width // scale):
            raise DataError(f"{inputs[stem]}: an input of {given.shape[-1]}x{given.shape[-2]} px does not match "
                            f"its target {path} of {width}x{height} px (expected 1/{scale} of its size)")
        if outputs is not None and outputs.shape[-2:] != target.shape[-2:]:
            raise DataError(f"the samples of {stem} are {outputs.shape[-1]}x{outputs.shape[-2]} px but the real image "
                            f"{path} is {width}x{height} px; samples must have the size of their real image")
        # Corners on multiples of the scale only where a given input must be cropped to the same region.
        try:
            boxes = crop_boxes(height, width, options.crop, options.tiles, multiple, scale if given is not None else 1)
        except DataError as error:
            raise DataError(f"{path}: {error}") from None
        for i, (top, left, h, w) in enumerate(boxes):
            part = (slice(top, top + h), slice(left, left + w))
            small = (slice(top // scale, (top + h) // scale), slice(left // scale, (left + w) // scale))
            yield Item(stem if len(boxes) == 1 else f"{stem}-{i}", target[:, part[0], part[1]],
                       None if given is None else given[:, small[0], small[1]],
                       None if outputs is None else outputs[:, :, part[0], part[1]])


# ---------------------------------------------------------------------------------------------------------
# Scoring.


def consistency(task: tasks.Task, config: Config, outputs: torch.Tensor, given: torch.Tensor | None):
    """(K,) agreement of each output with the input it came from, or None where the task has no degradation.
    Colourization: mean |L(output) - L(input)| in Lab L units (0..100, lower is better); others: PSNR in dB
    between the output degraded as the input was made and the input (higher is better)."""
    if given is None or task.degrade is None:
        return None
    if task.name == "colourization":
        from chimle.colour import lightness

        return (lightness(outputs) - lightness(given[None])).abs().flatten(1).mean(1)
    return psnr(task.input_for(outputs, config), given[None].expand(len(outputs), -1, -1, -1))


def consistency_protocol(task: tasks.Task | None, config: Config | None) -> str | None:
    if task is None or task.degrade is None:
        return None
    if task.name == "colourization":
        return "mean |L(sample) - L(input)|, Lab L channel in 0..100 (lower is better)"
    how = {"super-resolution": f"downsampled x{2 ** config.model.levels} (anti-aliased bicubic)",
           "decompression": f"re-encoded as JPEG (quality {config.data.jpeg_quality}, {config.data.jpeg_subsampling})"}
    return f"PSNR (dB) between the sample {how.get(task.name, 'degraded again')} and the input (higher is better)"


@dataclass
class Method:
    """The per-input numbers of one method, and its Inception features."""

    label: str
    rows: dict[str, dict] = field(default_factory=dict)
    features: list[np.ndarray] = field(default_factory=list)  # pool3 features of every output
    first: list[np.ndarray] = field(default_factory=list)  # of output 0 of every input
    distances: list[torch.Tensor] = field(default_factory=list)  # FWV's d, per input
    spreads: list[torch.Tensor] = field(default_factory=list)  # FWV's s, per input


class Scorer:
    """Accumulates, input by input, everything a report needs; `summary()` turns it into numbers."""

    def __init__(self, options: Options, device: torch.device):
        if options.fwv_distance not in diversity.DISTANCES or options.fwv_spread not in diversity.SPREADS:
            raise ConfigError(f"unknown FWV distance {options.fwv_distance!r} or spread {options.fwv_spread!r}; "
                              f"choose from {list(diversity.DISTANCES)} and {list(diversity.SPREADS)}")
        self.options, self.device = options, device
        self.lpips = LPIPS(options.lpips).to(device)
        self.inception = fid.InceptionFeatures(options.inception, device, options.batch)
        self.real: list[np.ndarray] = []
        self.methods: dict[str, Method] = {}

    @torch.no_grad()
    def add(self, key: str, label: str, name: str, outputs: torch.Tensor, target: torch.Tensor,
            target_features: list[torch.Tensor], agreement: torch.Tensor | None) -> None:
        """Score the outputs (K, 3, H, W) of one method for one target (3, H, W)."""
        method = self.methods.setdefault(key, Method(label))
        outputs, target = outputs.to(self.device), target[None].to(self.device)
        batch = self.options.batch
        group = diversity.SampleGroup.of(self.lpips, outputs, target, batch, target_features)
        row = {"psnr": batched(psnr, outputs, target, batch), "ssim": batched(ssim, outputs, target, batch),
               "lpips": group.lpips_to_target()}
        if agreement is not None:
            row["consistency"] = agreement
        if len(outputs) > 1:
            row["diversity_lpips"] = diversity.pairwise_lpips(self.lpips, group.features, batch=4 * batch).mean()
            method.distances.append(diversity.DISTANCES[self.options.fwv_distance].measure(group).cpu())
            method.spreads.append(diversity.SPREADS[self.options.fwv_spread].measure(group).cpu())
        method.rows[name] = {k: v.cpu().tolist() for k, v in row.items()}
        inception = self.inception(outputs)
        method.features.append(inception)
        method.first.append(inception[:1])

    @torch.no_grad()
    def add_real(self, target: torch.Tensor) -> list[torch.Tensor]:
        """Record a ground truth (3, H, W); returns its LPIPS features."""
        target = target[None].to(self.device)
        self.real.append(self.inception(target))
        return self.lpips.features(target)

    def summary(self, key: str) -> dict:
        """The summary numbers of one method."""
        method, o = self.methods[key], self.options
        rows = list(method.rows.values())
        real, fake = np.concatenate(self.real), np.concatenate(method.features)
        k = len(rows[0]["psnr"])

        def mean(metric, reduce=None):
            values = [reduce(r[metric]) if reduce else np.mean(r[metric]) for r in rows if metric in r]
            return float(np.mean(values)) if values else None

        out = {"label": method.label, "inputs": len(rows), "outputs_per_input": k, "images": len(fake)}
        out.update(_fid_kid(real, fake, o))
        if k > 1:
            first = _fid_kid(real, np.concatenate(method.first), o)
            out.update({f"{name}_first_sample": value for name, value in first.items()})
        out.update({"psnr_mean": mean("psnr"), "psnr_best": mean("psnr", max), "ssim_mean": mean("ssim"),
                    "ssim_best": mean("ssim", max), "lpips_mean": mean("lpips"), "lpips_best": mean("lpips", min),
                    "diversity_lpips": mean("diversity_lpips", float), "consistency_mean": mean("consistency")})
        out["fwv"] = ({str(s): v for s, v in diversity.fwv(torch.cat(method.distances), torch.cat(method.spreads),
                                                           o.sigmas).items()} if method.distances else None)
        return out


def _fid_kid(real: np.ndarray, fake: np.ndarray, o: Options) -> dict:
    if min(len(real), len(fake)) < 2:
        return {"fid": None, "kid": None, "kid_std": None}
    kid, kid_std = fid.kid(real, fake, o.kid_subset_size, o.kid_subsets, seed=0)
    return {"fid": fid.fid(real, fake), "kid": kid, "kid_std": kid_std}


# ---------------------------------------------------------------------------------------------------------
# The two modes.


def _device(options: Options) -> torch.device:
    devices.configure()
    return devices.pick(options.device)


def _matched(targets: dict[str, Path], folder: str | Path | None) -> dict[str, Path] | None:
    """The files of `folder` for every target stem (an error naming the first missing ones), or None."""
    if folder is None:
        return None
    files = by_stem(folder)
    missing = [stem for stem in targets if stem not in files]
    if missing:
        raise DataError(f"{folder}: no input for {len(missing)} target(s), e.g. {', '.join(missing[:5])}; inputs are "
                        "matched to targets by file stem")
    return {stem: files[stem] for stem in targets}


def baseline_output(task: tasks.Task | None, given: torch.Tensor, size) -> torch.Tensor:
    """The input brought to the output size (1, 3, H, W): bicubic upsampling, or the grey image for colourization."""
    x = tasks.resize(given[None].float(), tuple(size))
    if task is not None and task.name == "colourization":
        from chimle.colour import grey

        x = grey(x)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def evaluate_model(model: str | Path, data: str | Path | None = None, inputs: str | Path | None = None,
                   options: Options | None = None) -> dict:
    """Sample a trained model on held-out targets and score it with its baselines; returns the report."""
    from chimle.sample import Model

    options = options or Options()
    device = _device(options)
    net = Model.load(model, str(device))
    task, config = net.task, net.config
    if inputs is None and task.degrade is None:
        raise tasks.TaskError(f"the '{task.name}' task cannot make inputs from targets: give the model's inputs with "
                              "--inputs DIR (files matched to --data by stem)")
    data = Path(data) if data is not None else builtin_photos("heldout")
    targets = by_stem(data)
    scale = task.output_scale(net.levels)
    multiple = scale if task.wiring == "super-resolution" else 2 ** (net.levels - 1)
    baseline = BASELINES.get(task.name, "input") if task.input_kind == "image" else None
    n = options.samples_per_input
    scorer = Scorer(options, device)
    for item in items(targets, _matched(targets, inputs), lambda p: task.load_input(p, config), options,
                      multiple, scale):
        x = item.input if item.input is not None else task.input_for(item.target[None], config)[0]
        samples = net.sample(x, n=n, seed=options.seed)
        outputs = [("model", f"model ({n} samples)", samples), ("zero_codes", "all codes zero", net.zero_codes(x))]
        if baseline:
            outputs.append(("baseline", baseline, baseline_output(task, x, item.target.shape[-2:])))
        target_features = scorer.add_real(item.target)
        for key, label, images in outputs:
            agreement = consistency(task, config, images, x)
            scorer.add(key, label, item.name, images, item.target, target_features, agreement)
        if options.save_samples:
            save_item(options.save_samples, item, x if task.input_kind == "image" else None, samples)
    protocol = {"mode": "model", "model": str(model), "task": task.name, "data": str(data),
                "inputs": str(inputs) if inputs else f"made from each target by the {task.name} degradation",
                "samples_per_input": n, "seed": options.seed, "baseline": baseline,
                "consistency": consistency_protocol(task, config)}
    return build_report(scorer, protocol)


def evaluate_samples(samples: str | Path, real: str | Path, inputs: str | Path | None = None,
                     task: str | None = None, options: Options | None = None, overrides: list[str] | None = None,
                     scale: int | None = None) -> dict:
    """Score saved samples STEM_K.png of any method against the real images STEM.* with the same protocol.

    With `task`, inputs missing from `inputs` are made from the targets by its degradation (super-resolution:
    downsampled by `scale`, default 16), and consistency with the input is measured."""
    options = options or Options()
    targets, groups = by_stem(real), samples_by_stem(samples)
    missing = [stem for stem in targets if stem not in groups]
    if missing:
        raise DataError(f"{samples}: no samples STEM_K.png for {len(missing)} real image(s), e.g. "
                        f"{', '.join(missing[:5])}")
    given = _matched(targets, inputs)
    entry = tasks.get(task) if task else None
    scale = _external_scale(targets, given, entry, scale)
    config = _external_config(entry, overrides, scale)
    if entry is not None and entry.input_kind == "labels" and given is None:
        raise tasks.TaskError("layout samples need their label maps: give --inputs DIR")
    load = (lambda p: entry.load_input(p, config)) if entry is not None else load_image
    known_input = given is not None or (entry is not None and entry.degrade is not None)
    baseline = None
    if known_input and (entry is None or entry.input_kind == "image"):
        baseline = BASELINES.get(entry.name, "input") if entry else "input"
    scorer = Scorer(options, _device(options))
    for item in items(targets, given, load, options, scale, scale, samples={s: groups[s] for s in targets}):
        x = item.input
        if x is None and entry is not None and entry.degrade is not None:
            x = entry.input_for(item.target[None], config)[0]
        target_features = scorer.add_real(item.target)
        agreement = consistency(entry, config, item.samples, x) if entry is not None else None
        scorer.add("samples", f"samples ({Path(samples).name})", item.name, item.samples, item.target,
                   target_features, agreement)
        if baseline and x is not None:
            images = baseline_output(entry, x, item.target.shape[-2:])
            scorer.add("baseline", baseline, item.name, images, item.target, target_features,
                       consistency(entry, config, images, x) if entry is not None else None)
    unmatched = sorted(set(groups) - set(targets))
    counts = sorted({len(groups[s]) for s in targets})
    protocol = {"mode": "samples", "samples": str(samples), "task": task, "data": str(real),
                "inputs": str(inputs) if inputs else (f"made from each target by the {task} degradation"
                                                      if entry is not None and entry.degrade else None),
                "samples_per_input": counts[0] if len(counts) == 1 else counts, "baseline": baseline,
                "consistency": consistency_protocol(entry, config)}
    warnings = [f"{len(unmatched)} sample group(s) have no real image and were ignored, e.g. "
                f"{', '.join(unmatched[:5])}"] if unmatched else []
    return build_report(scorer, protocol, warnings)


def _external_scale(targets, given, entry, scale: int | None) -> int:
    """How many times larger outputs are than inputs: from the first pair of files, else `scale` (SR) or 1."""
    if given:
        stem = next(iter(targets))
        t, x = load_image(targets[stem]), load_image(given[stem])
        ratio = t.shape[-1] // x.shape[-1]
        if ratio < 1 or t.shape[-1] != ratio * x.shape[-1]:
            raise DataError(f"{given[stem]} ({x.shape[-1]} px wide) is not a whole fraction of {targets[stem]} "
                            f"({t.shape[-1]} px wide)")
        if scale is not None and scale != ratio:
            raise ConfigError(f"--scale {scale} does not match the inputs, which are 1/{ratio} of the real images")
        return ratio
    if entry is not None and entry.wiring == "super-resolution":
        return scale or 16
    return 1


def _external_config(entry, overrides, scale: int) -> Config | None:
    """The config whose degradation settings (JPEG quality, the SR factor as levels) apply to external samples."""
    if entry is None:
        return None
    config = resolve(task=entry.name, preset="paper", overrides=overrides)
    if entry.wiring == "super-resolution":
        levels = round(math.log2(scale))
        if scale < 2 or 2**levels != scale:
            raise ConfigError(f"a super-resolution factor of {scale} is not a power of 2")
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, levels=levels))
    return config


def save_item(folder: str | Path, item: Item, given: torch.Tensor | None, samples: torch.Tensor) -> None:
    """Write samples/NAME_K.png, real/NAME.png and inputs/NAME.png: the layout `--samples` reads back."""
    folder = Path(folder)
    for k, sample in enumerate(samples):
        save_image(sample, folder / "samples" / f"{item.name}_{k}.png")
    save_image(item.target, folder / "real" / f"{item.name}.png")
    if given is not None:
        save_image(given, folder / "inputs" / f"{item.name}.png")


# ---------------------------------------------------------------------------------------------------------
# The report.


def build_report(scorer: Scorer, protocol: dict, warnings: list[str] | None = None) -> dict:
    """The report: protocol, warnings, summary per method, per-input numbers."""
    o, warnings = scorer.options, list(warnings or [])
    if not scorer.real:
        raise DataError("nothing was evaluated: no targets")
    methods = {key: scorer.summary(key) for key in scorer.methods}
    real = len(scorer.real)
    if warning := fid.small_sample_warning(real, min(m["images"] for m in methods.values())):
        warnings.append(warning)
    first = next(iter(methods.values()))
    k = first["outputs_per_input"]
    if k < 2:
        warnings.append("one sample per input: LPIPS diversity and FWV need at least 2")
    protocol = {
        **protocol, "chimle_version": __version__, "device": str(scorer.device), "targets": real,
        "options": {k: v for k, v in dataclasses.asdict(o).items() if k != "device"},
        "crop": o.crop or "whole images (trimmed to multiples of the model's factor)", "tiles": o.tiles,
        "fid": {**fid.PROTOCOL, "weights": str(scorer.inception.file),
                "weights_sha256": sha256_file(scorer.inception.file), "real_images": real,
                "generated_images": {key: m["images"] for key, m in methods.items()},
                "first_sample": "fid_first_sample and kid_first_sample use sample 0 of every input only: as many "
                                "images as the real set and the single-output baselines",
                "kid_subset_size": min(o.kid_subset_size, real, first["images"]), "kid_subsets": o.kid_subsets},
        "lpips": f"LPIPS v0.1, {'VGG16' if o.lpips == 'vgg' else 'AlexNet'} backbone, images in [0, 1]",
        "psnr": "10 log10(1 / MSE) of RGB in [0, 1], per sample against the ground truth",
        "ssim": "Wang et al. 2004: 11x11 Gaussian window (sigma 1.5), valid positions, K1 0.01, K2 0.03, data range 1, "
                "mean over positions and RGB channels",
        "best_of_n": "per input, the best of its samples (highest PSNR and SSIM, lowest LPIPS), averaged over inputs",
        "diversity": {"definition": "mean LPIPS between two samples of the same input, over all pairs",
                      "pairs_per_input": k * (k - 1) // 2, "inputs": real, "pairs": real * (k * (k - 1) // 2)},
        "fwv": {"definition": "mean over inputs i and samples j of exp(-d_ij^2 / (2 sigma^2)) * s_ij",
                "sigmas": list(o.sigmas),
                "distance": {"name": o.fwv_distance, "d": diversity.DISTANCES[o.fwv_distance].description},
                "spread": {"name": o.fwv_spread, "s": diversity.SPREADS[o.fwv_spread].description}},
    }
    per_input = {name: {key: m.rows[name] for key, m in scorer.methods.items()}
                 for name in next(iter(scorer.methods.values())).rows}
    return {"protocol": protocol, "warnings": warnings, "methods": methods, "per_input": per_input}


def _fmt(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _table(report: dict) -> list[str]:
    """One Markdown table row per method."""
    sigmas = report["protocol"]["fwv"]["sigmas"]
    lines = ["| method | FID ↓ | KID ↓ | LPIPS ↓ mean / best | PSNR ↑ mean / best | SSIM ↑ mean / best | diversity | "
             + " / ".join(f"FWV σ={s}" for s in sigmas) + " ↑ | consistency |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in report["methods"].values():
        fid_text = _fmt(m["fid"], 2)
        if "fid_first_sample" in m:
            fid_text += f" (first sample: {_fmt(m['fid_first_sample'], 2)})"
        kid_text = "–" if m["kid"] is None else f"{m['kid']:.4f} ± {m['kid_std']:.4f}"
        fwv_text = " / ".join(_fmt(m["fwv"][str(s)]) for s in sigmas) if m["fwv"] else "–"
        lines.append(f"| {m['label']} | {fid_text} | {kid_text} | {_fmt(m['lpips_mean'])} / {_fmt(m['lpips_best'])} | "
                     f"{_fmt(m['psnr_mean'], 2)} / {_fmt(m['psnr_best'], 2)} | {_fmt(m['ssim_mean'])} / "
                     f"{_fmt(m['ssim_best'])} | {_fmt(m['diversity_lpips'])} | {fwv_text} | "
                     f"{_fmt(m['consistency_mean'], 2)} |")
    return lines


def _protocol_lines(p: dict) -> list[str]:
    """The protocol as Markdown bullets."""
    f, fwv = p["fid"], p["fwv"]
    generated = ", ".join(f"{key} {count}" for key, count in f["generated_images"].items())
    baseline = f"- Baseline: {p['baseline'] or 'none'}" + (
        "; zero codes: every code of the model set to 0." if p["mode"] == "model" else ".")
    return [
        f"- FID / KID: {f['network']}; {f['quantisation']}; resized {f['resize']}; scaled {f['scaling']}. Fréchet "
        f"distance: {f['frechet']}. KID: {f['kid']}; subsets of {f['kid_subset_size']} ({f['kid_subsets']} subsets). "
        f"{f['real_images']} real images; generated: {generated}; {f['first_sample']}. Weights `{f['weights']}` "
        f"(sha256 {f['weights_sha256']}).",
        f"- LPIPS: {p['lpips']}. PSNR: {p['psnr']}. SSIM: {p['ssim']}. Best-of-n: {p['best_of_n']}.",
        f"- Diversity: {p['diversity']['definition']}; {p['diversity']['pairs_per_input']} pairs per input, "
        f"{p['diversity']['inputs']} inputs.",
        f"- FWV: {fwv['definition']}; d ({fwv['distance']['name']}) = {fwv['distance']['d']}; "
        f"s ({fwv['spread']['name']}) = {fwv['spread']['s']}.",
        f"- Consistency with the input: {p['consistency'] or 'not measured (no input, or no degradation)'}.",
        baseline,
        f"- chimle {p['chimle_version']} on {p['device']}; options: "
        + ", ".join(f"{k}={v}" for k, v in p["options"].items()) + ".",
    ]


def markdown(report: dict) -> str:
    """The report as Markdown: what was evaluated, a table of the methods, warnings, the protocol."""
    p = report["protocol"]
    source = f"Model `{p['model']}`" if p["mode"] == "model" else f"Samples `{p['samples']}`"
    header = (f"{source} ({p['task'] or 'no task given'}): {p['targets']} targets from `{p['data']}` (crop: "
              f"{p['crop']}{', tiles' if p['tiles'] else ''}), {p['samples_per_input']} samples per input"
              + (f", seed {p['seed']}" if "seed" in p else "") + f"; inputs: {p['inputs'] or 'not given'}.")
    warnings = [f"> **Warning:** {w}\n" for w in report["warnings"]]
    return "\n".join(["# chimle evaluation", "", header, "", *_table(report), "", *warnings, "## Protocol", "",
                      *_protocol_lines(p), ""])


def write_report(report: dict, out: str | Path) -> tuple[Path, Path]:
    """Write OUT.json and OUT.md (a .json or .md suffix of `out` is dropped)."""
    out = Path(out)
    if out.suffix in (".json", ".md"):
        out = out.with_suffix("")
    json_path, md_path = out.with_name(out.name + ".json"), out.with_name(out.name + ".md")
    atomic_write(json_path, (json.dumps(report, indent=2) + "\n").encode())
    atomic_write(md_path, markdown(report).encode())
    return json_path, md_path


def evaluate_command(args) -> None:
    """`chimle evaluate`: run one mode, write the report, print its table."""
    options = Options(samples_per_input=args.num, seed=args.seed, crop=args.crop, tiles=args.tiles,
                      lpips=args.lpips, fwv_distance=args.fwv_distance, fwv_spread=args.fwv_spread,
                      batch=args.batch, inception=args.inception, save_samples=args.save_samples, device=args.device)
    if args.tiles and not args.crop:
        raise ConfigError("--tiles needs --crop SIZE (the side of the tiles)")
    check_folder(Path(args.out).parent, "--out's folder")
    if args.model:
        if args.task or args.scale or args.overrides:
            raise ConfigError("--task, --scale and -o apply to --samples; a model file knows its task and settings")
        report = evaluate_model(args.model, args.data, args.inputs, options)
    else:
        if args.save_samples:
            raise ConfigError("--save-samples applies to --model")
        if args.data is None:
            raise ConfigError("--samples needs --real DIR: the ground-truth images, matched to the samples by stem")
        report = evaluate_samples(args.samples, args.data, args.inputs, args.task, options, args.overrides, args.scale)
    json_path, md_path = write_report(report, args.out)
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print("\n".join(line for line in markdown(report).splitlines() if line.startswith("|")))
    print(f"report: {json_path} and {md_path}")
