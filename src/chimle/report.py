"""The evaluation report that `chimle evaluate` writes (chimle.evaluate scores; this module tells): the protocol,
its warnings, the summary per method and the per-input numbers as JSON, the same as Markdown tables, and the
plot (chimle.metrics.plot)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from chimle import __version__
from chimle.data import DataError
from chimle.files import atomic_write
from chimle.metrics import diversity, fid
from chimle.weights import sha256_file

if TYPE_CHECKING:
    from chimle.evaluate import Options, Scorer

MIN_IMAGES_FOR_MANIFOLD = 1000  # below this many real images the k-NN balls are coarse (the papers use 10k-50k)


def build_report(scorer: Scorer, protocol: dict, warnings: list[str] | None = None) -> dict:
    """The report: protocol, warnings, summary per method, per-input numbers."""
    o, warnings = scorer.options, list(warnings or [])
    if not scorer.real:
        raise DataError("nothing was evaluated: no targets")
    methods = {key: scorer.summary(key) for key in scorer.methods}
    real = len(scorer.real)
    if warning := fid.small_sample_warning(real, min(m["images"] for m in methods.values())):
        warnings.append(warning)
    warnings += _manifold_warnings(o, real, methods)
    first = next(iter(methods.values()))
    k = first["outputs_per_input"]
    if k < 2:
        warnings.append("one sample per input: LPIPS diversity and FWV need at least 2")
    generated = {key: m["images"] for key, m in methods.items()}
    protocol = {
        **protocol, "chimle_version": __version__, "device": str(scorer.device), "targets": real,
        "options": {k: v for k, v in dataclasses.asdict(o).items() if k != "device"},
        "crop": o.crop or "whole images (trimmed to multiples of the model's factor)", "tiles": o.tiles,
        "fid": {**fid.PROTOCOL, "resize": fid.RESIZE[o.fid_resize], "resize_mode": o.fid_resize,
                "weights": str(scorer.inception.file), "weights_sha256": sha256_file(scorer.inception.file),
                "real_images": real, "generated_images": generated,
                "first_sample": "the *_first_sample numbers use sample 0 of every input only: as many images as the "
                                "real set and the single-output baselines",
                "kid_subset_size": min(o.kid_subset_size, real, first["images"]), "kid_subsets": o.kid_subsets},
        "manifold": _manifold_protocol(o, real, generated),
        "fjd": _fjd_protocol(first),
        "lpips": f"LPIPS v0.1, {'VGG16' if o.lpips == 'vgg' else 'AlexNet'} backbone, images in [0, 1]",
        "psnr": "10 log10(1 / MSE) of RGB in [0, 1], per sample against the ground truth",
        "ssim": "Wang et al. 2004: 11x11 Gaussian window (sigma 1.5), valid positions, K1 0.01, K2 0.03, data range 1, "
                "mean over positions and RGB channels",
        "best_of_n": "per input, the best of its samples (highest PSNR and SSIM, lowest LPIPS), averaged over inputs",
        "diversity": _diversity_protocol(o, k, real),
        "fwv": {"definition": "mean over inputs i and samples j of exp(-d_ij^2 / (2 sigma^2)) * s_ij",
                "sigmas": list(o.sigmas),
                "distance": {"name": o.fwv_distance, "d": diversity.DISTANCES[o.fwv_distance].description},
                "spread": {"name": o.fwv_spread, "s": diversity.SPREADS[o.fwv_spread].description}},
        "consistent": _consistent_protocol(scorer.rule) if protocol.get("consistency") else None,
    }
    per_input = {name: {key: m.rows[name] for key, m in scorer.methods.items()}
                 for name in next(iter(scorer.methods.values())).rows}
    return {"protocol": protocol, "warnings": warnings, "methods": methods, "per_input": per_input}


def _manifold_warnings(o: Options, real: int, methods: dict) -> list[str]:
    """Warnings where precision/recall or density/coverage could not be computed, or rest on few images."""
    missing = [m["label"] for m in methods.values() if m["precision"] is None or m["density"] is None]
    if missing:
        return [f"precision and recall need more than {o.precision_recall_k} images in each set, density and "
                f"coverage more than {o.density_coverage_k} real images: not computed for {', '.join(missing)}"]
    if real < MIN_IMAGES_FOR_MANIFOLD:
        return [f"precision, recall, density and coverage from {real} real images: with so few, the k-nearest-"
                "neighbour balls are coarse and the numbers move with the image counts (the papers use 10,000 to "
                "50,000); compare them only between methods scored on the same images."]
    return []


def _manifold_protocol(o: Options, real: int, generated: dict) -> dict:
    return {
        "features": "the FID features (Inception pool3 after the FID resize), Euclidean distances in float64, exact",
        "balls": "around each point of a set, the closed ball whose radius is the distance to its k-th nearest other "
                 "point of the same set",
        "precision": "share of generated images inside some real ball (fidelity)",
        "recall": "share of real images inside some generated ball (coverage of the data)",
        "precision_recall_k": o.precision_recall_k,
        "precision_recall_reference": "Kynkäänniemi et al., Improved Precision and Recall Metric for Assessing "
                                      "Generative Models, NeurIPS 2019",
        "density": "real balls holding each generated image, averaged over generated images, divided by k "
                   "(about 1 when both sets come from one distribution; can exceed 1)",
        "coverage": "share of real balls that hold at least one generated image",
        "density_coverage_k": o.density_coverage_k,
        "density_coverage_reference": "Naeem et al., Reliable Fidelity and Diversity Metrics for Generative Models, "
                                      "ICML 2020",
        "real_images": real, "generated_images": generated,
    }


def _fjd_protocol(first: dict) -> dict:
    measured = first["fjd"] is not None
    return {
        "definition": "Fréchet distance between joint features [f(y), alpha f(x)] of real pairs (input x, ground truth y) "
                      "and of generated pairs (x, sample): f = the FID features, alpha = mean |f(y)| / mean |f(x)| "
                      "over the real pairs",
        "inputs": ("each input as an RGB image (grey inputs on three channels, label maps in their palette "
                   "colours), resized like the outputs" if measured else "not measured: the inputs are unknown"),
        "alpha": first["fjd_alpha"],
        "reference": "DeVries et al., On the Evaluation of Conditional GANs, 2019 (Fréchet Joint Distance)",
    }


def _diversity_protocol(o: Options, k: int, inputs: int) -> dict:
    n = o.diversity_pairs
    pairs = n if n else k * (k - 1) // 2
    return {"definition": "mean LPIPS between two samples of the same input, over "
                          + (f"the {n} consecutive pairs (0, 1) .. ({n - 1}, {n}) (fixed-pair protocol, as BicycleGAN's "
                             "19 pairs of 20 samples)" if n else "all pairs"),
            "pairs_per_input": pairs, "inputs": inputs, "pairs": inputs * pairs}


def _consistent_protocol(rule: tuple[float, bool, str] | None) -> dict | None:
    if rule is None:
        return None
    bound, higher, why = rule
    return {"rule": f"a sample is consistent with its input when its consistency is {why}", "bound": bound,
            "higher_is_better": higher,
            "share": "per input, the share of its samples that are consistent, averaged over inputs",
            "diversity": "per input with at least two consistent samples, the mean LPIPS over all pairs of its "
                         "consistent samples, averaged over those inputs"}


def _fmt(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(report: dict) -> list[str]:
    """Two Markdown tables, one row per method: the image sets compared as distributions, then per input."""
    sigmas = report["protocol"]["fwv"]["sigmas"]
    sets = ["| method | FID ↓ | KID ↓ | precision ↑ | recall ↑ | density ↑ | coverage ↑ | FJD ↓ |",
            "|---|---|---|---|---|---|---|---|"]
    inputs = ["| method | LPIPS ↓ mean / best | PSNR ↑ mean / best | SSIM ↑ mean / best | diversity | "
              + " / ".join(f"FWV σ={s}" for s in sigmas) + " ↑ | consistency | consistent share ↑ | "
              "consistent diversity |", "|---|---|---|---|---|---|---|---|---|"]
    for m in report["methods"].values():
        fid_text = _fmt(m["fid"], 2)
        if "fid_first_sample" in m:
            fid_text += f" (first sample: {_fmt(m['fid_first_sample'], 2)})"
        kid_text = "–" if m["kid"] is None else f"{m['kid']:.4f} ± {m['kid_std']:.4f}"
        sets.append(f"| {m['label']} | {fid_text} | {kid_text} | {_fmt(m['precision'], 3)} | {_fmt(m['recall'], 3)} | "
                    f"{_fmt(m['density'], 3)} | {_fmt(m['coverage'], 3)} | {_fmt(m['fjd'], 2)} |")
        fwv_text = " / ".join(_fmt(m["fwv"][str(s)]) for s in sigmas) if m["fwv"] else "–"
        inputs.append(f"| {m['label']} | {_fmt(m['lpips_mean'])} / {_fmt(m['lpips_best'])} | "
                      f"{_fmt(m['psnr_mean'], 2)} / {_fmt(m['psnr_best'], 2)} | {_fmt(m['ssim_mean'])} / "
                      f"{_fmt(m['ssim_best'])} | {_fmt(m['diversity_lpips'])} | {fwv_text} | "
                      f"{_fmt(m['consistency_mean'], 2)} | {_fmt(m['consistent_share'], 3)} | "
                      f"{_fmt(m['consistent_diversity'])} |")
    return [*sets, "", *inputs]


def _protocol_lines(p: dict) -> list[str]:
    """The protocol as Markdown bullets."""
    f, fwv = p["fid"], p["fwv"]
    generated = ", ".join(f"{key} {count}" for key, count in f["generated_images"].items())
    baseline = f"- Baseline: {p['baseline'] or 'none'}" + (
        "; zero codes: every code of the model set to 0." if p["mode"] == "model" else ".")
    c = p["consistent"]
    consistent = f"{c['rule']}; share: {c['share']}; diversity: {c['diversity']}." if c else "not measured."
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
        *_manifold_fjd_lines(p),
        f"- Consistency with the input: {p['consistency'] or 'not measured (no input, or no degradation)'}.",
        f"- Consistent share and diversity: {consistent}",
        baseline,
        f"- chimle {p['chimle_version']} on {p['device']}; options: "
        + ", ".join(f"{k}={v}" for k, v in p["options"].items()) + ".",
    ]


def _manifold_fjd_lines(p: dict) -> list[str]:
    """The protocol of the manifold metrics and FJD as Markdown bullets."""
    m, j = p["manifold"], p["fjd"]
    alpha = f"; alpha = {j['alpha']:.4f}" if j["alpha"] is not None else ""
    return [
        f"- Precision / recall (k = {m['precision_recall_k']}; {m['precision_recall_reference']}) and density / "
        f"coverage (k = {m['density_coverage_k']}; {m['density_coverage_reference']}): balls: {m['balls']}; "
        f"precision: {m['precision']}; recall: {m['recall']}; density: {m['density']}; coverage: {m['coverage']}. "
        f"On {m['features']}.",
        f"- FJD: {j['definition']}; inputs: {j['inputs']}{alpha}. {j['reference']}.",
    ]


def markdown(report: dict, plot: str | None = None) -> str:
    """The report as Markdown: what was evaluated, tables of the methods, the plot (a file name), warnings, the
    protocol."""
    p = report["protocol"]
    source = f"Model `{p['model']}`" if p["mode"] == "model" else f"Samples `{p['samples']}`"
    header = (f"{source} ({p['task'] or 'no task given'}): {p['targets']} targets from `{p['data']}` (crop: "
              f"{p['crop']}{', tiles' if p['tiles'] else ''}), {p['samples_per_input']} samples per input"
              + (f", seed {p['seed']}" if "seed" in p else "") + f"; inputs: {p['inputs'] or 'not given'}.")
    warnings = [f"> **Warning:** {w}\n" for w in report["warnings"]]
    figure = [f"![Per input: best-of-n LPIPS against diversity; precision, recall, density, coverage]({plot})", ""]
    return "\n".join(["# chimle evaluation", "", header, "", *table(report), "", *(figure if plot else []),
                      *warnings, "## Protocol", "", *_protocol_lines(p), ""])


def write_report(report: dict, out: str | Path) -> tuple[Path, Path, Path]:
    """Write OUT.json, OUT.md and the plot OUT.png (a .json, .md or .png suffix of `out` is dropped)."""
    from chimle.metrics.plot import report_plot

    out = Path(out)
    if out.suffix in (".json", ".md", ".png"):
        out = out.with_suffix("")
    json_path, md_path, png_path = (out.with_name(out.name + suffix) for suffix in (".json", ".md", ".png"))
    atomic_write(json_path, (json.dumps(report, indent=2) + "\n").encode())
    atomic_write(png_path, lambda tmp: report_plot(report).save(tmp, format="PNG"))
    atomic_write(md_path, markdown(report, png_path.name).encode())
    return json_path, md_path, png_path
