"""Crash safety: a run killed at any moment resumes to the weights of an uninterrupted run, bit for bit; a full
disk, a corrupted or a foreign checkpoint is reported by name and loses nothing."""

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chimle import checkpoint, files
from chimle.checkpoint import CheckpointError, content_digest, load_state, save_state
from chimle.config import ConfigError
from chimle.generator import Generator
from chimle.train import train
from conftest import run_killed, tiny_config

# 3 rounds of 4 steps; states at steps 0 (after the search), 2, 4, 6, ...; one grid at the end. With a weight
# average and a learning-rate schedule, so that a resumed run must restore both exactly.
SETTINGS = ["train.rounds=3", "train.round_size=4", "train.steps_per_round=4", "train.checkpoint_every=2",
            "train.grid_every=100", "train.ema=0.9", "train.schedule=cosine", "train.warmup=3"]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """An uninterrupted run (in this process)."""
    out = tmp_path_factory.mktemp("whole") / "run"
    train(tiny_config("super-resolution", *SETTINGS), out)
    return out


def test_killed_during_search_steps_and_checkpoint_write_resumes_identically(whole, tmp_path):
    out = tmp_path / "run"
    # Round 1 done (state-4 saved, without a search), killed in round 2's search.
    run_killed(out, "search:2", SETTINGS, resume=False)
    assert [p.name for p in checkpoint_files(out)] == ["state-000000002.pt", "state-000000004.pt"]
    assert load_state(out / "state-000000004.pt")["search"] is None
    # Resumed at step 4: searches round 2 again, saves state-6, killed after step 7 updated the weights.
    run_killed(out, "step:3", SETTINGS, resume=True)
    assert checkpoint_files(out)[-1].name == "state-000000006.pt"
    # Resumed at step 6: killed while writing state-8, after its contents are written, before the rename.
    run_killed(out, "write:state-000000008.pt", SETTINGS, resume=True)
    assert checkpoint_files(out)[-1].name == "state-000000006.pt"
    assert list(out.glob(".state-000000008.pt.*.tmp")), "the unfinished write should be left behind"
    # The last resume finishes the run.
    train(tiny_config("super-resolution", *SETTINGS), out, resume=True)
    assert_same_weights(whole, out)
    assert not list(out.glob(".*.tmp"))
    log = (out / "log.txt").read_text()
    assert log.count("resumed at step") == 3 and "a write the previous process did not finish" in log


def checkpoint_files(run: Path) -> list[Path]:
    return sorted(run.glob("state-*.pt"))


def test_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(whole, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = files._write_all
    writes = []

    def fill_up(fd, content):
        writes.append(len(memoryview(content)))
        if len(writes) == 4:  # the state of step 4: half of it fits, then the disk is full
            os.write(fd, memoryview(content)[: len(memoryview(content)) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, content)

    monkeypatch.setattr(files, "_write_all", fill_up)
    with pytest.raises(CheckpointError, match=r"state-000000004\.pt: No space left on device \(nothing was "
                                              r"written\); free some space .* --resume"):
        train(tiny_config("super-resolution", *SETTINGS), out)
    assert not list(out.glob(".*.tmp"))
    assert [p.name for p in checkpoint_files(out)] == ["state-000000000.pt", "state-000000002.pt"]
    assert load_state(out / "state-000000002.pt")["step"] == 2
    # The model file written at step 2 survives a failed rewrite too.
    before = (out / "model.safetensors").read_bytes()
    writes.clear()
    writes.extend([0, 0, 0])  # the next write fails
    with pytest.raises(CheckpointError, match=r"the previous model\.safetensors is intact"):
        checkpoint.save_model(out / "model.safetensors", Generator(tiny_config().model), tiny_config())
    assert (out / "model.safetensors").read_bytes() == before

    monkeypatch.setattr(files, "_write_all", real)
    train(tiny_config("super-resolution", *SETTINGS), out, resume=True)
    assert_same_weights(whole, out)


def flip_a_weight_byte(path: Path) -> None:
    """Change one byte inside a tensor's data, leaving the file's structure valid."""
    state = torch.load(path, weights_only=True)
    tensor = max(state["generator"].values(), key=lambda t: t.numel())
    data = path.read_bytes()
    at = data.find(tensor.numpy().tobytes()[:64])
    assert at > 0
    path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :])


def test_corrupted_newest_state_is_named_and_an_older_one_used(whole, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    newest = checkpoint_files(out)[-1]
    flip_a_weight_byte(newest)
    torch.load(newest, weights_only=True)  # still loads: only the checksum can tell
    with pytest.raises(checkpoint.CorruptCheckpointError, match=f"{newest.name} is corrupted"):
        load_state(newest)
    (out / "model.safetensors").unlink()
    with pytest.warns(UserWarning) as caught:
        train(tiny_config("super-resolution", *SETTINGS), out, resume=True)
    messages = [str(w.message) for w in caught]
    assert any(f"{newest.name} is corrupted" in m and "trying an older state" in m for m in messages)
    assert any(m.startswith("resuming from the older state state-") for m in messages)  # and which one, loudly
    assert_same_weights(whole, out)
    # Truncated, every one: nothing to resume from, and the error lists them.
    for path in checkpoint_files(out):
        path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="no usable training state") as error, pytest.warns(UserWarning):
        train(tiny_config("super-resolution", *SETTINGS), out, resume=True)
    assert all(p.name in str(error.value) for p in checkpoint_files(out))


def test_foreign_checkpoints_are_refused_by_name(whole, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    config = tiny_config("super-resolution", *SETTINGS)
    newest = out / "state-000000099.pt"
    torch.save({"model": {"weight": torch.zeros(3)}}, newest)
    with pytest.raises(CheckpointError, match="state-000000099.pt is not a chimle training state"):
        train(config, out, resume=True)

    torch.save({"format": "chimle-state/1", "step": 3}, newest)
    with pytest.raises(CheckpointError, match="state-000000099.pt was written by another version of chimle"):
        train(config, out, resume=True)

    state = load_state(checkpoint_files(whole)[-1])
    other = tiny_config("colourization", *SETTINGS)
    save_state(newest, {**state, "config": other.to_yaml(), "generator": Generator(other.model).state_dict()})
    with pytest.raises(ConfigError, match="state-000000099.pt was trained with .*task='colourization', but .*"
                                          "config.yaml has .*task='super-resolution'; a resumed run cannot change"):
        train(config, out, resume=True)

    bigger = tiny_config("super-resolution", *SETTINGS, "model.channels=[12,12]")
    save_state(newest, {**state, "config": bigger.to_yaml(), "generator": Generator(bigger.model).state_dict()})
    with pytest.raises(ConfigError, match=r"trained with model.channels=\[12, 12\], but .* has model.channels=\[8, 8\]"
                                          r".* move it out of the run directory"):
        train(config, out, resume=True)

    # Our config but someone else's tensors: every difference is listed.
    save_state(newest, {**state, "generator": Generator(bigger.model).state_dict()})
    with pytest.raises(CheckpointError, match="state-000000099.pt does not fit the model:\n  shape of "):
        train(config, out, resume=True)


def test_content_digest_sees_every_change():
    state = {"step": 3, "generator": {"w": torch.arange(6.0).view(2, 3)}, "search": None, "lr": [1e-4, (0.9, 0.99)]}
    same = {"lr": [1e-4, (0.9, 0.99)], "search": None, "generator": {"w": torch.arange(6.0).view(2, 3)}, "step": 3}
    assert content_digest(state) == content_digest(same)  # key order does not matter
    changed = [
        {**state, "step": 4},
        {**state, "generator": {"w": torch.arange(6.0).view(3, 2)}},
        {**state, "generator": {"w": torch.arange(6.0).view(2, 3).double()}},
        {**state, "generator": {"w": torch.arange(6.0).view(2, 3) + 1e-7}},
        {**state, "lr": [1e-4, (0.9, 0.999)]},
        {**state, "search": 0},
    ]
    assert len({content_digest(s) for s in changed} | {content_digest(state)}) == len(changed) + 1
