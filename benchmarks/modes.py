"""Mode coverage with known modes: does IMLE give every valid output of an input, where regression gives one?

    OMP_NUM_THREADS=1 python benchmarks/modes.py --quick      # a few minutes: one seed, short training
    OMP_NUM_THREADS=1 python benchmarks/modes.py              # the committed report: 6 seeds, 64 rounds
    OMP_NUM_THREADS=1 python benchmarks/modes.py --methods hierarchical --rounds 16 --out DIR
                                                              # one method, a shorter run (scored at 8 and 16)

A generated conditional data set with K valid outputs per input: the input is a grey texture, its valid outputs
are that texture tinted with each of K palette colours, and each training pair shows one of them, chosen at
random (so no input is ever seen with two colours). Three methods train the same generator with the same loss
and schedule through the `paired` task:

    hierarchical   CHIMLE: codes searched level by level (search.samples_per_level)
    flat           cIMLE: one pool of full codes, as many candidate renders as the hierarchical search
    regression     the same network with every code fixed at zero (search.zero_codes), the same loss

On held-out textures each method draws n samples (regression: its one output, every code zero), each input with
codes of its own. Each sample is assigned to its nearest valid output (RMS difference of RGB in [0, 1]) and
scored:

    coverage    modes hit per input / K: a mode is hit by a sample that lies within the threshold of it
    precision   fraction of samples within the threshold of some valid output
    structure   correlation between the sample's luminance and the input texture (1: the texture is kept)

The threshold is fixed in advance, per input, at THRESHOLD_FRACTION of the smallest distance between two of its
valid outputs, so a sample within it is unambiguously nearer one mode than any other. Writes
benchmarks/results/modes.{md,json,png} (`--out` elsewhere). Runs found complete in `--work` (same settings) are
scored without training again; a killed one is finished.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from chimle.config import changed, load_run  # noqa: E402
from chimle.data import save_image  # noqa: E402
from chimle.streams import seeded  # noqa: E402
from chimle.sample import Model, image_grid  # noqa: E402
from chimle.train import train  # noqa: E402

# Palette of the K valid tints (RGB in [0, 1]): red, green, blue, yellow.
PALETTE = torch.tensor([[0.95, 0.25, 0.20], [0.25, 0.85, 0.30], [0.25, 0.40, 0.95], [0.95, 0.85, 0.20]])
THRESHOLD_FRACTION = 1 / 3  # precision threshold, as a fraction of an input's smallest distance between two modes
SIZE = 32  # texture side, px (also the training crop)
LUMA = torch.tensor([0.299, 0.587, 0.114])  # ITU-R BT.601 luminance weights

# The generator and schedule shared by all methods (on top of the `small` preset's `paired` task settings).
MODEL = ["model.levels=3", "model.channels=[16,16,16]", "model.growth=[8,8,8]", "model.blocks=1",
         "model.noise_channels=2", "model.code_dim=16", "model.style_dim=32", "model.mapping_layers=2"]
STEPS_PER_ROUND = 30
SCHEDULE = [f"data.crop={SIZE}", "train.round_size=16", f"train.steps_per_round={STEPS_PER_ROUND}",
            "train.batch_size=4", "train.lr=0.002", "train.perceptual=alex", "train.pixel_weight=1.0",
            "train.precision=float32"]  # the committed report's step, from before `small` took up bf16 (auto)
# Hierarchical candidates per level; flat cIMLE gets their sum (24) full-code candidates. The colour is decided at
# the coarsest level: 16 candidates there against 8 raised the hierarchical coverage from 0.69 to 0.78 (mean of
# seeds 0-5, higher in 5 of them; README, "Reproducing the paper's claims").
POOLS = [16, 4, 4]
METHODS = {
    "hierarchical": [f"search.samples_per_level={POOLS}"],
    "flat": [f"search.samples_per_level={POOLS}", "search.flat=true", f"search.flat_samples={sum(POOLS)}"],
    "regression": [f"search.samples_per_level={POOLS}", "search.zero_codes=true"],
}
SIZES = {  # (training textures, rounds, held-out inputs, samples per input, seeds)
    "default": dict(train_images=96, rounds=64, inputs=16, samples=12, seeds=[0, 1, 2, 3, 4, 5],
                    curve=[8, 16, 24, 32, 48, 64]),
    "quick": dict(train_images=32, rounds=3, inputs=6, samples=8, seeds=[0]),
}


# The data ------------------------------------------------------------------------------------------------


def texture(seed: int, index: int, size: int = SIZE) -> torch.Tensor:
    """A grey texture (3, size, size) in [0.3, 1]: random oriented gratings over smooth noise."""
    g = seeded(seed, 11, index)
    y, x = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    field = F.interpolate(torch.randn(1, 1, 4, 4, generator=g), size=(size, size), mode="bicubic",
                          align_corners=False)[0, 0]
    for _ in range(2):
        angle, period, phase = torch.rand(3, generator=g).tolist()
        freq = 2 * math.pi / (4 + 8 * period)
        field = field + torch.sin(freq * (x * math.cos(math.pi * angle) + y * math.sin(math.pi * angle)) + 6.28 * phase)
    field = (field - field.min()) / (field.max() - field.min()).clamp_min(1e-6)
    return (0.3 + 0.7 * field).expand(3, -1, -1).contiguous()


def tint(grey: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """The grey texture (3, H, W) tinted with an RGB colour (3,): multiplied channel by channel."""
    return grey * colour.view(3, 1, 1)


def modes_of(grey: torch.Tensor, palette: torch.Tensor = PALETTE) -> torch.Tensor:
    """All K valid outputs (K, 3, H, W) of one input."""
    return torch.stack([tint(grey, c) for c in palette])


def write_training_pairs(folder: Path, count: int, seed: int) -> tuple[Path, Path]:
    """`count` pairs, each texture with ONE colour drawn at random: targets/ and inputs/ matched by stem. Pairs
    beyond `count` left by an earlier run with more are removed."""
    g = seeded(seed, 12)
    names = {f"{i:04d}.png" for i in range(count)}
    for i in range(count):
        grey = texture(seed, i)
        k = int(torch.randint(0, len(PALETTE), (1,), generator=g))
        save_image(grey, folder / "inputs" / f"{i:04d}.png")
        save_image(tint(grey, PALETTE[k]), folder / "targets" / f"{i:04d}.png")
    for part in ("inputs", "targets"):
        for stale in (folder / part).glob("*.png"):
            if stale.name not in names:
                stale.unlink()
    return folder / "targets", folder / "inputs"


def heldout(count: int) -> list[torch.Tensor]:
    """Held-out input textures (never trained on: their own seed), quantised as files would be."""
    return [texture(10_000, i).mul(255).round().div(255) for i in range(count)]


# The metrics ---------------------------------------------------------------------------------------------


def rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """RMS difference between every image of a (N, ...) and every image of b (K, ...): (N, K)."""
    return torch.cdist(a.flatten(1).double(), b.flatten(1).double()).float() / math.sqrt(a[0].numel())


def threshold(modes: torch.Tensor, fraction: float = THRESHOLD_FRACTION) -> float:
    """An input's precision threshold: `fraction` of the smallest distance between two of its valid outputs."""
    d = rms(modes, modes)
    d.fill_diagonal_(float("inf"))
    return fraction * float(d.min())


def structure(samples: torch.Tensor, grey: torch.Tensor) -> torch.Tensor:
    """(N,) Pearson correlation of each sample's luminance with the input texture."""
    luma = (samples * LUMA.view(1, 3, 1, 1)).sum(1).flatten(1)
    ref = grey[0].flatten()[None]
    luma, ref = luma - luma.mean(1, keepdim=True), ref - ref.mean(1, keepdim=True)
    return (luma * ref).sum(1) / (luma.norm(dim=1) * ref.norm(dim=1)).clamp_min(1e-12)


def score_input(samples: torch.Tensor, modes: torch.Tensor, grey: torch.Tensor,
                fraction: float = THRESHOLD_FRACTION) -> dict:
    """Coverage, precision, nearest-mode distance and structure of n samples of one input with K valid outputs;
    and the precision once each sample's tint is corrected (`tint_corrected`), which tells a sample whose colour
    is off from one whose texture is."""
    d = rms(samples, modes)
    nearest, mode = d.min(1)
    tau = threshold(modes, fraction)
    precise = nearest <= tau
    hit = torch.zeros(len(modes), dtype=torch.bool)
    hit[mode[precise]] = True
    return {"coverage": float(hit.float().mean()), "precision": float(precise.float().mean()),
            "tint_corrected_precision": float((tint_corrected(samples, modes[mode]) <= tau).float().mean()),
            "nearest_distance": float(nearest.mean()), "structure": float(structure(samples, grey).mean()),
            "threshold": tau, "assigned": torch.bincount(mode, minlength=len(modes)).tolist(),
            "modes_hit": hit.int().tolist()}


def tint_corrected(samples: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) RMS difference between each sample, its colour channels scaled by the gains that fit it best to its
    target (least squares, one gain per channel), and that target."""
    gain = (samples * targets).sum((2, 3), keepdim=True) / samples.pow(2).sum((2, 3), keepdim=True).clamp_min(1e-12)
    return (samples * gain - targets).pow(2).flatten(1).mean(1).sqrt()


def ideal_coverage(k: int, n: int) -> float:
    """Expected coverage of a perfect sampler drawing each of the k modes with probability 1/k, n times."""
    return 1 - (1 - 1 / k) ** n


def ideal_hits(k: int, n: int) -> list[float]:
    """P(exactly j of the k modes are hit) for j = 0..k, for a perfect sampler drawing n times (each mode 1/k)."""
    onto = [sum((-1) ** i * math.comb(j, i) * (j - i) ** n for i in range(j + 1)) for j in range(k + 1)]
    return [math.comb(k, j) * onto[j] / k ** n for j in range(k + 1)]


def ideal_below(k: int, n: int, inputs: int, level: float, shared: bool) -> float:
    """The chance that a perfect sampler's coverage over `inputs` held-out inputs falls below `level`: with one
    set of n codes for all inputs (`shared`), that of one input; with codes of each input's own, that of the mean
    of `inputs` independent inputs (the exact distribution of their summed hits)."""
    hits = ideal_hits(k, n)
    if shared:
        inputs = 1
    total = [1.0]
    for _ in range(inputs):
        total = [sum(total[t - j] * hits[j] for j in range(k + 1) if 0 <= t - j < len(total))
                 for t in range(len(total) + k)]
    return sum(p for t, p in enumerate(total) if t < level * k * inputs - 1e-9)


# The benchmark -------------------------------------------------------------------------------------------


def sampling_seed(seed: int, index: int) -> int:
    """The sampling seed of held-out input `index` in the run of training seed `seed`: every input gets codes of
    its own, so a seed's coverage averages over inputs x n draws instead of repeating one set of n draws."""
    return (1000 + seed) * 1000 + index


def shared_seed(seed: int) -> int:
    """One sampling seed for every held-out input (the benchmark's estimator before `sampling_seed`): input i's
    sample k then has the code of every other input's sample k, so all inputs share one lottery of n draws."""
    return 1000 + seed


def draw(model: Model, method: str, grey: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n samples of one input; the regression baseline has one output (every code zero), repeated."""
    if method == "regression":
        return model.zero_codes(grey).expand(n, -1, -1, -1)
    return model.sample(grey, n=n, seed=seed)


def methods_of(size: dict) -> list[str]:
    """The methods a run trains: `--methods`, or all (a report written before that option names none)."""
    return size.get("methods", list(METHODS))


RUN_FILE = "benchmark-run.json"  # in a finished run's folder: its training pairs and how long its training took
PATHS = ("data.path", "data.inputs")  # where a seed's pairs lie: the same pairs wherever --work is


def trained(cfg, out: Path, pairs: int, on_save=None) -> dict | None:
    """Train the run in `out` on `pairs` training pairs. A folder that already holds this run (the same settings
    and pairs) is scored as it stands if it is finished, and finished if it was killed, so a report can be
    re-scored without training again. The wall and CPU seconds of its whole training (kept in RUN_FILE), or None
    where they are not known (a run finished here after a kill, or trained before RUN_FILE was kept)."""
    if not (out / "config.yaml").is_file():
        clock = common.Stopwatch()
        train(cfg, out, on_save=on_save)
        took = {"seconds": clock.seconds, "cpu_seconds": clock.cpu_seconds}
        (out / RUN_FILE).write_text(json.dumps({"train_images": pairs, **took}) + "\n")
        return took
    differ = {k: v for k, v in changed(load_run(out / "config.yaml"), cfg).items() if k not in PATHS}
    done = json.loads((out / RUN_FILE).read_text()) if (out / RUN_FILE).is_file() else None
    if done and done["train_images"] != pairs:
        differ["training pairs"] = (done["train_images"], pairs)
    if differ:
        raise SystemExit(f"{out} holds a run with other settings ("
                         + ", ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in differ.items())
                         + "): give a fresh --work folder, or the settings of that run")
    if done:
        return {k: done[k] for k in ("seconds", "cpu_seconds")}
    train(None, out, resume=True, on_save=on_save, settings={"data": {"path": cfg.data.path,
                                                                       "inputs": cfg.data.inputs}})
    return None


def score_model(model: Model, method: str, size: dict, seed: int, grid_rows: int = 0) -> tuple[dict, list, list]:
    """A model's mean scores over the held-out inputs (and the coverage with shared codes), the per-input scores,
    and sample grids of the first `grid_rows` inputs."""
    scores, shared, grids = [], [], []
    for i, grey in enumerate(heldout(size["inputs"])):
        valid = modes_of(grey)
        samples = draw(model, method, grey, size["samples"], seed=sampling_seed(seed, i))
        scores.append(score_input(samples, valid, grey[:1]))
        shared.append(score_input(draw(model, method, grey, size["samples"], seed=shared_seed(seed)),
                                  valid, grey[:1])["coverage"])
        if i < grid_rows:
            grids.append([grey, *samples[:8]])
    summary = {k: sum(s[k] for s in scores) / len(scores)
               for k in ("coverage", "precision", "tint_corrected_precision", "nearest_distance", "structure")}
    summary["coverage_shared"] = sum(shared) / len(shared)
    assigned = torch.tensor([s["assigned"] for s in scores]).sum(0)
    summary["shares"] = (assigned / assigned.sum()).tolist()  # of all samples, nearest to each mode
    return summary, scores, grids


def run(size: dict, work: Path) -> dict:
    """Train (or finish, see `trained`) and score every method for every seed; the per-seed records. With
    size["curve"] (rounds), the model after each of those rounds is kept and scored too."""
    records = []
    for seed in size["seeds"]:
        targets, inputs = write_training_pairs(work / f"data-{seed}", size["train_images"], seed)
        for method in methods_of(size):
            cfg = common.config("paired", [*MODEL, *SCHEDULE, *METHODS[method], *size.get("overrides", []),
                                           f"train.rounds={size['rounds']}",
                                           f"train.seed={seed}", f"data.path={targets}", f"data.inputs={inputs}"])
            out = work / f"{method}-{seed}"
            curve = {r: out / "curve" / f"round-{r:04d}.safetensors" for r in size.get("curve", [])}

            def keep(step: int, model_file: Path) -> None:
                rounds, rest = divmod(step, STEPS_PER_ROUND)
                if not rest and rounds in curve:
                    curve[rounds].parent.mkdir(exist_ok=True)
                    shutil.copyfile(model_file, curve[rounds])

            took = trained(cfg, out, size["train_images"], keep)
            scoring = common.Stopwatch()
            summary, scores, grids = score_model(Model.load(out, "cpu"), method, size, seed,
                                                 3 if seed == size["seeds"][0] else 0)
            points = []
            for r, path in curve.items():
                if not path.is_file():
                    raise SystemExit(f"{out} finished without a model of round {r} (it was trained before --curve "
                                     "named that round): give a fresh --work folder")
                points.append({"rounds": r, **score_model(Model.load(path, "cpu"), method, size, seed)[0]})
            # Training and scoring; None for a run whose training was not timed whole (finished after a kill).
            seconds = {k: took and took[k] + getattr(scoring, k) for k in ("seconds", "cpu_seconds")}
            records.append({"seed": seed, "method": method, **summary, "train_seconds": took and took["seconds"],
                            **seconds, "per_input": scores,
                            "size": common.model_size(cfg), **({"curve": points} if points else {})})
            print(f"seed {seed} {method:12s} coverage {summary['coverage']:.3f} (shared codes "
                  f"{summary['coverage_shared']:.3f}) precision {summary['precision']:.3f} "
                  f"structure {summary['structure']:.3f} (training {took['seconds'] if took else '?'} s)"
                  + "".join(f"; round {p['rounds']}: {p['coverage']:.3f}" for p in points), flush=True)
            if grids:
                records[-1]["grid_rows"] = grids
    return {"records": records}


def plot(records: list[dict], size: dict, path: Path) -> None:
    """Sample grids of the first seed (input | samples, per method) beside bars of coverage and precision."""
    panels = []
    example = heldout(1)[0]
    modes = image_grid([[example, *modes_of(example)]], pad=2)
    panels.append(common.titled(common.to_pil(modes).resize((modes.shape[-1] * 3, modes.shape[-2] * 3), 0),
                                "a held-out input and its K valid outputs"))
    for r in records:
        if "grid_rows" in r:
            grid = image_grid(r["grid_rows"], pad=2)
            pil = common.to_pil(grid).resize((grid.shape[-1] * 3, grid.shape[-2] * 3), 0)
            panels.append(common.titled(pil, f"{r['method']}: input | 8 samples (seed {r['seed']})"))
    bars = []
    for metric in ("coverage", "precision", "structure"):
        group = [(m, *_mean_std(records, m, metric)) for m in methods_of(size)]
        bars.append(common.bar_panel(f"{metric} (mean ± std over {len(size['seeds'])} seed(s))",
                                     [("", group)], size=(380, 260), lower_is_better=False))
    curves = []
    for m in methods_of(size):
        points = curve_points(records, m)
        if points:
            curves += [(f"{m}, mean", list(points), [common.spread(v)["mean"] for v in points.values()]),
                       (f"{m}, lowest seed", list(points), [min(v) for v in points.values()])]
    if curves:
        bars.append(common.line_panel("coverage along training (held-out)", curves, "rounds", size=(380, 260),
                                      guides={"0.9": 0.9, "0.8": 0.8}))
    sheet = common.stack([common.stack(panels, 1), common.stack(bars, 1)], 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def _shares(record: dict) -> str:
    """The shares of a run's samples nearest each mode (a report from before they were kept: the first input's
    counts)."""
    if "shares" not in record:
        return f"{record['per_input'][0]['assigned']} (first input)"
    return ", ".join(f"{v:.2f}" for v in record["shares"])


def _seconds(stats: dict) -> str:
    """Mean seconds per run, or a note where no run's training was timed whole (see `trained`)."""
    return f"{stats['mean']:.0f}" if stats.get("n") else "not timed"


def _shared(records: list[dict], method: str) -> str:
    """Mean ± std of the shared-codes coverage ('-' for a report written before it was measured)."""
    values = [r["coverage_shared"] for r in records if r["method"] == method and "coverage_shared" in r]
    return common.pm(common.spread(values)) if values else "-"


def _mean_std(records: list[dict], method: str, metric: str) -> tuple[float, float]:
    stats = common.spread([r[metric] for r in records if r["method"] == method])
    return stats["mean"], stats["std"]


def compare(table: dict, records: list[dict], better: str, worse: str, metric: str) -> str:
    """Whether `better` has the higher mean of `metric`, whether the gap exceeds the seed spread, and in how many
    seeds it is higher."""
    a, b = table[better][metric], table[worse][metric]
    gap, noise = a["mean"] - b["mean"], (a["std"] ** 2 + b["std"] ** 2) ** 0.5
    value = {(r["method"], r["seed"]): r[metric] for r in records}
    seeds = sorted({r["seed"] for r in records})
    wins = sum(value[better, s] > value[worse, s] for s in seeds)
    text = f"{a['mean']:.3f} vs {b['mean']:.3f}"
    if len(seeds) < 2:
        return f"{text}: {'higher' if gap > 0 else 'not higher'} (one seed: no spread to judge by)"
    if abs(gap) <= noise:
        return f"{text}: inconclusive (gap {abs(gap):.3f} within the seed spread {noise:.3f}; higher in {wins} of {len(seeds)} seeds)"
    return (f"{text}: {'higher' if gap > 0 else 'LOWER'} (gap {abs(gap):.3f}, seed spread {noise:.3f}; higher in {wins} "
            f"of {len(seeds)} seeds)")


def claims(table: dict, records: list[dict]) -> list[str]:
    """The section on the paper's claims: each comparison whose two methods were run."""
    lines = []
    if {"hierarchical", "flat", "regression"} <= table.keys():
        lines.append(f"- IMLE covers the modes that regression cannot: coverage, hierarchical vs regression "
                     f"{compare(table, records, 'hierarchical', 'regression', 'coverage')}; flat vs regression "
                     f"{compare(table, records, 'flat', 'regression', 'coverage')}.")
    if {"hierarchical", "flat"} <= table.keys():
        lines.append(f"- Hierarchical vs flat search at equal renders: coverage "
                     f"{compare(table, records, 'hierarchical', 'flat', 'coverage')}; precision "
                     f"{compare(table, records, 'hierarchical', 'flat', 'precision')}; structure "
                     f"{compare(table, records, 'hierarchical', 'flat', 'structure')}.")
    return ["## The claims, as measured", "", *lines, ""] if lines else []


DISCUSSION = """## Reading these numbers

- Regression with every code fixed gives one output per input, so its coverage is at most 1/K; trained with a
  loss that pulls one output towards targets of all K colours, it settles between them (a blend, or the
  colour that is cheapest under LPIPS + L1), which is also why its precision can be zero.
- IMLE's promise is that every training target has a sample near it, so every colour the data shows for
  similar inputs gets some region of the code space. Coverage measures that directly; precision measures
  whether the samples are clean tints or in-between colours, which a small model trained for minutes produces
  at the boundaries between code regions.
- Hierarchical and flat search are given the same number of candidate renders. The colour is a global property,
  decided at the coarsest level, where the hierarchical search spends its largest pool ({coarse} of {renders} renders) and
  judges candidates by the coarse output alone; the flat search judges {renders} full samples at the last level,
  where colour and texture detail are mixed in one distance. With K = 4 modes and 32 px outputs both can in
  principle find a candidate of the target's colour.
- What holds the coverage below the ideal sampler's is precision, not a lost colour: every colour holds a share
  of the code space, but a sample's tint varies continuously with its code (and a little with the finer levels'
  codes), and only the codes near the middle of a colour's region give that colour within the threshold. Scaling
  each sample's channels by the best-fitting gains makes almost every sample precise (the per-seed table's "tint
  corrected" column): the texture is right, the tint is off. Training pulls the codes the search picks onto the
  exact tint, so precision, and with it coverage, grows with training (see "Along training" where it was run).
- The code decides the colour the same way for every input (sample i of every held-out input has the same
  colour), so the code space is shared, not memorised. That is also why each input draws codes of its own: with
  one set of codes for all inputs, a seed's coverage is decided by whether those few codes happen to fall in
  precise parts of every colour's region, a lottery that can land far from the model's mean either way (compare
  the two coverage columns of the per-seed table).
- The threshold (a third of the distance between the two closest valid outputs) was fixed before any run and is
  the same for all methods.
"""


def curve_points(records: list[dict], method: str, metric: str = "coverage") -> dict[int, list[float]]:
    """{rounds: that metric of every seed} along the training of one method's runs (`--curve`)."""
    points: dict[int, list[float]] = {}
    for r in records:
        for c in r.get("curve", []) if r["method"] == method else []:
            points.setdefault(c["rounds"], []).append(c[metric])
    return dict(sorted(points.items()))


def curve_section(records: list[dict], size: dict) -> list[str]:
    """The learning curve (`--curve`): coverage and precision after each listed round, over seeds."""
    if not any(r.get("curve") for r in records):
        return []
    lines = ["## Along training", "",
             "The same runs, scored (as above) on the model after each of these rounds. With the benchmark's constant "
             "learning rate, the model after r rounds is the one a run of r rounds would give.", "",
             "| method | rounds | coverage ↑ | lowest seed | precision ↑ | precision, tint corrected |",
             "|---|---|---|---|---|---|"]
    for m in methods_of(size):
        precision = curve_points(records, m, "precision")
        corrected = curve_points(records, m, "tint_corrected_precision")
        for rounds, coverage in curve_points(records, m).items():
            lines.append(f"| {m} | {rounds} | {common.pm(common.spread(coverage))} | {min(coverage):.3f} | "
                         f"{common.pm(common.spread(precision[rounds]))} | "
                         f"{common.pm(common.spread(corrected[rounds]))} |")
    return [*lines, ""]


def report(result: dict, size: dict, mode: str, run: dict) -> tuple[str, dict]:
    records = result["records"]
    k, n = len(PALETTE), size["samples"]
    table = {m: {metric: common.spread([r[metric] for r in records if r["method"] == m])
                 for metric in ("coverage", "precision", "nearest_distance", "structure", "seconds")}
             for m in methods_of(size)}
    cfg_size = next(r["size"] for r in records)
    lines = [
        f"# Mode coverage with known modes{' (QUICK MODE: smoke-test size, not the committed result)' if mode == 'quick' else ''}",
        "",
        common.run_line(run), "",
        f"Data: grey {SIZE}x{SIZE} textures (gratings over smooth noise); the valid outputs of an input are the texture "
        f"tinted with each of K = {k} colours (red, green, blue, yellow); each of the {size['train_images']} training "
        "pairs shows one colour, drawn at random. Held-out: "
        f"{size['inputs']} new textures, {n} samples each (regression: its single output, every code zero).", "",
        f"Methods: the same generator ({cfg_size['parameters']:,} parameters, {len(POOLS)} levels, "
        f"{cfg_size['macs_per_forward'] / 1e6:.1f} M MACs per forward), loss (LPIPS-AlexNet + 1.0 x L1) and schedule "
        f"({size['rounds']} rounds of 16 examples, 30 steps of batch 4 each); hierarchical pools {POOLS} "
        f"({sum(POOLS)} renders per example), flat cIMLE {sum(POOLS)} full-code candidates, regression every code zero. "
        f"Seeds (training data, weights, pools): {size['seeds']}; held-out input i is sampled with seed "
        "(1000 + seed) x 1000 + i, so every input has codes of its own."
        + (f" Besides, for every method: `{' '.join(size['overrides'])}` (these settings win over the above)."
           if size.get("overrides") else ""), "",
        "| method | coverage ↑ | lowest seed | coverage, shared codes | precision ↑ | RMS to nearest mode ↓ | "
        "structure ↑ | time per run (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, t in table.items():
        lowest = min(r["coverage"] for r in records if r["method"] == m)
        lines.append(f"| {m} | {common.pm(t['coverage'])} | {lowest:.3f} | {_shared(records, m)} | "
                     f"{common.pm(t['precision'])} | {common.pm(t['nearest_distance'])} | "
                     f"{common.pm(t['structure'])} | {_seconds(t['seconds'])} |")
    below = {shared: ideal_below(k, n, size["inputs"], 0.8, shared) for shared in (False, True)}
    ideal = ideal_coverage(k, n)
    lines += [
        f"| ideal sampler (uniform over modes) | {ideal:.3f} | | {ideal:.3f} | 1 | 0 | 1 | |",
        f"| one exact mode per input (best regression can do) | {1 / k:.3f} | | {1 / k:.3f} | 1 | 0 | 1 | |", "",
        "Mean ± standard deviation over seeds. Coverage: modes within the threshold of some sample, per input, / K, "
        f"averaged over the {size['inputs']} held-out inputs, each sampled {n} times with codes of its own. Coverage, "
        f"shared codes: the same with one set of {n} codes for every input (the estimator of this benchmark's earlier "
        "reports). Both estimate the same expected coverage, but the shared codes make a seed's number one lottery "
        f"of {n} draws, the same for all {size['inputs']} inputs: a perfect sampler would fall below 0.8 in "
        f"{below[True]:.1%} of seeds that way, and in {below[False]:.1e} of them with codes of each input's own. "
        "Precision: samples within the threshold of their nearest valid output; tint corrected (per seed, below): the "
        "same once each sample's colour channels are scaled by the gains that fit it best to that output, so a sample "
        f"whose texture is right and only its tint is off counts. Threshold: {THRESHOLD_FRACTION:.3g} x "
        "the smallest RMS distance between two valid outputs of the input (fixed before any run; about "
        f"{sum(s['threshold'] for s in records[0]['per_input']) / len(records[0]['per_input']):.3f} in RGB [0, 1]). "
        "Structure: Pearson correlation of the sample's luminance with the input texture.", "",
        "![samples and scores](modes.png)", "",
        *claims(table, records), *curve_section(records, size), DISCUSSION.format(coarse=POOLS[0], renders=sum(POOLS)),
        "## Per seed", "",
        "| seed | method | coverage | coverage, shared codes | precision | precision, tint corrected | "
        "RMS to nearest mode | structure | share of the samples nearest each mode (R, G, B, Y) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        shared, corrected = (f"{r[k]:.3f}" if k in r else "-" for k in ("coverage_shared", "tint_corrected_precision"))
        lines.append(f"| {r['seed']} | {r['method']} | {r['coverage']:.3f} | {shared} | {r['precision']:.3f} | "
                     f"{corrected} | "
                     f"{r['nearest_distance']:.3f} | {r['structure']:.3f} | {_shares(r)} |")
    data = {"benchmark": "modes", "mode": mode, **run, "size": size, "palette": PALETTE.tolist(),
            "threshold_fraction": THRESHOLD_FRACTION, "overrides": {"preset": "small", "task": "paired",
                                                                    "common": MODEL + SCHEDULE, "methods": METHODS,
                                                                    "every method": size.get("overrides", [])},
            "summary": table, "records": [{k: v for k, v in r.items() if k != "grid_rows"} for r in records]}
    return "\n".join(lines) + "\n", data


def main() -> None:
    parser = common.parser(__doc__, "a few-minute smoke-test size (one seed)",
                           "only rewrite the Markdown report from a JSON report of an earlier run (no training)")
    parser.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], help="e.g. 0,1,2,3,4,5")
    parser.add_argument("--rounds", type=int, help="training rounds of every run")
    parser.add_argument("--train-images", type=int, help="training textures (pairs) per seed")
    parser.add_argument("--methods", type=lambda v: v.split(","), help=f"a subset of {','.join(METHODS)}")
    parser.add_argument("--curve", type=lambda v: sorted({int(x) for x in v.split(",")}),
                        help="also score the models after these rounds, e.g. 8,16,32,64 (trains to the last)")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a config setting for every method, after the benchmark's own (repeatable)")
    args = parser.parse_args()
    if args.methods and not set(args.methods) <= METHODS.keys():
        parser.error(f"--methods: choose from {', '.join(METHODS)}")
    if args.rewrite:
        saved = common.read_run(args.rewrite)
        markdown, _ = report({"records": saved["records"]}, saved["size"], saved["mode"],
                             {k: saved[k] for k in common.RUN_KEYS})
        (args.out / "modes.md").write_text(markdown)
        print(f"wrote {args.out / 'modes.md'}")
        return
    mode = "quick" if args.quick else "default"
    size, load_before, clock = dict(SIZES[mode]), common.load_average(), common.Stopwatch()
    size.update({k: v for k, v in (("seeds", args.seeds), ("rounds", args.rounds), ("methods", args.methods),
                                   ("train_images", args.train_images)) if v})
    if args.override:
        size["overrides"] = args.override
    if args.curve:
        if args.curve[0] < 1 or args.rounds and args.rounds < args.curve[-1]:
            parser.error(f"--curve {','.join(map(str, args.curve))}: rounds from 1 to --rounds")
        size.update(curve=args.curve, rounds=args.rounds or args.curve[-1])
    size["curve"] = [r for r in size.get("curve", []) if r <= size["rounds"]]  # --rounds below the default curve
    with tempfile.TemporaryDirectory(prefix="chimle-modes-") as scratch:
        work = args.work or Path(scratch)
        result = run(size, work)
        plot(result["records"], size, args.out / "modes.png")
    markdown, data = report(result, size, mode, common.run_record(clock, load_before))
    md, js = common.write("modes", markdown, data, args.out)
    print(markdown)
    print(f"wrote {md}, {js} and {args.out / 'modes.png'}")


if __name__ == "__main__":
    main()
