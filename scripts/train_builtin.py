"""Train one built-in model, score it on held-out photos, and write its model file, record and model card.

    OMP_NUM_THREADS=2 python scripts/train_builtin.py --task super-resolution             # RECIPES below; resumable
    OMP_NUM_THREADS=2 python scripts/train_builtin.py --task super-resolution --install   # ... into the package
    python scripts/train_builtin.py --task colourization --minutes 240     # length from a CPU-time budget
    python scripts/train_builtin.py --task decompression --device cuda     # on one GPU
    python scripts/train_builtin.py --task super-resolution -o train.rounds=400   # longer (also to extend a run)
    python scripts/train_builtin.py --task super-resolution --quick --out /tmp/b  # smoke run: tiny preset, minutes
    python scripts/train_builtin.py --task super-resolution --out runs/builtin-sr-vgg \
        --init builtin:super-resolution -o train.perceptual=vgg ...           # fine-tune a model (FINETUNES below)

What it does, each step resumable (a killed run continues with the same command; run again after it finished,
it scores the model again):
1. Trains the task's recipe (a preset and overrides, RECIPES below) with chimle.train.train into OUT/run. With
   `--minutes M`, a new run's `train.rounds` is set so that training takes about M CPU-minutes on this machine
   (from a timing of one round: its code search and steps); a resumed run keeps its length.
2. Scores the model (LPIPS-VGG, 8 samples per input, seed 0) on the held-out sets of benchmarks/quality.py's
   `heldout_sets`: the demo's 12 tiles of the built-in held-out photos, and one centre 128 px tile of each
   held-out photo of the open photo set (tasks whose inputs are made from photos): best-of-8 and mean LPIPS,
   their ratios to the task's baseline, the diversity between samples, the consistency with the input.
3. Scores its weights stored in float16 the same way, and keeps float16 if that moves best-of-8 LPIPS by less
   than FLOAT16_TOLERANCE on every set (the measurement goes into the record), else float32.
4. Writes OUT/TASK.safetensors, OUT/TASK.json (the record: recipe, data and licences, steps, CPU time, machine,
   numbers, the command), OUT/TASK.md (the model card, made from the record by chimle.builtin.card) and
   OUT/TASK.jpg (held-out tiles: input | baseline | samples | ground truth). With --install it copies the model
   and record into src/chimle/assets/models/ and the card and picture to docs/models/, refusing if the package
   would exceed the wheel's limit (chimle.builtin.WHEEL_LIMIT).

CPU time is this script's process time during training (all threads), added up over the sessions of a resumed
run, each up to its last checkpoint.

With `--init MODEL` (builtin:TASK, a model file or a run directory) the run starts from those weights, as
`chimle train --init` does. The starting model's sha256 and, for a built-in one, its record are kept in
OUT/init.json when the run starts (installing the result replaces builtin:TASK), and go into the new record as
`init`: the card then says what the model was fine-tuned from, and its training time counts both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import common  # noqa: E402
import quality  # noqa: E402

from chimle import __version__, builtin, checkpoint, demo, photoset, tasks  # noqa: E402
from chimle import train as training  # noqa: E402
from chimle.checkpoint import atomic_write, load_model, save_model  # noqa: E402
from chimle.config import Config, load_run, resolve, user_settings  # noqa: E402
from chimle.data import list_images  # noqa: E402
from chimle.generator import count_parameters  # noqa: E402
from chimle.perceptual import LPIPS  # noqa: E402
from chimle.sample import Model, image_grid  # noqa: E402

# ---- The recipes ---------------------------------------------------------------------------------------------
# One per task: a preset and overrides of it; `train.rounds` is the length. PHOTOS stands for the open photo set's
# training split (chimle.photoset.folder("train")), NIGHT_PAIRS for night -> day pairs made from it as the paired
# demo makes them (chimle.tasks.night_shot). The lengths are those the installed models were trained for, on one
# thread: super-resolution 161 CPU-minutes, colourization 68, decompression 77. Super-resolution and decompression
# hold the rate constant, then lower it along a half cosine over their last 24 and 16 rounds (stable-decay): their
# constant-rate runs of 100 and 56 rounds were extended into that decay, which moved best-of-8 / baseline on the
# held-out photos 0.844 -> 0.836 and 0.856 -> 0.851 (the constant-rate learning curve had flattened: README,
# "Quality at a fixed CPU budget"). A longer run is `-o train.rounds=N`, which also extends a finished run.
# The installed models were trained in float32, before `small` took up train.precision=auto: the recipes pin it.
FLOAT32 = ["train.precision=float32"]
# The installed super-resolution model draws the image at every level, before `small` took up residual levels.
DRAWN = ["model.predict_residual=false"]
# The installed decompression model was trained with one distance throughout, before `small` took up LPIPS-VGG for
# its last 2 rounds (train.final_perceptual).
ONE_DISTANCE = ["train.final_perceptual=", "train.final_rounds=0"]
RECIPES: dict[str, dict] = {
    # The rate the installed model was trained at, before `small` took up 0.004 for super-resolution.
    "super-resolution": {"preset": "small", "overrides": [
        *FLOAT32, *DRAWN, "data.path=PHOTOS", "train.ema=0.999", "train.lr=0.002", "train.rounds=124",
        "train.schedule=stable-decay", "train.decay_rounds=24"]},
    # The rate the installed model was trained at, before `small` took up 0.004 for colourization.
    "colourization": {"preset": "small", "overrides": [*FLOAT32, "data.path=PHOTOS", "train.ema=0.999",
                                                    "train.lr=0.002", "train.rounds=64"]},
    "decompression": {"preset": "small", "overrides": [
        *FLOAT32, *ONE_DISTANCE, "data.path=PHOTOS", "train.ema=0.999", "train.rounds=72",
        "train.schedule=stable-decay", "train.decay_rounds=16"]},
    "paired": {"preset": "small", "overrides": [*FLOAT32, "data.path=NIGHT_PAIRS", "train.rounds=12"]},
    "layout": {"preset": "small", "overrides": [*FLOAT32, "train.rounds=12"]},  # the built-in photos and label maps
}
# Fine-tuning recipes, used instead of RECIPES with `--init`: the task's model trained by its recipe above and
# installed, then `scripts/train_builtin.py --task TASK --init builtin:TASK --install` (the record keeps both).
# LPIPS-VGG in the loss (README, "LPIPS-VGG in the loss"): best-of-8 / baseline on the held-out photos,
# super-resolution 0.836 -> 0.805, decompression 0.851 -> 0.802 in 12 rounds. The installed decompression model
# is that run extended to 16 rounds (`-o train.rounds=16`, the decay restarting over the last 8): 0.789. The
# installed super-resolution model is a second fine-tune of that 0.805 model by the recipe below, which adds
# `train.pixel_weight=0.3` (the L1 term at 0.3 of the preset's weight): 0.805 -> 0.799 (0.802 -> 0.798 as the mean
# over sampling seeds 0-2); twice the candidates per level on top of it gave 0.799 (mean), no gain.
FINETUNES: dict[str, dict] = {
    "super-resolution": {"preset": "small", "overrides": [
        *FLOAT32, *DRAWN, "data.path=PHOTOS", "train.ema=0.999", "train.perceptual=vgg", "train.lr=0.001",
        "train.rounds=12",
        "train.schedule=stable-decay", "train.decay_rounds=8", "train.pixel_weight=0.3"]},
    "decompression": {"preset": "small", "overrides": [
        *FLOAT32, *ONE_DISTANCE, "data.path=PHOTOS", "train.ema=0.999", "train.perceptual=vgg", "train.lr=0.001",
        "train.rounds=12", "train.schedule=stable-decay", "train.decay_rounds=8"]},
}
# --------------------------------------------------------------------------------------------------------------

QUICK = {"preset": "tiny", "rounds": 2, "photos": 4}  # --quick: a smoke run of the whole script
SAMPLES = 8  # samples per held-out input
GRID_TILES, GRID_SAMPLES = 4, 6  # held-out tiles and samples of each shown in the card's picture
FLOAT16_TOLERANCE = 0.002  # largest change of best-of-8 LPIPS for which the weights are stored in float16
MODELS, CARDS = REPO / "src" / "chimle" / "assets" / "models", REPO / "docs" / "models"


def recipe(task: str, quick: bool, finetune: bool = False) -> tuple[str, list[str]]:
    """The preset and overrides of `task`'s recipe, or of its fine-tuning recipe where there is one (for --quick:
    the tiny preset, QUICK's length)."""
    chosen = FINETUNES.get(task, RECIPES[task]) if finetune else RECIPES[task]
    preset, overrides = chosen["preset"], list(chosen["overrides"])
    if quick:
        preset = QUICK["preset"]
        overrides = [o for o in overrides if not o.startswith("train.rounds=")] + [f"train.rounds={QUICK['rounds']}"]
    return preset, overrides


def with_data(overrides: list[str], out: Path) -> list[str]:
    """The overrides with PHOTOS and NIGHT_PAIRS replaced by folders (built on first use)."""
    placeholders = {"PHOTOS": lambda: photoset.folder("train"), "NIGHT_PAIRS": lambda: demo.make_pairs(
        tasks.get("paired"), photoset.folder("train"), out / "pairs")}
    result = []
    for override in overrides:
        key, _, value = override.partition("=")
        result.append(f"{key}={placeholders[value]()}" if value in placeholders else override)
    return result


def train(task: str, args, out: Path) -> tuple[Config, dict, dict]:
    """Train the recipe (or continue its run) in out/run; returns the run's config, the recipe it was given
    (OUT/recipe.json: preset and overrides, those of every session) and the time it took."""
    run, times_file, recipe_file = out / "run", out / "time.json", out / "recipe.json"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if (run / "config.yaml").is_file():
        if args.minutes:
            print(f"--minutes is ignored: {run} keeps the length it started with (give -o train.rounds=N to change it)")
        settings = user_settings(None, args.overrides) if args.overrides else None
        config = None
        used = json.loads(recipe_file.read_text())
        used["overrides"] += [o for o in args.overrides if _latest(used["overrides"], o) != o]
    else:
        preset, overrides = recipe(task, args.quick, finetune=args.init is not None)
        used = {"preset": preset, "overrides": [*overrides, *args.overrides]}
        if args.init:
            atomic_write(out / "init.json", json.dumps(starting_model(args.init), indent=1).encode())
        config = resolve(task=task, preset=preset, overrides=with_data(used["overrides"], out))
        if args.minutes:
            seconds = quality.round_seconds(config, device)
            rounds = max(1, round(args.minutes * 60 / seconds))
            print(f"one round takes {seconds:.0f} s here: {rounds} rounds for {args.minutes:g} minutes")
            used["overrides"].append(f"train.rounds={rounds}")
            config = resolve(task=task, preset=preset, overrides=with_data(used["overrides"], out))
        settings = None
    atomic_write(recipe_file, json.dumps(used).encode())
    steps_per_round = (config or load_run(run / "config.yaml")).train.steps_per_round
    before = json.loads(times_file.read_text()) if times_file.is_file() else {"cpu_seconds": 0.0, "wall_seconds": 0.0}
    cpu, wall = time.process_time(), time.perf_counter()

    def record_time(step: int, model_file: Path) -> None:
        spent = {"cpu_seconds": before["cpu_seconds"] + time.process_time() - cpu,
                 "wall_seconds": before["wall_seconds"] + time.perf_counter() - wall, "step": step}
        atomic_write(times_file, json.dumps(spent).encode())
        if args.snapshot_every and step % (args.snapshot_every * steps_per_round) == 0:
            keep_snapshot(out, step, model_file, spent)

    training.train(config, run, resume=config is None, device=str(device), settings=settings, on_save=record_time,
                   init=args.init)
    spent = json.loads(times_file.read_text()) if times_file.is_file() else before
    machine = common.cpu()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return load_model(run)[1], used, {
        "cpu_seconds": spent["cpu_seconds"], "wall_seconds": spent["wall_seconds"],
        "gpu_seconds": spent["wall_seconds"] if gpu else None, "gpu": gpu, "device": device.type,
        "threads": torch.get_num_threads(), "cpu_model": machine["cpu_model"], "cpu_flags": machine["cpu_flags"]}


def starting_model(init: str) -> dict:
    """What a fine-tuning run starts from: the name, the sha256 of its model file and, for a built-in model, the
    record it was installed with."""
    path = checkpoint.model_path(builtin.locate(init))
    found = {"model": str(init), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    record = path.with_suffix(".json")
    if builtin.is_builtin(init) and record.is_file():
        found["record"] = json.loads(record.read_text())
    return found


def _latest(overrides: list[str], override: str) -> str | None:
    """The last of `overrides` that sets the key of `override`."""
    key = override.partition("=")[0]
    return next((o for o in reversed(overrides) if o.partition("=")[0] == key), None)


# ---- Scoring and the files -----------------------------------------------------------------------------------


def score_both(model_file: Path, config: Config, out: Path, photos: int | None) -> tuple[dict, dict]:
    """The held-out numbers of the model with its weights stored in float32 and in float16: (the numbers of the
    precision to keep, the record of the comparison)."""
    sets = quality.heldout_sets(config, photos)
    lpips = LPIPS("vgg")
    scores = {"float32": quality.score(model_file, sets, False, lpips)}
    half = out / "run" / "model-float16.safetensors"
    save_model(half, load_model(model_file)[0], config, torch.float16)
    scores["float16"] = quality.score(half, sets, False, lpips)
    change = {name: scores["float16"][name]["best"] - scores["float32"][name]["best"] for name in sets}
    stored = "float16" if all(abs(c) < FLOAT16_TOLERANCE for c in change.values()) else "float32"
    write_grid(half if stored == "float16" else model_file, sets, out / f"{config.task}.jpg")
    precision = {"change": change, "threshold": FLOAT16_TOLERANCE, "stored": stored,
                 **{dtype: {name: s["best"] for name, s in scores[dtype].items()} for dtype in scores}}
    return scores[stored], precision


def write_grid(model_file: Path, sets: dict, path: Path) -> None:
    """The card's picture: for the first GRID_TILES held-out tiles (of the open photo set if scored), a row
    input | baseline | GRID_SAMPLES samples | ground truth, as JPEG."""
    model = Model.load(model_file, device="cpu")
    rows = []
    for _, given, target in (sets.get("photos") or sets["builtin"])[:GRID_TILES]:
        samples = model.sample(given, n=GRID_SAMPLES, seed=0)
        base = [model.task.baseline_image(given, target.shape[-2:])[0]] if model.task.input_kind == "image" else []
        rows.append([model.task.show_input(given, model.config), *base, *samples, target])
    grid = image_grid(rows).mul(255).round().byte().permute(1, 2, 0).numpy()
    atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="JPEG", quality=90))


def data_record(config: Config, out: Path) -> dict:
    """What the model was trained on, and under which licences."""
    path = config.data.path
    if path in (photoset.PREFIX + "train", str(photoset.root() / "train"), str(out / "pairs")):
        rows = [r for r in photoset.listing() if r["split"] == "train"]
        what = ("night shots (chimle.tasks.night_shot) made from " if path == str(out / "pairs") else "") + \
            "the training split of the open photo set"
        return {"description": f"{len(rows)} photos: {what} (`chimle photos fetch`): photographs from Debian and PyPI "
                               "packages, split from the held-out ones by source photo.",
                "images": len(rows), "licences": dict(Counter(r["licence"] for r in rows)),
                "attribution": "[docs/photoset.md](../photoset.md)"}
    if not path:
        return {"description": "the nine built-in photos (for layouts, with their built-in label maps).",
                "images": 9, "licences": {"CC0, public domain or CC-BY-4.0": 9},
                "attribution": "src/chimle/assets/photos/ATTRIBUTION.md"}
    return {"description": f"the images in {path}.", "images": len(list_images(path))}


def write_files(task: str, config: Config, used: dict, scores: dict, precision: dict, spent: dict,
                out: Path) -> dict:
    """OUT/TASK.safetensors (in the chosen precision), OUT/TASK.json and OUT/TASK.md; returns the record."""
    model_file = out / f"{task}.safetensors"
    generator, _ = load_model(out / "run")
    save_model(model_file, generator, config, getattr(torch, precision["stored"]))
    rounds = training.total_rounds(config, len(training.training_set(config)))
    steps = rounds * config.train.steps_per_round
    baseline = tasks.get(task).baseline
    record = {
        "name": builtin.PREFIX + task, "task": task, "chimle": __version__,
        "scale": tasks.get(task).output_scale(config.model.levels),
        "file": {"name": model_file.name, "bytes": model_file.stat().st_size, "dtype": precision["stored"],
                 "sha256": hashlib.sha256(model_file.read_bytes()).hexdigest(),
                 "parameters": count_parameters(generator)},
        "recipe": {"preset": used["preset"], "overrides": used["overrides"], "rounds": rounds, "steps": steps,
                   "examples_searched": rounds * config.train.round_size},
        "data": data_record(config, out),
        "time": spent,
        "heldout": {"baseline": baseline, "sets": scores, "protocol": protocol(scores, baseline)},
        "precision": precision,
        "grid": {"file": f"{task}.jpg", "samples": GRID_SAMPLES, "tiles": GRID_TILES,
                 "set": "photos" if "photos" in scores else "builtin"},
        "command": common.command_line(),
    }
    if (out / "init.json").is_file():
        record["init"] = json.loads((out / "init.json").read_text())
    atomic_write(out / f"{task}.json", (json.dumps(record, indent=2) + "\n").encode())
    atomic_write(out / f"{task}.md", builtin.card(record).encode())
    return record


def protocol(scores: dict, baseline: str | None) -> str:
    """How the held-out numbers were measured, in words."""
    sets = {"builtin": "the demo's tiles: four 128 px tiles from the centre of each built-in held-out photo",
            "photos": "one centre 128 px tile of each held-out photo of the open photo set that is not a built-in one"}
    described = "; ".join(f"`{name}`, {s['tiles']} tiles: {sets.get(name, name)}" for name, s in scores.items())
    ratio = f", and their ratio to the {baseline}'s LPIPS (ratio of the means over tiles)" if baseline else ""
    return (f"{SAMPLES} samples per input (seed 0), LPIPS v0.1 VGG16 against the ground truth: best-of-{SAMPLES} and "
            f"mean{ratio}; lower is better. Diversity: mean LPIPS between two samples of one input. Consistency: "
            "chimle.tasks.Task.consistency (PSNR in dB of the sample degraded again against the input, or mean |ΔL| "
            f"for colourization). Held-out sets, never trained on: {described}.")


def install(task: str, out: Path) -> None:
    """Copy the model and its record into the package and the card into docs/models, within the wheel's limit."""
    files = {out / f"{task}.safetensors": MODELS, out / f"{task}.json": MODELS, out / f"{task}.md": CARDS,
             out / f"{task}.jpg": CARDS}
    package = builtin.package_size(REPO / "src" / "chimle")
    after = package + sum(f.stat().st_size - _size(folder / f.name) for f, folder in files.items() if folder == MODELS)
    if after > builtin.WHEEL_LIMIT:
        raise SystemExit(f"not installed: the package would hold {after / 2**20:.1f} MiB, above the wheel's limit of "
                         f"{builtin.WHEEL_LIMIT / 2**20:.0f} MiB; store the model in float16 or make it smaller")
    for source, folder in files.items():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, folder / source.name)
        print(f"installed {folder / source.name}")
    print(f"package files now {after / 2**20:.1f} MiB (the wheel's limit: {builtin.WHEEL_LIMIT / 2**20:.0f} MiB)")


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def keep_snapshot(out: Path, step: int, model_file: Path, spent: dict) -> None:
    """A copy of the model at `step` in OUT/snapshots/, listed with the CPU time spent so far in snapshots.json."""
    folder = out / "snapshots"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_file, folder / f"step-{step:07d}.safetensors")
    listing = folder / "snapshots.json"
    entries = json.loads(listing.read_text()) if listing.is_file() else []
    entries = [e for e in entries if e["step"] != step] + [{"step": step, **spent}]
    atomic_write(listing, json.dumps(sorted(entries, key=lambda e: e["step"]), indent=1).encode())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, choices=list(RECIPES))
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: runs/builtin-TASK)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="train a new run for about this many CPU-minutes (GPU: wall minutes) instead of the "
                             "recipe's train.rounds")
    parser.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting over the recipe (on a resumed run: a change, e.g. -o train.rounds=N)")
    parser.add_argument("--snapshot-every", type=int, default=0, metavar="ROUNDS",
                        help="keep a copy of the model every ROUNDS rounds in OUT/snapshots/ (for a learning curve)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--photos", type=int, default=None,
                        help="score on at most this many held-out photos of the open photo set (default: all)")
    parser.add_argument("--init", default=None, metavar="MODEL",
                        help="start a new run from these weights (builtin:TASK, a model file or run directory) with "
                             "the task's fine-tuning recipe (FINETUNES), or its recipe where it has none")
    parser.add_argument("--quick", action="store_true", help="a smoke run: the tiny preset for 2 rounds, 4 photos")
    parser.add_argument("--install", action="store_true",
                        help="copy the model and record into src/chimle/assets/models and the card into docs/models")
    args = parser.parse_args(argv)
    out = args.out or REPO / "runs" / f"builtin-{args.task}"
    photos = QUICK["photos"] if args.quick and args.photos is None else args.photos

    config, used, spent = train(args.task, args, out)
    print(f"scoring {out / 'run'} on the held-out photos (float32 and float16)")
    scores, precision = score_both(out / "run" / "model.safetensors", config, out, photos)
    record = write_files(args.task, config, used, scores, precision, spent, out)
    for name, s in scores.items():
        ratio = "" if s["ratio_best"] is None else f" ({s['ratio_best']:.3f} x {tasks.get(args.task).baseline})"
        print(f"{name:8s} {s['tiles']:3d} tiles  best-of-{SAMPLES} LPIPS {s['best']:.4f}{ratio}  mean {s['mean']:.4f}  "
              f"diversity {s['diversity']:.4f}")
    print(f"stored as {precision['stored']} (best-of-8 change in float16: "
          + ", ".join(f"{k} {v:+.5f}" for k, v in precision["change"].items()) + ")")
    print(f"wrote {out / (args.task + '.safetensors')}, {out / (args.task + '.json')} and {out / (args.task + '.md')}")
    if args.install:
        install(args.task, out)
    return record


if __name__ == "__main__":
    main()
