"""Ablations on real photos: number of levels, samples per level, hierarchical vs flat search (DESIGN.md §2.2).

    OMP_NUM_THREADS=1 python benchmarks/ablations.py --quick     # a few minutes: one seed, one round each
    OMP_NUM_THREADS=1 python benchmarks/ablations.py             # the committed report: 3 seeds (2-core CPU)
    OMP_NUM_THREADS=1 python benchmarks/ablations.py --rounds 18 --out benchmarks/results/ablations-18   # 3x longer

The paper's claims, from its appendix, on JPEG decompression: 4 modules beat 1 (FID 72.75 vs 94.84); more
samples per image help (10 / 60 / 120: FID 79.54 / 76.20 / 72.75); hierarchical search beats flat cIMLE
(layouts: FID 59.71 vs 61.62). Here the same questions at CPU size:

    task        decompression of the built-in photos (JPEG quality 1 as in the paper, 4:2:0), 32 x 32 px crops
    levels      1, 2, 4 at a matched compute budget: every generator takes about the same multiply-accumulates per
                forward pass (within 10 %; parameters differ, see the report), and every search renders the same
                48 candidates per example (pools [48], [24, 24], [12, 12, 12, 12])
    pools       4 levels with 2, 12, 24 candidates per level (the paper's ratios 10 : 60 : 120)
    search      hierarchical [12, 12, 12, 12] vs flat cIMLE with 48 full-code candidates (equal renders per example;
                each flat candidate runs through all four levels, so flat search costs more compute)

The "levels = 4", "12 per level" and "hierarchical" rows are the same runs. Every variant trains for the same
rounds and steps with the same loss (LPIPS-AlexNet + 1.0 x L1, the `small` preset's choice for CPU runs) and
the rest of `small`'s decompression settings (its weight average: the report states the optimiser the runs
resolved to; SHARED below fixes the rest), and
is scored on held-out 32 px tiles of the three built-in held-out photos with chimle.evaluate's Scorer: FID and
KID (TF Inception pool3), best-of-n LPIPS, LPIPS diversity and FWV (LPIPS-AlexNet throughout), each over three
training seeds, mean ± standard deviation. Writes benchmarks/results/ablations.{md,json,png}.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from chimle import tasks  # noqa: E402
from chimle.data import builtin_photos, list_images, load_image  # noqa: E402
from chimle.evaluate import Options, Scorer  # noqa: E402
from chimle.metrics import fid as fid_lib  # noqa: E402
from chimle.sample import Model  # noqa: E402
from chimle.train import train  # noqa: E402

TILE = 32  # training crop and held-out tile side, px
SHARED = ["model.blocks=1", "model.noise_channels=2", "model.code_dim=16", "model.style_dim=32",
          "model.mapping_layers=2", f"data.crop={TILE}", "train.round_size=16", "train.steps_per_round=30",
          "train.batch_size=4", "train.lr=0.002", "train.perceptual=alex", "train.pixel_weight=1.0",
          "data.jpeg_quality=1", "train.precision=float32"]  # the committed reports' step (before `small`'s bf16)
FOUR = ["model.levels=4", "model.channels=[16,16,16,16]", "model.growth=[8,8,8,8]"]
VARIANTS = {  # name -> overrides; widths chosen so one forward pass costs about the same in every variant
    "levels=1": ["model.levels=1", "model.channels=[20]", "model.growth=[10]", "search.samples_per_level=[48]"],
    "levels=2": ["model.levels=2", "model.channels=[18,16]", "model.growth=[9,8]", "search.samples_per_level=[24,24]"],
    "levels=4": [*FOUR, "search.samples_per_level=[12,12,12,12]"],
    "pool=2": [*FOUR, "search.samples_per_level=[2,2,2,2]"],
    "pool=24": [*FOUR, "search.samples_per_level=[24,24,24,24]"],
    "flat": [*FOUR, "search.samples_per_level=[12,12,12,12]", "search.flat=true", "search.flat_samples=48"],
}
ABLATIONS = {  # table -> (row label, variant, the paper's FID for that setting) in order
    "number of levels (matched compute, 48 renders per example)": [
        ("1", "levels=1", "94.84 (1 module)"), ("2", "levels=2", ""), ("4", "levels=4", "72.75 (4 modules)")],
    "samples per level (4 levels)": [
        ("2", "pool=2", "79.54 (10)"), ("12", "levels=4", "76.20 (60)"), ("24", "pool=24", "72.75 (120)")],
    "search (4 levels, 48 renders per example)": [
        ("hierarchical", "levels=4", "59.71 (layouts)"), ("flat cIMLE", "flat", "61.62 (layouts)")],
}
CLAIMS = [  # (the paper's claim, better variant, worse variant): lower FID and best-of-n LPIPS for the better one
    ("4 modules beat 1 (decompression FID 72.75 vs 94.84)", "levels=4", "levels=1"),
    ("4 modules beat 2 (implied by the above)", "levels=4", "levels=2"),
    ("more samples per level help (FID 79.54 with 10, 72.75 with 120)", "pool=24", "pool=2"),
    ("hierarchical search beats flat cIMLE (layouts: FID 59.71 vs 61.62)", "levels=4", "flat"),
]
SIZES = {
    "default": dict(rounds=6, tiles_per_photo=8, samples=4, seeds=[0, 1, 2]),
    "quick": dict(rounds=1, tiles_per_photo=4, samples=3, seeds=[0]),
}
METRICS = [("fid", "FID", True), ("kid", "KID", True), ("lpips_best", "best-of-n LPIPS", True),
           ("lpips_mean", "mean LPIPS", True), ("diversity_lpips", "LPIPS diversity", None),
           ("fwv_0.2", "FWV sigma=0.2", False)]


def heldout_tiles(per_photo: int) -> list[tuple[str, torch.Tensor]]:
    """`per_photo` TILE x TILE tiles from the centre of each held-out photo: a centred grid two tiles high."""
    out = []
    columns = per_photo // 2
    for path in list_images(builtin_photos("heldout")):
        photo = load_image(path)
        h, w = photo.shape[-2:]
        top, left = (h - 2 * TILE) // 2, (w - columns * TILE) // 2
        for r in range(2):
            for c in range(columns):
                y, x = top + r * TILE, left + c * TILE
                out.append((f"{path.stem}-{r}{c}", photo[:, y : y + TILE, x : x + TILE].contiguous()))
    return out


def run(size: dict, work: Path) -> dict:
    """Train every variant for every seed and score it on the held-out tiles."""
    targets = heldout_tiles(size["tiles_per_photo"])
    scorer = Scorer(Options(lpips="alex", batch=16), torch.device("cpu"))
    target_features = [scorer.add_real(target) for _, target in targets]
    records, sizes = [], {}
    reference = common.config("decompression", [*SHARED, *VARIANTS["levels=4"]])
    for (name, target), features in zip(targets, target_features):  # the compressed input itself, for reference
        jpeg = tasks.get("decompression").input_for(target[None], reference)
        scorer.add("jpeg", "JPEG input", name, jpeg, target, features, None)
    for seed in size["seeds"]:
        for variant, overrides in VARIANTS.items():
            clock = common.Stopwatch()
            cfg = common.config("decompression", [*SHARED, *overrides, f"train.rounds={size['rounds']}",
                                                  f"train.seed={seed}"])
            sizes.setdefault(variant, common.model_size(cfg))
            out = work / f"{variant}-{seed}"
            train(cfg, out)
            train_seconds = clock.seconds
            model, key = Model.load(out, "cpu"), f"{variant}/{seed}"
            task = model.task
            for (name, target), features in zip(targets, target_features):
                x = task.input_for(target[None], cfg)[0]
                samples = model.sample(x, n=size["samples"], seed=1000 + seed)
                scorer.add(key, variant, name, samples, target, features, None)
            summary = scorer.summary(key)
            summary["fwv_0.2"] = summary["fwv"]["0.2"] if summary["fwv"] else None
            records.append({"variant": variant, "seed": seed, "train_seconds": train_seconds,
                            "seconds": clock.seconds, "cpu_seconds": clock.cpu_seconds, **{k: summary[k] for k, _, _ in METRICS}, "fwv": summary["fwv"]})
            print(f"seed {seed} {variant:9s} FID {summary['fid']:.1f} best LPIPS {summary['lpips_best']:.4f} "
                  f"diversity {summary['diversity_lpips']:.4f} ({clock.seconds:.0f} s)", flush=True)
    jpeg = scorer.summary("jpeg")
    t = reference.train
    return {"records": records, "sizes": sizes, "jpeg": {k: jpeg[k] for k in ("fid", "kid", "lpips_mean", "psnr_mean")},
            "targets": [name for name, _ in targets], "real_images": len(targets),
            "optimiser": {"lr": t.lr, "ema": t.ema, "schedule": t.schedule}}


def table(records: list[dict]) -> dict:
    """Per variant and metric: mean, std, min, max over seeds."""
    return {v: {m: common.spread([r[m] for r in records if r["variant"] == v]) for m, _, _ in METRICS + [("seconds", "", 0)]}
            for v in VARIANTS}


DISCUSSION = """## Reading these numbers

What separates this setting from the paper's, and could make a result differ from it:

- **Scale.** The generators have about 0.1-0.25 M parameters (the paper's: 210.6 M) and train for a few hundred
  steps on nine photos (the paper's: 500 steps per training image on thousands of images). At this budget the
  optimisation, not the code search, may limit what any variant reaches, which shrinks every difference.
- **Output size.** The hierarchical search pays off when the output varies in many dimensions (DESIGN.md §2.1:
  the chance that one of m random samples lands near the target falls roughly exponentially with them). A
  32 px output varies in far fewer than a 256 px one, so a flat pool of 48 full codes may already find good
  candidates, and the 4-level tower's coarsest level sees only 4 x 4 px.
- **Equal renders are not equal compute.** Each flat candidate runs through all four levels, each hierarchical
  candidate through one; at equal renders per example the flat search spends more compute.
- **Matched compute, not matched parameters.** The 1- and 2-level generators are widened until one forward pass
  costs about what the 4-level tower's does; the 4-level tower still has more parameters (most in its small
  coarse levels and their mapping networks), so "levels" and "parameters" are not separated here.
- **Metrics at this size.** FID from a few dozen real tiles is strongly biased and noisy (see the warning above);
  KID is less biased; best-of-n LPIPS and diversity are the steadier numbers. The paper used LPIPS-VGG without
  a pixel term; these runs use LPIPS-AlexNet
  + L1 (the `small` preset's CPU choice, the same for every variant).

No setting was tuned for one variant: all share the `SHARED` overrides and schedule in the script.
"""


def verdict(summary: dict, records: list[dict], better: str, worse: str, metric: str) -> str:
    """Whether the measured means agree with `better` < `worse` (lower is better), whether the difference
    exceeds the seed spread (the two standard deviations combined), and in how many seeds the order holds."""
    a, b = summary[better][metric], summary[worse][metric]
    if a["mean"] is None or b["mean"] is None:
        return "not measured"
    gap = b["mean"] - a["mean"]
    noise = (a["std"] ** 2 + b["std"] ** 2) ** 0.5
    value = {(r["variant"], r["seed"]): r[metric] for r in records}
    seeds = sorted({r["seed"] for r in records})
    holds = sum(value[better, s] < value[worse, s] for s in seeds)
    text = f"{a['mean']:.4g} vs {b['mean']:.4g}"
    if len(seeds) < 2:
        return f"{text}: {'agrees' if gap > 0 else 'disagrees'} (one seed: no spread to judge by)"
    count = f"the paper's order in {holds} of {len(seeds)} seeds"
    if abs(gap) <= noise:
        return f"{text}: inconclusive (difference {abs(gap):.3g} within the seed spread {noise:.3g}; {count})"
    return f"{text}: {'agrees' if gap > 0 else 'disagrees'} (difference {abs(gap):.3g}, seed spread {noise:.3g}; {count})"


def plot(summary: dict, seeds: int, path: Path) -> None:
    """One row of bar charts per ablation: FID, best-of-n LPIPS, LPIPS diversity, FWV."""
    panels = []
    for title, rows in ABLATIONS.items():
        for metric, label, lower in [METRICS[0], METRICS[2], METRICS[4], METRICS[5]]:
            bars = [(row, summary[v][metric]["mean"], summary[v][metric]["std"]) for row, v, _ in rows]
            short = title.split(" (")[0]
            panels.append(common.bar_panel(f"{label}: {short}", [("", bars)], size=(360, 240), lower_is_better=lower))
    sheet = common.titled(common.stack(panels, 4), f"Decompression ablations, mean ± std over {seeds} seed(s)", 18)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def optimiser(result: dict) -> str:
    """The learning rate, its schedule and the weight average the runs trained with (a report from before they were
    recorded: the values of then, lr 0.002 at a constant rate and no average)."""
    o = result.get("optimiser", {"lr": 0.002, "ema": 0.0, "schedule": "constant"})
    average = f", sampled from a weight average (EMA {o['ema']:g}; `small`'s decompression setting)" if o["ema"] else ""
    return f"lr {o['lr']:g}, {o['schedule']}{average}"


def report(result: dict, size: dict, mode: str, run: dict) -> tuple[str, dict]:
    summary = table(result["records"])
    real, generated = result["real_images"], result["real_images"] * size["samples"]
    jpeg = result["jpeg"]
    lines = [
        f"# Ablations on real photos{' (QUICK MODE: smoke-test size, not the committed result)' if mode == 'quick' else ''}",
        "",
        common.run_line(run), "",
        f"Task: JPEG decompression (quality 1, the paper's value; 4:2:0) of the nine built-in training photos, {TILE} px crops, the "
        f"`small` preset's CPU choices (LPIPS-AlexNet + 1.0 x L1 loss, random RGB order); every variant trains "
        f"{size['rounds']} rounds of 16 examples x 30 Adam steps at batch 4 ({optimiser(result)}). Evaluation: {real} held-out "
        f"{TILE} px tiles ({size['tiles_per_photo']} from the centre of each held-out photo), {size['samples']} samples "
        f"each (seed 1000 + training seed). Training seeds {size['seeds']}; mean ± standard deviation over them.", "",
        f"> **FID at this size means little.** {fid_lib.small_sample_warning(real, generated)} Here: {real} real and "
        f"{generated} generated {TILE} px tiles, upsampled to 299 px. Read FID and KID as a ranking between rows of "
        "this report only, never against the paper's numbers.", "",
    ]
    for title, rows in ABLATIONS.items():
        lines += [f"## {title}", "",
                  "| setting | parameters | MACs / forward | FID ↓ | KID ↓ | best-of-n LPIPS ↓ | mean LPIPS ↓ | "
                  "LPIPS diversity | FWV σ=0.2 ↑ | paper FID | time per run (s) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row, v, paper in rows:
            s, sz = summary[v], result["sizes"][v]
            lines.append(f"| {row} | {sz['parameters']:,} | {sz['macs_per_forward'] / 1e6:.1f} M | {common.pm(s['fid'], 1)} | "
                         f"{common.pm(s['kid'], 4)} | {common.pm(s['lpips_best'])} | {common.pm(s['lpips_mean'])} | "
                         f"{common.pm(s['diversity_lpips'])} | {common.pm(s['fwv_0.2'], 4)} | {paper} | "
                         f"{s['seconds']['mean']:.0f} |")
        lines.append("")
    lines += ["## The paper's claims, as measured", "", "| claim | FID (better vs worse) | best-of-n LPIPS (better vs worse) |",
              "|---|---|---|"]
    for claim, better, worse in CLAIMS:
        lines.append(f"| {claim}: {better} vs {worse} | {verdict(summary, result['records'], better, worse, 'fid')} | "
                     f"{verdict(summary, result['records'], better, worse, 'lpips_best')} |")
    lines += ["", "\"Agrees\" means the ordering is the paper's and the gap exceeds the seed spread (root of the summed "
              "variances); see the discussion below for what the numbers can and cannot say at this size.", ""]
    lines += [
        f"Reference, the JPEG input itself (one output per tile): FID {jpeg['fid']:.1f}, KID {jpeg['kid']:.4f}, LPIPS "
        f"{jpeg['lpips_mean']:.3f}, PSNR {jpeg['psnr_mean']:.2f} dB.", "",
        "![ablation charts](ablations.png)", "",
        "Metrics: LPIPS v0.1 AlexNet for all LPIPS numbers; best-of-n = per tile the sample nearest the ground truth, "
        "averaged; diversity = mean LPIPS between two samples of a tile over all pairs; FWV = mean of "
        "exp(-d²/(2σ²))·s with d the LPIPS to the ground truth and s the LPIPS-feature deviation from the mean of the "
        "tile's samples (chimle.metrics.diversity); FID/KID protocol as in chimle.metrics.fid.PROTOCOL.", "",
        DISCUSSION,
        "## Per seed", "", "| variant | seed | FID | KID | best-of-n LPIPS | diversity | FWV σ=0.2 | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["records"]:
        lines.append(f"| {r['variant']} | {r['seed']} | {r['fid']:.1f} | {r['kid']:.4f} | {r['lpips_best']:.4f} | "
                     f"{r['diversity_lpips']:.4f} | {r['fwv_0.2']:.4f} | {r['seconds']:.0f} |")
    data = {"benchmark": "ablations", "mode": mode, **run, "size": size, "task": "decompression", "preset": "small",
            "shared_overrides": SHARED, "variants": VARIANTS, "ablations": ABLATIONS,
            "summary": summary, **result}
    return "\n".join(lines) + "\n", data


def main() -> None:
    parser = common.parser(__doc__, "a few-minute smoke-test size (one seed, one round)",
                           "only rewrite the Markdown report and chart from a JSON report of an earlier run")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"training rounds per run (default {SIZES['default']['rounds']}; --quick: "
                             f"{SIZES['quick']['rounds']}): a longer budget for every variant alike")
    args = parser.parse_args()
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: give at least 1")
    if args.rounds is not None and args.rewrite:
        parser.error("--rounds trains longer and --rewrite trains nothing (it redraws a saved report with the rounds "
                     "it recorded): give one of them")
    if args.rewrite:
        saved = common.read_run(args.rewrite)
        result = {k: saved[k] for k in ("records", "sizes", "jpeg", "targets", "real_images", "optimiser") if k in saved}
        markdown, data = report(result, saved["size"], saved["mode"], {k: saved[k] for k in common.RUN_KEYS})
        (args.out / "ablations.md").write_text(markdown)
        plot(data["summary"], len(saved["size"]["seeds"]), args.out / "ablations.png")
        print(f"wrote {args.out / 'ablations.md'} and {args.out / 'ablations.png'}")
        return
    mode = "quick" if args.quick else "default"
    size, load_before, clock = dict(SIZES[mode]), common.load_average(), common.Stopwatch()
    if args.rounds is not None:
        size["rounds"] = args.rounds
    with tempfile.TemporaryDirectory(prefix="chimle-ablations-") as scratch:
        result = run(size, args.work or Path(scratch))
    markdown, data = report(result, size, mode, common.run_record(clock, load_before))
    common.write("ablations", markdown, data, args.out)
    plot(data["summary"], len(size["seeds"]), args.out / "ablations.png")
    print(markdown)
    print(f"wrote {args.out / 'ablations.md'}, {args.out / 'ablations.json'} and {args.out / 'ablations.png'}")


if __name__ == "__main__":
    main()
