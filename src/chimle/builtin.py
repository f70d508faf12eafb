"""Built-in models: generators trained by this project and shipped inside the package, used by name.

    chimle models                                                   # what this version ships, with its numbers
    chimle sample --model builtin:super-resolution --input small.png -n 8 --out samples/
    chimle evaluate --model builtin:colourization --out eval/colourization
    chimle serve                                                    # every built-in model on one page
    chimle train --init builtin:super-resolution --data my_photos/ --out runs/sr-mine     # fine-tune one

    import chimle
    model = chimle.load("builtin:super-resolution")

A built-in model is a model file `assets/models/TASK.safetensors` (as chimle.checkpoint.save_model writes it;
its weights may be stored in float16, which loading turns back into float32) beside `TASK.json`, the record that
scripts/train_builtin.py wrote when it trained and scored the model: recipe, data and licences, steps, time,
machine and held-out numbers. Its model card, docs/models/TASK.md, is made from that record by `card`, never by
hand. A task without a file is not built into this version, and asking for it says so.

Only a string with the exact prefix `builtin:` names a built-in model; anything else is a path, so a local
folder is never shadowed by a built-in one (a folder literally named `builtin:x` is reached as `./builtin:x`).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from chimle import __version__, tasks
from chimle.files import CheckpointError

PREFIX = "builtin:"
FOLDER = Path(__file__).resolve().parent / "assets" / "models"
FOLDER_VARIABLE = "CHIMLE_BUILTIN_MODELS"  # another registry folder instead of FOLDER: for tests only
PACKAGE = Path(__file__).resolve().parent
WHEEL_LIMIT = 30 * 2**20  # the package's files, models included, must stay below this many bytes (issue 15)


def folder() -> Path:
    """Where the built-in models are: the package's assets/models (or $CHIMLE_BUILTIN_MODELS, for tests)."""
    return Path(os.environ.get(FOLDER_VARIABLE) or FOLDER)


def is_builtin(name) -> bool:
    """Whether `name` names a built-in model: a string beginning with exactly 'builtin:'. A Path never does."""
    return isinstance(name, str) and name.startswith(PREFIX)


def names() -> list[str]:
    """The tasks whose model this version ships, in the task registry's order (then any other file of the folder)."""
    stems = {p.stem for p in folder().glob("*.safetensors")}
    order = list(tasks.TASKS)
    return sorted(stems, key=lambda stem: (order.index(stem) if stem in order else len(order), stem))


def resolve(name: str) -> Path:
    """The model file of `builtin:TASK`, or a one-line error saying what this version ships."""
    task = name[len(PREFIX):]
    path = folder() / f"{task}.safetensors"
    if re.fullmatch(r"[A-Za-z0-9._-]+", task) and path.is_file():
        if Path(name).exists():
            warnings.warn(f"{name} is the built-in model; for the local path of that name write ./{name}",
                          stacklevel=3)
        return path
    shipped = ", ".join(PREFIX + n for n in names()) or "none"
    if task in tasks.TASKS:
        raise CheckpointError(f"{name}: a {task} model is not built into chimle {__version__} (built in: {shipped}); "
                              f"train one with `chimle train --task {task}`")
    raise CheckpointError(f"{name} is not the name of a built-in model (built in: {shipped}); `chimle models` lists "
                          "them, and a local path is given without the builtin: prefix")


def locate(model: str | Path) -> str | Path:
    """The model file of a built-in model's name; anything else as it is (a path to a model file or run directory,
    see chimle.checkpoint.model_path). Where a user names a model, it goes through here first."""
    return resolve(model) if is_builtin(model) else model


@dataclass
class Entry:
    """A built-in model as `chimle models` lists it."""

    name: str  # builtin:TASK
    task: str
    path: Path
    size: int  # bytes of the model file
    parameters: int
    dtype: str  # how the file stores its weights (float16 or float32)
    record: dict | None  # TASK.json, written by scripts/train_builtin.py; None if absent

    @property
    def headline(self) -> dict | None:
        """The numbers a listing shows: the open photo set's held-out tiles if scored, else the built-in ones."""
        sets = ((self.record or {}).get("heldout") or {}).get("sets") or {}
        key = "photos" if "photos" in sets else next(iter(sets), None)
        return None if key is None else {"set": key, **sets[key]}


def entries() -> list[Entry]:
    """Every built-in model of this version, read from its file's header and its record."""
    from safetensors import safe_open

    from chimle.checkpoint import read_config

    out = []
    for task in names():
        path = folder() / f"{task}.safetensors"
        config = read_config(path)
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
            dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
        record_file = path.with_suffix(".json")
        record = json.loads(record_file.read_text()) if record_file.is_file() else None
        out.append(Entry(PREFIX + task, config.task, path, path.stat().st_size,
                         sum(math.prod(shape) for shape in shapes.values()), _dtype_name(dtypes), record))
    return out


def _dtype_name(dtypes: set[str]) -> str:
    """F16 / F32 (safetensors' names) as float16 / float32; several are joined."""
    return "/".join(sorted({"F16": "float16", "F32": "float32"}.get(d, d.lower()) for d in dtypes))


def listing() -> list[str]:
    """The lines of `chimle models`."""
    found = entries()
    if not found:
        return [f"no built-in models in chimle {__version__} ({folder()} holds none); train one with `chimle train`"]
    lines = [f"{'name':26s} {'task':17s} {'size':>8s} {'parameters':>11s}  held-out numbers (best-of-8 LPIPS-VGG, "
             "lower is better)"]
    for e in found:
        lines.append(f"{e.name:26s} {e.task:17s} {e.size / 1e6:5.1f} MB {e.parameters:11,d}  {_numbers(e)}")
    lines.append("model cards: docs/models/TASK.md; use one as --model builtin:TASK, or chimle.load('builtin:TASK')")
    return lines


def _numbers(entry: Entry) -> str:
    head = entry.headline
    if head is None:
        return "(not scored: no record beside the file)"
    baseline = (entry.record.get("heldout") or {}).get("baseline")
    ratio = f" = {head['ratio_best']:.2f} x {baseline}" if baseline and head.get("ratio_best") is not None else ""
    return (f"{head['best']:.3f}{ratio}, diversity {head['diversity']:.3f} "
            f"({head.get('tiles', '?')} tiles, {head['set']} set)")


def package_size(root: Path = PACKAGE) -> int:
    """Bytes of the package's files (code, assets and built-in models; caches left out): the wheel is at most
    about this large, as it holds them compressed."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


# Model cards ------------------------------------------------------------------------------------------------


def card(record: dict) -> str:
    """The model card (Markdown) of a built-in model, made from the record scripts/train_builtin.py wrote."""
    task, file = record["task"], record["file"]
    lines = [f"# Built-in model `{record['name']}`", "",
             f"<!-- Made by scripts/train_builtin.py from src/chimle/assets/models/{task}.json; do not edit by hand: "
             "run the script again. -->", "",
             f"{tasks.get(task).describe.format(scale=record.get('scale', 16))}. chimle {record['chimle']}.", "",
             "| file | parameters | stored as | size | sha256 |", "|---|---|---|---|---|",
             f"| `src/chimle/assets/models/{file['name']}` | {file['parameters']:,} | {file['dtype']} | "
             f"{file['bytes'] / 1e6:.2f} MB | `{file['sha256'][:16]}…` |", "",
             "## Use", "", "```bash",
             f"chimle sample --model {record['name']} --input INPUT.png -n 8 --out samples/",
             f"chimle evaluate --model {record['name']} --out eval/{task}",
             f"chimle train --init {record['name']} {_same_model(record)}--data MY_PHOTOS/ --out runs/{task}-mine"
             "   # fine-tune", "```", ""]
    grid = record.get("grid")
    if grid:
        lines += [f"![held-out tiles: input, baseline, samples, ground truth]({grid['file']})", "",
                  f"The first {grid['tiles']} tiles of the `{grid['set']}` held-out set, one per row: the input | the "
                  f"baseline | samples 0-{grid['samples'] - 1} (seed 0) | the ground truth.", ""]
    lines += _data_section(record.get("data") or {})
    lines += _recipe_section(record)
    lines += _heldout_section(record)
    lines += _precision_section(record.get("precision"))
    return "\n".join(lines) + "\n"


def _same_model(record: dict) -> str:
    """The options that give a new run this model's settings (for fine-tuning it)."""
    recipe = record.get("recipe") or {}
    model = [f"-o {o} " for o in recipe.get("overrides", []) if o.startswith("model.")]
    return f"--task {record['task']} --preset {recipe.get('preset', 'small')} " + "".join(model)


def _data_section(data: dict) -> list[str]:
    lines = ["## Data and licences", "", data.get("description", "(not recorded)")]
    if data.get("licences"):
        lines += ["", "Licences of the training images: " + ", ".join(f"{name} ({count})" for name, count
                                                                     in sorted(data["licences"].items())) + "."]
    if data.get("attribution"):
        lines += ["", f"Authors and sources: {data['attribution']}."]
    return [*lines, ""]


def _recipe_section(record: dict) -> list[str]:
    recipe, time = record.get("recipe") or {}, record.get("time") or {}
    overrides = _overrides(recipe)
    gpu = f"{_hours(time['gpu_seconds'])} on {time.get('gpu')}" if time.get("gpu_seconds") else "no GPU"
    return ["## Recipe and cost", "", *_init_lines(record.get("init"), time),
            f"Preset `{recipe.get('preset')}` with {overrides}{_placeholders(recipe.get('overrides', []))}: "
            f"{recipe.get('rounds')} rounds, {recipe.get('steps'):,} optimisation steps, "
            f"{recipe.get('examples_searched'):,} examples searched. The model file holds the whole resolved "
            "configuration.", "",
            f"Training took {_hours(time.get('cpu_seconds', 0))} of CPU time ({_hours(time.get('wall_seconds', 0))} of "
            f"wall time; {gpu}) on {time.get('cpu_model')} with {time.get('threads')} thread(s), device "
            f"`{time.get('device')}`.", "",
            f"Made by: `{record.get('command')}`", ""]


def _init_lines(init: dict | None, time: dict) -> list[str]:
    """What a fine-tuned model started from: the model and, for a built-in one, how that model was made, stage by
    stage back to the first (a built-in model's record keeps the record of the model it started from)."""
    if not init:
        return []
    line = f"Fine-tuned from `{init['model']}` (sha256 `{init['sha256'][:16]}…`)"
    if not init.get("record"):
        return [line + "; the fine-tuning below.", ""]
    links = [init]  # the model each stage started from, the latest first
    while (links[-1]["record"].get("init") or {}).get("record"):
        links.append(links[-1]["record"]["init"])
    links.reverse()
    stages = [f"{i}. " + _capitalised(_started_from(link["record"].get("init"), i) + _stage(link["record"]))
              for i, link in enumerate(links, 1)]
    total = sum((link["record"].get("time") or {}).get("cpu_seconds", 0) for link in links) + time.get("cpu_seconds", 0)
    together = "Both stages" if len(links) == 1 else f"All {len(links) + 1} stages"
    return [f"{line}, made in {'this stage' if len(links) == 1 else 'these stages'}:", "", *stages, "",
            f"{together} together took {_hours(total)} of CPU time. The fine-tuning (stage {len(links) + 1}):", ""]


def _started_from(init: dict | None, stage: int) -> str:
    """How a stage of a fine-tuned model's history began: from scratch, or from the stage before it (or a model
    file, for the first)."""
    if not init:
        return ""
    source = f"stage {stage - 1}" if stage > 1 else f"`{init['model']}`"
    return f"Fine-tuned from {source} (sha256 `{init['sha256'][:16]}…`): "


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def _stage(record: dict) -> str:
    """One stage of a model's history, from its record: recipe, length, CPU time, held-out numbers, command."""
    recipe, spent = record.get("recipe") or {}, record.get("time") or {}
    sets = (record.get("heldout") or {}).get("sets") or {}
    numbers = "; ".join(f"{name} best-of-8 / baseline {s['ratio_best']:.3f}" for name, s in sets.items()
                        if s.get("ratio_best") is not None)
    return (f"preset `{recipe.get('preset')}` with {_overrides(recipe)}: {recipe.get('rounds')} rounds, "
            f"{recipe.get('steps', 0):,} steps, {_hours(spent.get('cpu_seconds', 0))} of CPU time "
            f"({numbers or 'not scored'}; made by `{record.get('command')}`).")


def _overrides(recipe: dict) -> str:
    """A recipe's effective overrides as a list in prose."""
    return ", ".join(f"`{o}`" for o in effective(recipe.get("overrides", []))) or "no overrides"


def effective(overrides: list[str]) -> list[str]:
    """Each key's last setting among `overrides`, in the order the keys first appear (a run extended with
    `-o train.rounds=N` records both lengths; the later one is the run's)."""
    last = {o.partition("=")[0]: o for o in overrides}
    return list(dict.fromkeys(last[o.partition("=")[0]] for o in overrides))


def _placeholders(overrides: list[str]) -> str:
    """What the recipe's folder placeholders (scripts/train_builtin.py) stand for."""
    meaning = {"=PHOTOS": "PHOTOS: the open photo set's training split",
               "=NIGHT_PAIRS": "NIGHT_PAIRS: night shots of those photos beside them"}
    used = [text for key, text in meaning.items() if any(o.endswith(key) for o in overrides)]
    return f" ({'; '.join(used)})" if used else ""


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} hours" if seconds >= 3600 else f"{seconds / 60:.1f} minutes"


def _heldout_section(record: dict) -> list[str]:
    heldout = record.get("heldout") or {}
    baseline = heldout.get("baseline") or "baseline"
    lines = ["## Held-out numbers", "", heldout.get("protocol", ""), "",
             f"| set | tiles | best-of-8 LPIPS | / {baseline} | mean LPIPS | / {baseline} | {baseline} LPIPS | "
             "diversity | consistency |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in (heldout.get("sets") or {}).items():
        lines.append(f"| {name} | {s.get('tiles')} | {_cell(s.get('best'))} | {_cell(s.get('ratio_best'), 2)} | "
                     f"{_cell(s.get('mean'))} | {_cell(s.get('ratio_mean'), 2)} | {_cell(s.get('baseline'))} | "
                     f"{_cell(s.get('diversity'))} | {_cell(s.get('consistency'), 2)} |")
    return [*lines, "", f"Measured by: `{record.get('command')}` (it scores the trained model again when run a second "
                        "time).", ""]


def _precision_section(precision: dict | None) -> list[str]:
    if not precision:
        return []
    changes = ", ".join(f"{name} {value:+.5f}" for name, value in precision["change"].items())
    return ["## Precision", "",
            f"Best-of-8 LPIPS of the float16 weights minus that of the float32 ones, on the held-out tiles: {changes}. "
            f"Stored as {precision['stored']} (float16 when every change is below {precision['threshold']}).", ""]


def _cell(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"
