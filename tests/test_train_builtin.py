"""scripts/train_builtin.py: its recipes are valid configurations; a smoke run writes a loadable model, its record
and its card (slow: it scores on the held-out tiles with LPIPS-VGG)."""

from __future__ import annotations

import hashlib
import json
import sys
from operator import attrgetter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train_builtin  # noqa: E402

from chimle import builtin, tasks  # noqa: E402
from chimle.config import resolve  # noqa: E402
from chimle.sample import Model  # noqa: E402


@pytest.mark.parametrize("task, finetune", [*((t, False) for t in train_builtin.RECIPES),
                                            *((t, True) for t in train_builtin.FINETUNES)])
def test_every_recipe_is_a_valid_config(task, finetune, tmp_path):
    preset, overrides = train_builtin.recipe(task, quick=False, finetune=finetune)
    folders = [o.replace("=PHOTOS", f"={tmp_path}").replace("=NIGHT_PAIRS", f"={tmp_path}") for o in overrides]
    config = resolve(task=task, preset=preset, overrides=folders)
    assert config.task == task and config.train.rounds > 0  # a length in rounds, not passes
    assert task in tasks.TASKS


def test_a_resumed_run_records_only_the_settings_it_changes():
    assert train_builtin._latest(["train.rounds=2", "train.lr=0.1", "train.rounds=4"], "train.rounds=9") == \
        "train.rounds=4"
    assert train_builtin._latest(["train.rounds=2"], "train.lr=0.1") is None


@pytest.mark.slow
def test_a_quick_run_writes_the_model_its_record_and_card(tmp_path):
    record = train_builtin.main(["--task", "super-resolution", "--quick", "--photos", "0", "--out", str(tmp_path)])
    files = {p.name for p in tmp_path.iterdir()}
    assert {"super-resolution.safetensors", "super-resolution.json", "super-resolution.md", "run"} <= files
    assert json.loads((tmp_path / "super-resolution.json").read_text()) == record
    assert record["recipe"]["steps"] == 2 * 8 and record["time"]["cpu_seconds"] > 0 and record["time"]["cpu_model"]
    assert list(record["heldout"]["sets"]) == ["builtin"] and record["heldout"]["sets"]["builtin"]["tiles"] == 12
    assert abs(record["precision"]["change"]["builtin"]) < 0.002 and record["file"]["dtype"] == "float16"
    model = Model.load(tmp_path / "super-resolution.safetensors", "cpu")
    assert all(p.dtype == torch.float32 for p in model.generator.parameters())
    assert (tmp_path / "super-resolution.md").read_text() == builtin.card(record)
    # Fine-tuning it: a new run from its weights, whose record says what it started from.
    tuned_out = tmp_path / "tuned"
    tuned = train_builtin.main(["--task", "super-resolution", "--quick", "--photos", "0", "--out", str(tuned_out),
                                "--init", str(tmp_path / "super-resolution.safetensors")])
    started = (tmp_path / "super-resolution.safetensors").read_bytes()
    assert tuned["init"] == {"model": str(tmp_path / "super-resolution.safetensors"),
                             "sha256": hashlib.sha256(started).hexdigest()}
    assert "started from the weights of" in (tuned_out / "run" / "log.txt").read_text()
    assert "Fine-tuned from" in (tuned_out / "super-resolution.md").read_text()


SETTINGS = ["model", "data.crop", "search.samples_per_level", "search.reject_below", "train.perceptual",
            "train.final_perceptual", "train.final_rounds", "train.lr", "train.ema", "train.pixel_weight", "train.batch_size",
            "train.steps_per_round", "train.round_size", "train.schedule", "train.precision"]


@pytest.mark.parametrize("task", sorted(train_builtin.RECIPES))
def test_the_recipes_are_what_the_installed_models_were_trained_with(task, tmp_path):
    """A change to the preset must not change a built-in model's recipe behind its back: the recipe's resolved
    settings equal those stored in the installed model (its last stage: the task's fine-tuning recipe where it has
    one, else its recipe)."""
    if task not in builtin.names():
        pytest.skip(f"this version ships no built-in {task} model")
    preset, overrides = train_builtin.recipe(task, quick=False, finetune=task in train_builtin.FINETUNES)
    recipe = resolve(task=task, preset=preset, overrides=[o.replace("=PHOTOS", f"={tmp_path}") for o in overrides])
    installed = Model.load(f"builtin:{task}", "cpu").config
    assert {k: attrgetter(k)(recipe) for k in SETTINGS} == {k: attrgetter(k)(installed) for k in SETTINGS}
