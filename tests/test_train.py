import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chimle.checkpoint import CheckpointError, load_model
from chimle.generator import Generator
from chimle.sample import Model
from chimle.train import ADAM, make_optimizer, train
from conftest import tiny_config

FAST = ["train.passes=1", "train.round_size=4", "train.steps_per_round=6", "train.checkpoint_every=2"]


def test_train_save_load_sample_round_trip(tmp_path):
    config = tiny_config("super-resolution", *FAST)
    path = train(config, tmp_path / "run")
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"config.yaml", "model.safetensors", "log.txt",
                                                               "metrics.jsonl", "grids"}
    assert list((tmp_path / "run" / "grids").glob("step-*.png"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["event"] for r in records} == {"search", "train"}
    assert records[-1]["step"] == 18  # 3 rounds (9 images, 4 per round) x 6 steps

    model = Model.load(path, device="cpu")
    assert model.config == config
    image = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0))
    a = model.sample(image, n=3, seed=4)
    b = model.sample(image, n=3, seed=4)
    assert a.shape == (3, 3, 20, 28) and torch.equal(a, b)
    assert not torch.equal(a[0], a[1])
    # Sample k alone equals sample k of a batch.
    alone = model.render(image, [[(4, 2), (4, 2)]])
    torch.testing.assert_close(alone[0], a[2], atol=1e-6, rtol=1e-5)


def test_run_directory_is_never_overwritten(tmp_path):
    config = tiny_config("super-resolution", *FAST, "train.steps_per_round=1")
    train(config, tmp_path / "run")
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="already holds a run; give --resume"):
        train(config, tmp_path / "run")
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(config, tmp_path / "empty", resume=True)


def _train_command(out: Path, *extra: str) -> list[str]:
    overrides = [f"-o{o}" for o in FAST + ["train.passes=2", "train.steps_per_round=8"]]
    return [sys.executable, "-m", "chimle", "train", "--preset", "tiny", "--out", str(out), *overrides, *extra]


def _wait_for(path: Path, predicate, process, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and predicate(path.read_text()):
            return
        if process.poll() is not None:
            pytest.fail(f"training ended before the kill point: {process.stderr.read()}")
        time.sleep(0.05)
    pytest.fail("kill point not reached")


def test_killed_run_resumes_to_identical_weights(tmp_path):
    """SIGKILL mid-round, resume: the final weights equal those of an uninterrupted run, bit for bit."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(_train_command(tmp_path / "whole"), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(_train_command(killed), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    # Kill once the second round is under way (its search done, some steps taken, a checkpoint behind it).
    _wait_for(killed / "metrics.jsonl", lambda text: '"step": 12' in text, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "log.txt").read_text().endswith("done: 40 steps\n")
    subprocess.run(_train_command(killed, "--resume"), check=True, env=env, capture_output=True)

    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    resumed = load_file(str(killed / "model.safetensors"))
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert "resumed at step" in (killed / "log.txt").read_text()
    generator, _ = load_model(killed)
    assert generator is not None


def test_adam_implementations_give_the_same_step():
    """make_optimizer's fused Adam (the default) updates the weights as the for-loop one does, up to rounding."""
    cfg = tiny_config("super-resolution")
    after = {}
    for kind in ADAM:
        torch.manual_seed(0)
        g = Generator(cfg.model)
        opt = make_optimizer(cfg, g, kind)
        for _ in range(2):
            opt.zero_grad()
            sum((p * torch.sin(torch.arange(p.numel()).view_as(p).float())).sum() for p in g.parameters()).backward()
            opt.step()
        after[kind] = torch.cat([p.detach().flatten() for p in g.parameters()])
    torch.testing.assert_close(after["fused"], after["for-loop"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(after["foreach"], after["for-loop"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("task_name", ["super-resolution", "colourization"])
def test_a_bfloat16_step_is_close_to_float32_and_keeps_float32_weights(task_name):
    """train.precision=bfloat16 runs the step's forward under autocast: the losses and gradients stay float32 and
    close to float32's (colour conversion and the LPIPS distances on the features are float32), and so do the
    weights Adam updates."""
    from chimle.train import level_losses, make_distance, step_precision
    from chimle import tasks
    from conftest import randomize

    config = tiny_config(task_name, "train.precision=bfloat16")
    generator = randomize(Generator(config.model))
    distance, task = make_distance(config), tasks.get(config.task)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    inputs, targets = task.pair(images, config)
    codes = [torch.randn(2, s, generator=torch.Generator().manual_seed(i))
             for i, s in enumerate(generator.code_sizes(generator.start(inputs)))]
    results = {}
    for precision in ("float32", "bfloat16"):
        generator.zero_grad(set_to_none=True)
        with step_precision(tiny_config(task_name, f"train.precision={precision}"), torch.device("cpu")):
            losses = level_losses(generator, distance, task, inputs, targets, codes)
        losses.sum().backward()
        assert losses.dtype == torch.float32
        assert all(p.grad.dtype == torch.float32 for p in generator.parameters() if p.grad is not None)
        results[precision] = losses.detach(), torch.cat([p.grad.flatten() for p in generator.parameters()
                                                         if p.grad is not None])
    (loss32, grad32), (loss16, grad16) = results["float32"], results["bfloat16"]
    assert not torch.equal(loss16, loss32)  # it did compute in bfloat16
    torch.testing.assert_close(loss16, loss32, rtol=0.02, atol=0.0)
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.98


SHORT_RUN = ["train.rounds=2", "train.round_size=4", "train.steps_per_round=4", "train.checkpoint_every=2",
             "train.grid_every=100"]


def _whole_other_killed(tmp_path: Path, settings: list[str], other: str) -> tuple[torch.Tensor, ...]:
    """The weights of a run of `settings` (in tmp_path/whole), of one with `other` added (tmp_path/other) and of
    one killed at step 3 and resumed (tmp_path/killed)."""
    from conftest import model_vector, run_killed

    train(tiny_config("super-resolution", *settings), tmp_path / "whole")
    train(tiny_config("super-resolution", *settings, other), tmp_path / "other")
    run_killed(tmp_path / "killed", "step:3", settings)
    train(tiny_config("super-resolution", *settings), tmp_path / "killed", resume=True)
    return tuple(model_vector(tmp_path / name) for name in ("whole", "other", "killed"))


def test_a_killed_bfloat16_run_resumes_to_identical_weights(tmp_path):
    """With train.precision=bfloat16 a resumed run still reaches an uninterrupted run's weights bit for bit, and
    they differ from a float32 run's (the setting took effect)."""
    whole, fp32, killed = _whole_other_killed(tmp_path, [*SHORT_RUN, "train.precision=bfloat16"],
                                              "train.precision=float32")
    assert torch.equal(whole, killed)
    assert not torch.equal(whole, fp32)
    assert "the step's forward in bfloat16 (train.precision=bfloat16)" in (tmp_path / "whole" / "log.txt").read_text()
    assert "bfloat16" not in (tmp_path / "other" / "log.txt").read_text()


def test_a_killed_channels_last_run_resumes_to_identical_weights(tmp_path):
    """With train.channels_last=true a resumed run still reaches an uninterrupted run's weights bit for bit, and
    they are those of a run in the default layout up to rounding; so are those of a run resumed in the other
    layout (its restored Adam moments take their parameters' layout: fused Adam reads both as flat memory)."""
    from conftest import model_vector, run_killed

    settings = [*SHORT_RUN, "train.channels_last=true"]
    whole, default, killed = _whole_other_killed(tmp_path, settings, "train.channels_last=false")
    run_killed(tmp_path / "switched", "step:3", [*settings, "train.channels_last=false"])
    train(None, tmp_path / "switched", resume=True, settings={"train": {"channels_last": True}})
    assert torch.equal(whole, killed)
    torch.testing.assert_close(whole, default, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(model_vector(tmp_path / "switched"), default, atol=1e-4, rtol=1e-3)
