"""`chimle evaluate`: score a model, or any method's saved samples, on held-out ground truth (DESIGN.md §2.6).

    chimle evaluate --model runs/demo --crop 128 --tiles -n 10 --seed 0 --out runs/demo/eval     # CPU, minutes
    chimle evaluate --model runs/sr --data photos/test -n 10 --lpips alex --out eval/sr            # faster on a CPU
    chimle evaluate --model runs/sr --data photos/test -n 10 --device cuda --out eval/sr           # one GPU
    chimle evaluate --model runs/n2d --data day/ --inputs night/ --out eval/n2d                    # inputs given
    chimle evaluate --samples bicyclegan/ --real test/ --inputs low/ --task super-resolution --out eval/bg

Writes REPORT.json (the protocol, every summary number, and the per-sample numbers of every input), REPORT.md
(the protocol and tables) and REPORT.png (per input, best-of-n LPIPS against diversity; precision, recall,
density and coverage of every method). For every held-out target y (a file of --data, centre-cropped or cut
into tiles) the model gets x = the task's degradation of y (`Task.input_for`), or the file of --inputs with
y's stem, and draws n samples, sample k from seed (seed, k). The methods scored on the same targets:

    model        the n samples
    zero codes   the model with every code zero: one fixed output, what a deterministic model would give
    baseline     x brought to the output size: bicubic (super-resolution), the grey image (colourization),
                 the compressed image (decompression), the input itself (paired)

and the metrics: FID and KID on Inception pool3 features, resized the TF FID code's way or clean-fid's
(`chimle.metrics.fid`); precision, recall, density and coverage on the same features (`chimle.metrics.manifold`);
PSNR, SSIM and LPIPS to y per sample, their mean and best-of-n (`chimle.metrics.image`); LPIPS diversity over all
pairs or fixed pairs, and faithfulness-weighted variance (`chimle.metrics.diversity`); consistency with x (the
sample degraded again and compared with x), the share of samples consistent within a tolerance and the diversity
among those, and the Fréchet Joint Distance of (input, output) pairs (`chimle.metrics.conditional`).

From Python, `scores(model, **options)` returns every summary number by method.

External samples (--samples DIR): the file STEM_K.png is sample K for the target STEM of --real; the same
protocol applies, so outputs of other methods (BicycleGAN, diffusion models) compare with ours. `--save-samples
DIR` writes a model's samples, targets and inputs in that layout (DIR/samples, DIR/real, DIR/inputs).
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from chimle import devices, tasks
from chimle.files import check_folder
from chimle.config import Config, ConfigError, resolve
from chimle.data import DataError, builtin_photos, list_images, load_image, save_image
from chimle.metrics import conditional, diversity, fid, manifold
from chimle.metrics.image import SSIM_WINDOW, batched, psnr, ssim
from chimle.perceptual import LPIPS
from chimle.report import build_report, table, write_report

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
    diversity_pairs: int = 0  # pairs per input behind LPIPS diversity: 0 = all; N = the consecutive (0,1)..(N-1,N)
    fid_resize: str = "tf"  # resize to 299 px before Inception: tf (the TF FID code's) | clean (clean-fid's)
    precision_recall_k: int = manifold.PRECISION_RECALL_K  # neighbours per ball (paper: 3)
    density_coverage_k: int = manifold.DENSITY_COVERAGE_K  # neighbours per ball (paper: 5)
    consistency_tolerance: float | None = None  # a consistent sample's bound, in the task's unit; None = the task's
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


def tolerance(task: tasks.Task | None, options: Options) -> tuple[float, bool, str] | None:
    """The consistency rule of a task (its `agreement`, with --consistency-tolerance as its bound): (bound, whether
    higher is better, why), or None where the task has no degradation to measure consistency with."""
    if options.consistency_tolerance is not None and not math.isfinite(options.consistency_tolerance):
        raise ConfigError(f"--consistency-tolerance must be a finite number, got {options.consistency_tolerance}")
    if task is None or task.agreement is None:
        return None
    rule = task.agreement
    if options.consistency_tolerance is None:
        return rule.bound, rule.higher, rule.why
    bound = options.consistency_tolerance
    return bound, rule.higher, f"{'at least' if rule.higher else 'at most'} {bound} (set by --consistency-tolerance)"


def consistency_protocol(task: tasks.Task | None, config: Config | None) -> str | None:
    return None if task is None or task.agreement is None else task.agreement.protocol(config)


@dataclass
class Method:
    """The per-input numbers of one method, and its Inception features."""

    label: str
    rows: dict[str, dict] = field(default_factory=dict)
    features: list[np.ndarray] = field(default_factory=list)  # pool3 features of the outputs of every input
    targets: list[int] = field(default_factory=list)  # which real image (index into Scorer.real) each input has
    distances: list[torch.Tensor] = field(default_factory=list)  # FWV's d, per input
    spreads: list[torch.Tensor] = field(default_factory=list)  # FWV's s, per input


class Scorer:
    """Accumulates, input by input, everything a report needs; `summary()` turns it into numbers.

    `rule` (see `tolerance`) says when a sample is consistent with its input; without it, or without an
    agreement, the consistent share and diversity are not measured."""

    def __init__(self, options: Options, device: torch.device, rule: tuple[float, bool, str] | None = None):
        if options.fwv_distance not in diversity.DISTANCES or options.fwv_spread not in diversity.SPREADS:
            raise ConfigError(f"unknown FWV distance {options.fwv_distance!r} or spread {options.fwv_spread!r}; "
                              f"choose from {list(diversity.DISTANCES)} and {list(diversity.SPREADS)}")
        if options.fid_resize not in fid.RESIZE:
            raise ConfigError(f"unknown FID resize {options.fid_resize!r}; choose from {list(fid.RESIZE)}")
        if options.diversity_pairs < 0 or min(options.precision_recall_k, options.density_coverage_k) < 1:
            raise ConfigError("the number of diversity pairs must be >= 0 and the k of the manifold metrics >= 1")
        self.options, self.device, self.rule = options, device, rule
        self.lpips = LPIPS(options.lpips).to(device)
        self.inception = fid.InceptionFeatures(options.inception, device, options.batch, options.fid_resize)
        self.real: list[np.ndarray] = []  # pool3 features of every ground truth
        self.real_inputs: list[np.ndarray | None] = []  # and of its input, where known (for FJD)
        self.methods: dict[str, Method] = {}

    @torch.no_grad()
    def add(self, key: str, label: str, name: str, outputs: torch.Tensor, target: torch.Tensor,
            target_features: list[torch.Tensor], agreement: torch.Tensor | None, real: int | None = None) -> None:
        """Score the outputs (K, 3, H, W) of one method for one target (3, H, W): the real image `real` (an
        index in the order of `add_real`; default: the latest)."""
        method = self.methods.setdefault(key, Method(label))
        outputs, target = outputs.to(self.device), target[None].to(self.device)
        batch = self.options.batch
        group = diversity.SampleGroup.of(self.lpips, outputs, target, batch, target_features)
        row = {"psnr": batched(psnr, outputs, target, batch), "ssim": batched(ssim, outputs, target, batch),
               "lpips": group.lpips_to_target()}
        pairs = None
        if len(outputs) > 1:
            pairs = diversity.pairwise_lpips(self.lpips, group.features, batch=4 * batch)
            row["diversity_lpips"] = self._diversity(pairs, len(outputs))
            method.distances.append(diversity.DISTANCES[self.options.fwv_distance].measure(group).cpu())
            method.spreads.append(diversity.SPREADS[self.options.fwv_spread].measure(group).cpu())
        extra = {}
        if agreement is not None:
            row["consistency"] = agreement
            if self.rule is not None:
                row["consistent"] = conditional.consistent(agreement.cpu(), *self.rule[:2])
                extra["consistent_diversity"] = (None if pairs is None else
                                                 conditional.consistent_diversity(pairs, row["consistent"]))
        method.rows[name] = {**{k: v.cpu().tolist() for k, v in row.items()}, **extra}
        method.features.append(self.inception(outputs))
        method.targets.append(len(self.real) - 1 if real is None else real)

    def _diversity(self, pairs: torch.Tensor, k: int) -> torch.Tensor:
        """LPIPS diversity of one input from its pairwise LPIPS: over all pairs, or the fixed consecutive ones."""
        n = self.options.diversity_pairs
        return (pairs[diversity.consecutive_pairs(k, n)] if n else pairs).mean()

    @torch.no_grad()
    def add_real(self, target: torch.Tensor, given: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Record a ground truth (3, H, W) and, where known, its input as an RGB image (3, h, w) in [0, 1];
        returns the ground truth's LPIPS features."""
        target = target[None].to(self.device)
        self.real.append(self.inception(target))
        self.real_inputs.append(None if given is None else self.inception(given[None].to(self.device)))
        return self.lpips.features(target)

    def summary(self, key: str) -> dict:
        """The summary numbers of one method."""
        method, o = self.methods[key], self.options
        rows = list(method.rows.values())
        real, fake = np.concatenate(self.real), np.concatenate(method.features)
        k = len(rows[0]["psnr"])

        def mean(metric, reduce=None):
            values = [reduce(r[metric]) if reduce else np.mean(r[metric]) for r in rows if r.get(metric) is not None]
            return float(np.mean(values)) if values else None

        out = {"label": method.label, "inputs": len(rows), "outputs_per_input": k, "images": len(fake)}
        out.update(self._distribution(method, real, first_only=False))
        if k > 1:
            first = self._distribution(method, real, first_only=True)
            out.update({f"{name}_first_sample": value for name, value in first.items() if name != "fjd_alpha"})
        out.update({"psnr_mean": mean("psnr"), "psnr_best": mean("psnr", max), "ssim_mean": mean("ssim"),
                    "ssim_best": mean("ssim", max), "lpips_mean": mean("lpips"), "lpips_best": mean("lpips", min),
                    "diversity_lpips": mean("diversity_lpips", float), "consistency_mean": mean("consistency"),
                    "consistent_share": mean("consistent"), "consistent_diversity": mean("consistent_diversity", float),
                    "consistent_diversity_inputs": sum(r.get("consistent_diversity") is not None for r in rows)})
        out["fwv"] = ({str(s): v for s, v in diversity.fwv(torch.cat(method.distances), torch.cat(method.spreads),
                                                           o.sigmas).items()} if method.distances else None)
        return out

    def _distribution(self, method: Method, real: np.ndarray, first_only: bool) -> dict:
        """FID, KID, precision, recall, density, coverage and FJD of a method's outputs (or of output 0 of every
        input) against the real images; None where there are too few images."""
        o = self.options
        fake = np.concatenate([f[:1] if first_only else f for f in method.features])
        out = _fid_kid(real, fake, o)
        pr, dc = o.precision_recall_k, o.density_coverage_k
        enough = len(real) > pr and len(fake) > pr
        precision, recall = manifold.precision_recall(real, fake, pr) if enough else (None, None)
        density, coverage = manifold.density_coverage(real, fake, dc) if len(real) > dc else (None, None)
        out.update({"precision": precision, "recall": recall, "density": density, "coverage": coverage})
        out.update(self._fjd(method, real, fake, first_only))
        return out

    def _fjd(self, method: Method, real: np.ndarray, fake: np.ndarray, first_only: bool) -> dict:
        """Fréchet Joint Distance on (output, input) features, or None where an input is unknown."""
        if any(x is None for x in self.real_inputs) or min(len(real), len(fake)) < 2:
            return {"fjd": None, "fjd_alpha": None}
        inputs = [np.repeat(self.real_inputs[t], 1 if first_only else len(f), axis=0)
                  for t, f in zip(method.targets, method.features)]
        value, alpha = conditional.fjd(real, np.concatenate(self.real_inputs), fake, np.concatenate(inputs))
        return {"fjd": value, "fjd_alpha": alpha}


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


def input_image(task: tasks.Task | None, config: Config | None, given: torch.Tensor | None) -> torch.Tensor | None:
    """An input as the RGB image (3, h, w) whose Inception features FJD pairs with the outputs: label maps in
    their palette colours, grey inputs repeated over three channels."""
    if given is None:
        return None
    image = task.show_input(given, config) if task is not None else given[:3]
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


@dataclass
class Scored:
    """One held-out input scored (see `score_input`)."""

    samples: torch.Tensor  # (n, 3, H, W)
    baseline: torch.Tensor | None  # (1, 3, H, W), None where the task has none
    numbers: dict  # best_lpips, mean_lpips, best_psnr, mean_psnr, diversity, consistency, baseline_lpips/_psnr


@torch.no_grad()
def score_input(model, given: torch.Tensor, target: torch.Tensor, lpips: LPIPS, n: int = 8, seed: int = 0) -> Scored:
    """n samples (seed, 0..n-1) of a model (a chimle.sample.Model) for one input, scored against its ground truth
    (3, H, W): best-of-n and mean LPIPS and PSNR, diversity (the mean LPIPS between two samples), the mean
    consistency with the input (None where the task measures none), and the baseline's LPIPS and PSNR (None where
    the task has no baseline). The numbers of `chimle demo`, benchmarks/quality.py and the built-in models' cards."""
    task = model.task
    samples = model.sample(given, n=n, seed=seed)
    features = lpips.features(samples)
    distances = lpips.distance(features, lpips.features(target[None]))
    fidelity = psnr(samples, target[None])
    agreement = task.consistency(samples, given, model.config)
    base = task.baseline_image(given, target.shape[-2:]) if task.baseline else None
    return Scored(samples, base, {
        "best_lpips": distances.min().item(), "mean_lpips": distances.mean().item(),
        "best_psnr": fidelity.max().item(), "mean_psnr": fidelity.mean().item(),
        "diversity": diversity.pairwise_lpips(lpips, features).mean().item(),
        "consistency": None if agreement is None else agreement.mean().item(),
        "baseline_lpips": None if base is None else lpips(base, target[None]).item(),
        "baseline_psnr": None if base is None else psnr(base, target[None]).item(),
    })


def _check_pairs(options: Options, samples_per_input: int) -> None:
    """--diversity-pairs N needs N + 1 samples per input (the pairs chain samples 0..N)."""
    if options.diversity_pairs and options.diversity_pairs >= samples_per_input:
        raise ConfigError(f"--diversity-pairs {options.diversity_pairs} needs at least {options.diversity_pairs + 1} "
                          f"samples per input (pairs (0, 1) .. ({options.diversity_pairs - 1}, "
                          f"{options.diversity_pairs})), got {samples_per_input}")


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
    multiple = scale * task.input_multiple(net.levels)  # target sides: the input's multiple, scaled
    baseline = task.baseline
    n = options.samples_per_input
    _check_pairs(options, n)
    scorer = Scorer(options, device, tolerance(task, options))
    for item in items(targets, _matched(targets, inputs), lambda p: task.load_input(p, config), options,
                      multiple, scale):
        x = item.input if item.input is not None else task.input_for(item.target[None], config)[0]
        samples = net.sample(x, n=n, seed=options.seed)
        outputs = [("model", f"model ({n} samples)", samples), ("zero_codes", "all codes zero", net.zero_codes(x))]
        if baseline:
            outputs.append(("baseline", baseline, task.baseline_image(x, item.target.shape[-2:])))
        target_features = scorer.add_real(item.target, input_image(task, config, x))
        for key, label, images in outputs:
            agreement = task.consistency(images, x, config)
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
        baseline = entry.baseline if entry else "input"
    _check_pairs(options, min(len(groups[s]) for s in targets))
    scorer = Scorer(options, _device(options), tolerance(entry, options))
    for item in items(targets, given, load, options, scale, scale, samples={s: groups[s] for s in targets}):
        x = item.input
        if x is None and entry is not None and entry.degrade is not None:
            x = entry.input_for(item.target[None], config)[0]
        target_features = scorer.add_real(item.target, input_image(entry, config, x))
        agreement = entry.consistency(item.samples, x, config) if entry is not None else None
        scorer.add("samples", f"samples ({Path(samples).name})", item.name, item.samples, item.target,
                   target_features, agreement)
        if baseline and x is not None:
            size = item.target.shape[-2:]
            images = entry.baseline_image(x, size) if entry is not None else tasks.baseline_image(x, size)
            scorer.add("baseline", baseline, item.name, images, item.target, target_features,
                       entry.consistency(images, x, config) if entry is not None else None)
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


def scores(model: str | Path, data: str | Path | None = None, inputs: str | Path | None = None,
           **options) -> dict[str, dict]:
    """Every summary number of a model and of its baselines, by method ("model", "zero_codes", "baseline"), for
    Python callers: `scores("runs/demo", crop=32, tiles=True, lpips="alex")["model"]["recall"]`. The keyword
    arguments are the fields of Options; `evaluate_model` gives the whole report (protocol, per-input numbers)."""
    return evaluate_model(model, data, inputs, Options(**options))["methods"]


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
    if entry is not None and entry.upscales:
        return scale or 16
    return 1


def _external_config(entry, overrides, scale: int) -> Config | None:
    """The config whose degradation settings (JPEG quality, the SR factor as levels) apply to external samples."""
    if entry is None:
        return None
    config = resolve(task=entry.name, preset="paper", overrides=overrides)
    if entry.upscales:
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


def evaluate_command(args) -> None:
    """`chimle evaluate`: run one mode, write the report, print its table."""
    options = Options(samples_per_input=args.num, seed=args.seed, crop=args.crop, tiles=args.tiles,
                      lpips=args.lpips, fwv_distance=args.fwv_distance, fwv_spread=args.fwv_spread,
                      batch=args.batch, inception=args.inception, save_samples=args.save_samples, device=args.device,
                      fid_resize=args.fid_resize, diversity_pairs=args.diversity_pairs,
                      consistency_tolerance=args.consistency_tolerance)
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
    json_path, md_path, png_path = write_report(report, args.out)
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print("\n".join(table(report)))
    print(f"report: {json_path}, {md_path} and {png_path}")
