"""`chimle demo`: the built-in model first (when there is one), then the model trained here, side by side. Tiny
models on 32 px tiles with LPIPS-AlexNet, so that it runs in seconds."""

import json

import pytest
import torch

from chimle import builtin, demo
from chimle.checkpoint import save_model
from chimle.generator import Generator
from chimle.perceptual import LPIPS
from conftest import randomize, tiny_config

FAST = ["train.rounds=1", "train.steps_per_round=2"]


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setattr(demo, "TILE", 32)
    monkeypatch.setattr(demo, "LPIPS", lambda net: LPIPS("alex"))


def test_demo_shows_the_builtin_model_then_the_trained_one(quick, tmp_path, monkeypatch, capsys):
    config = tiny_config("super-resolution")
    save_model(tmp_path / "models" / "super-resolution.safetensors", randomize(Generator(config.model), 2), config,
               torch.float16)
    monkeypatch.setenv(builtin.FOLDER_VARIABLE, str(tmp_path / "models"))
    trained = []
    train = demo.train

    def train_after_the_builtin(*args, **kwargs):  # by then the built-in model's grids and numbers are written
        trained.append(json.loads((tmp_path / "demo" / "demo.json").read_text()))
        return train(*args, **kwargs)

    monkeypatch.setattr(demo, "train", train_after_the_builtin)
    report = demo.run_demo(tmp_path / "demo", preset="tiny", overrides=FAST)
    early = trained[0]
    assert early["builtin"]["model"] == "builtin:super-resolution" and "mean" not in early
    assert len(list((tmp_path / "demo" / "heldout-builtin").glob("*_grid.png"))) == 12
    assert len(list((tmp_path / "demo" / "heldout").glob("*_grid.png"))) == 12
    saved = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["builtin"]["mean"] == early["builtin"]["mean"]
    ours, shipped = saved["mean"], saved["builtin"]["mean"]
    assert ours["baseline_lpips"] == pytest.approx(shipped["baseline_lpips"])  # the same tiles
    assert ours["ours_best_lpips"] != shipped["ours_best_lpips"]
    out = capsys.readouterr().out
    table = out[out.rindex("best-of-8 LPIPS"):]
    rows = [line.split()[0] for line in table.splitlines()[1:4]]
    assert rows == ["built-in", "trained", "bicubic"]
    assert f"{shipped['ours_best_lpips']:.4f}" in table and f"{ours['ours_best_lpips']:.4f}" in table
    # How long each part took, in the report and on the screen.
    assert list(saved["seconds"]) == ["weights", "builtin", "train", "evaluate"]
    assert all(s >= 0 for s in saved["seconds"].values()) and saved["seconds"]["train"] > 0
    assert "took " in out and ": weights " in out and ", training " in out


def test_demo_without_a_builtin_model_says_so_and_carries_on(quick, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(builtin.FOLDER_VARIABLE, str(tmp_path / "none"))
    report = demo.run_demo(tmp_path / "demo", task="decompression", preset="tiny", overrides=FAST)
    out = capsys.readouterr().out
    assert "no built-in decompression model in this version" in out
    assert report["builtin"] is None and not (tmp_path / "demo" / "heldout-builtin").exists()
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["mean"]["ours_best_lpips"] > 0
    assert "trained here ('tiny')" in out and "JPEG" in out
