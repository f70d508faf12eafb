"""Resuming with an edited config.yaml or with settings on the command line: the same coercion and validation as
a fresh run, changes that cannot apply to the trained weights refused by name, and nothing lost on a refusal."""

import errno
import shutil
from pathlib import Path

import pytest
import yaml

from chimle.checkpoint import CheckpointError, load_state
from chimle.cli import main
from chimle.train import train

SETTINGS = ["train.rounds=1", "train.round_size=4", "train.steps_per_round=2", "train.checkpoint_every=2",
            "train.grid_every=100"]


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> Path:
    """A finished tiny run of one round of 2 steps (states at steps 0 and 2)."""
    out = tmp_path_factory.mktemp("done") / "run"
    assert main(["train", "--preset", "tiny", "--out", str(out), *[f"-o{s}" for s in SETTINGS]]) == 0
    return out


def copy(done: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(done, tmp_path / "run"))


def edited(run: Path, change) -> None:
    values = yaml.safe_load((run / "config.yaml").read_text())
    change(values)
    (run / "config.yaml").write_text(yaml.safe_dump(values, sort_keys=False))


def files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "config.yaml"}


CASES = [
    (lambda v: v["train"].update(passes="three"), "'train.passes' must be like 2, got 'three'"),
    (lambda v: v["train"].update(lr_decay=0.5), "unknown setting 'train.lr_decay'"),
    (lambda v: v.update(train=5), "'train' is a section"),
    (lambda v: v["train"].update(batch_size=0), "train.batch_size=0 must be >= 1"),
    (lambda v: v["model"].update(levels=3), "model.channels=[8, 8] needs one value per level (3)"),
    (lambda v: v["train"].update(perceptual="foo"), "train.perceptual='foo' must be 'vgg' or 'alex'"),
    (lambda v: v["train"].update(lr=-0.001), "train.lr must be > 0"),
    (lambda v: v["train"].update(passes=-3), "train.passes=-3 must be >= 1"),
    (lambda v: v["model"].update(blocks=2), "state-000000002.pt was trained with model.blocks=1, but "),
    (lambda v: v.update(task="colourization"), "was trained with task='super-resolution', but"),
    (lambda v: v["train"].update(steps_per_round=3), "has train.steps_per_round=3; a resumed run cannot change"),
    (lambda v: v.update(preset="huge"), "preset='huge' must be one of paper, small, tiny"),
]


@pytest.mark.parametrize("change, message", CASES, ids=[c[1][:30] for c in CASES])
def test_an_edited_config_that_cannot_work_is_refused_by_name_and_loses_nothing(done, tmp_path, capsys, change,
                                                                              message):
    run = copy(done, tmp_path)
    edited(run, change)
    before, text = files(run), (run / "config.yaml").read_text()
    assert main(["train", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert message in err and "config.yaml" in err and "Traceback" not in err
    assert files(run) == before and (run / "config.yaml").read_text() == text


@pytest.mark.parametrize("text, message", [("", "must hold a mapping"), ("model: [\n", "is not valid YAML"),
                                           ("\xff\xfe", "is not valid YAML")])
def test_an_empty_or_unreadable_config_is_refused(done, tmp_path, capsys, text, message):
    run = copy(done, tmp_path)
    (run / "config.yaml").write_bytes(text.encode("latin-1"))
    assert main(["train", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_lower_learning_rate_written_as_yaml_reads_it_is_used(done, tmp_path):
    """`lr: 1e-5` is a string to YAML 1.1: it is read as the number it means, as on a fresh run."""
    run = copy(done, tmp_path)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("  lr: 0.001\n", "  lr: 1e-5\n").replace("  rounds: 1\n",
                                                                                          "  rounds: 2\n"))
    assert main(["train", "--out", str(run), "--resume"]) == 0
    state = load_state(run / "state-000000004.pt")
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [1e-5, 1e-5 * 0.01]


def test_settings_on_the_command_line_extend_the_run_or_are_refused(done, tmp_path, capsys):
    run = copy(done, tmp_path)
    # train.rounds sets the length of this run: a number of passes would change nothing, and is refused.
    assert main(["train", "--out", str(run), "--resume", "-o", "train.passes=3"]) == 2
    assert "train.passes=3 has no effect while train.rounds=1" in capsys.readouterr().err
    # More rounds extend it, and config.yaml records the change.
    assert main(["train", "--out", str(run), "--resume", "-o", "train.rounds=2"]) == 0
    assert load_state(sorted(run.glob("state-*.pt"))[-1])["step"] == 4
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["rounds"] == 2
    assert "changed on resume: train.rounds 1 -> 2" in (run / "log.txt").read_text()
    # Counting passes instead: 2 passes over the 9 built-in photos in rounds of 4 are 5 rounds.
    assert main(["train", "--out", str(run), "--resume", "-o", "train.rounds=0", "-o", "train.passes=2"]) == 0
    assert load_state(sorted(run.glob("state-*.pt"))[-1])["step"] == 10
    # What cannot change is refused by name, from the command line too.
    for options, message in ((["--task", "colourization"], "changes task 'super-resolution' -> 'colourization'"),
                             (["-o", "model.blocks=3"], "changes model.blocks 1 -> 3"),
                             (["--preset", "small"], "this run started from the tiny preset")):
        assert main(["train", "--out", str(run), "--resume", *options]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_only_a_damaged_state_is_passed_over_for_an_older_one(done, tmp_path, monkeypatch):
    run = copy(done, tmp_path)
    newest = sorted(run.glob("state-*.pt"))[-1]
    read = Path.read_bytes

    def failing(path, error):
        def read_bytes(self):
            if self == newest:
                raise error
            return read(self)
        return read_bytes

    # An I/O error or a lack of memory says nothing about the file: the run stops instead of going back a state.
    monkeypatch.setattr(Path, "read_bytes", failing(newest, OSError(errno.EIO, "Input/output error")))
    with pytest.raises(CheckpointError, match=f"{newest.name} could not be read \\(Input/output error\\); it was "
                                              "left as it is"):
        train(None, run, resume=True)
    monkeypatch.setattr(Path, "read_bytes", failing(newest, MemoryError()))
    with pytest.raises(MemoryError):
        train(None, run, resume=True)
    monkeypatch.setattr(Path, "read_bytes", read)
    # A truncated one is passed over, loudly: a warning names it, another the state used instead.
    newest.write_bytes(newest.read_bytes()[:2000])
    with pytest.warns(UserWarning) as caught:
        train(None, run, resume=True)
    messages = [str(w.message) for w in caught]
    assert any(f"{newest.name} cannot be read" in m for m in messages)
    assert any("resuming from the older state state-000000000.pt (step 0)" in m for m in messages)
    assert "resuming from the older state" in (run / "log.txt").read_text()
    assert load_state(newest)["step"] == 2  # trained again from step 0 and saved whole
