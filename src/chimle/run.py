"""The run directory, and the one place that reads and writes it (chimle.train runs the loop):

    config.yaml        the resolved config (read back on resume through the same validation as a fresh run's)
    model.safetensors  the latest weights with the config (for `chimle sample`; with `train.ema`, their average)
    state-*.pt         resumable state (weights, their average, optimizer, position, the round's search result)
    log.txt, metrics.jsonl, grids/step-*.png

Every file is written whole (chimle.files.atomic_write) but the logs, which are appended line by line.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable

import yaml

from chimle import checkpoint
from chimle.checkpoint import MODEL_FILE, CheckpointError, CorruptCheckpointError, save_model
from chimle.config import Config, ConfigError, changed, fixed_changes, from_dict, load_run
from chimle.files import atomic_write, check_folder, disk_errors
from chimle.generator import Generator

CONFIG_FILE = "config.yaml"


class RunFiles:
    """The run directory: config, model, resumable states, logs, metrics, grids. Only the writer (rank 0)
    touches it; for the other processes of a run the writing methods do nothing."""

    def __init__(self, out: str | Path, writer: bool = True):
        self.dir = Path(out)
        self.config_file = self.dir / CONFIG_FILE
        self.model_file = self.dir / MODEL_FILE
        self.grids = self.dir / "grids"
        self.writer = writer

    def open(self, config: Config | None, resume: bool, settings: dict | None = None) -> tuple[Config, dict | None]:
        """Check that a new run does not overwrite another, or reopen a run to resume it: its config.yaml (as
        its user may have edited it) with `settings` applied, coerced and validated like a fresh run's; a change
        that cannot apply to the trained weights is refused by name, and an applied one is written to
        config.yaml. Returns the run's config and its newest training state (None for a new run)."""
        saved = self.config_file
        if resume:
            if not saved.is_file():
                raise CheckpointError(f"nothing to resume in {self.dir}: it has no {CONFIG_FILE}")
            as_saved = load_run(saved)
            run_config = load_run(saved, settings) if settings else as_saved
            self.remove_partial_writes()
            state = self.latest_state()
            if state is not None:
                _check_resumable(state, as_saved, run_config, saved)
            if run_config != as_saved:
                _check_effective(as_saved, run_config)
                if self.writer:
                    atomic_write(saved, run_config.to_yaml().encode())
                self.log("changed on resume: " + ", ".join(f"{k} {a!r} -> {b!r}"
                                                            for k, (a, b) in changed(as_saved, run_config).items()))
            elif config is not None and not settings and config != run_config:
                print(f"resuming with the run's own settings from {saved}")
            return run_config, state
        check_folder(self.dir)
        if saved.exists() or self.states():
            raise CheckpointError(f"{self.dir} already holds a run; give --resume to continue it or choose another "
                                  "--out")
        return config, None

    def create(self, config: Config) -> None:
        """Make the folder of a new run and write its config.yaml."""
        if self.writer:
            with disk_errors(self.dir):
                self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.config_file, lambda tmp: tmp.write_text(config.to_yaml()))

    def states(self) -> list[Path]:
        return sorted(self.dir.glob("state-*.pt"))

    def save_state(self, state: dict, step: int, keep: int) -> None:
        """Write the state of `step`; then, with it safely on disk, delete all but the newest `keep`."""
        if not self.writer:
            return
        path = self.dir / f"state-{step:09d}.pt"
        checkpoint.save_state(path, state)
        for old in self.states()[:-keep]:
            if old != path:
                old.unlink(missing_ok=True)

    def latest_state(self) -> dict | None:
        """The newest state that loads and matches its checksum; None if the run has not saved one yet. Only a
        damaged state (truncated, or not matching its checksum) is passed over for the one before it, with a
        warning that names both; any other failure to read one (an I/O error, a foreign file) is an error."""
        broken = []
        for path in reversed(self.states()):
            try:
                state = checkpoint.load_state(path)
            except CorruptCheckpointError as error:
                warnings.warn(f"{error}; trying an older state", stacklevel=2)
                self.log(f"skipped {error}")
                broken.append(str(error))
                continue
            if broken:
                note = (f"resuming from the older state {path.name} (step {state['step']}): the {len(broken)} newer "
                        "one(s) are damaged")
                warnings.warn(note, stacklevel=2)
                self.log(note)
            state["file"] = str(path)
            return state
        if broken:
            raise CheckpointError("no usable training state:\n  " + "\n  ".join(broken) +
                                  "\nremove these files to restart the run from its beginning")
        return None

    def remove_partial_writes(self) -> None:
        """Delete the temporary files of writes a killed process did not finish."""
        for tmp in self.dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
            self.log(f"removed {tmp.name}, a write the previous process did not finish")

    def save_model(self, generator: Generator, config: Config) -> None:
        if self.writer:
            save_model(self.model_file, generator, config)

    def grid(self, step: int, draw: Callable[[Path], None]) -> None:
        """grids/step-STEP.png, drawn by `draw(path)`."""
        if self.writer:
            path = self.grids / f"step-{step:09d}.png"
            with disk_errors(path):
                draw(path)

    def log(self, line: str) -> None:
        self._append("log.txt", line + "\n")

    def metrics(self, record: dict) -> None:
        self._append("metrics.jsonl", json.dumps(record) + "\n")

    def _append(self, name: str, text: str) -> None:
        if self.writer:
            with disk_errors(self.dir / name), open(self.dir / name, "a") as f:
                f.write(text)


def _check_resumable(state: dict, as_saved: Config, config: Config, saved: Path) -> None:
    """Refuse settings that differ from those the state was trained with where a run cannot change them: in
    config.yaml (edited, or the state is another run's), or on the command line."""
    try:
        trained = from_dict(yaml.safe_load(state["config"]))
    except (ConfigError, KeyError, TypeError, yaml.YAMLError) as error:
        raise CheckpointError(f"{state['file']} holds an unusable config: {error}") from None
    name = Path(state["file"]).name
    in_file = fixed_changes(trained, as_saved)
    if in_file:
        was = ", ".join(f"{key}={a!r}" for key, (a, _) in in_file.items())
        now = ", ".join(f"{key}={b!r}" for key, (_, b) in in_file.items())
        raise ConfigError(f"{name} was trained with {was}, but {saved} has {now}; a resumed run cannot change these. "
                          f"Undo that edit of {saved.name} (or start a new run with another --out); if {name} belongs "
                          "to another run, move it out of the run directory")
    given = fixed_changes(trained, config)
    if given:
        changes = ", ".join(f"{key} {a!r} -> {b!r}" for key, (a, b) in given.items())
        raise ConfigError(f"the command line changes {changes}, which a resumed run cannot change ({name} was trained "
                          "with the former): leave that out, or start a new run with another --out")


def _check_effective(old: Config, new: Config) -> None:
    """Refuse a change of train.passes that would not change the run (train.rounds fixes the number of rounds)."""
    if new.train.passes != old.train.passes and new.train.rounds and new.train.rounds == old.train.rounds:
        raise ConfigError(f"train.passes={new.train.passes} has no effect while train.rounds={new.train.rounds} sets "
                          "the number of rounds: give -o train.rounds=N to train to N rounds (or -o train.rounds=0 to "
                          "count passes)")
