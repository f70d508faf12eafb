"""On a CUDA GPU (`pytest -m cuda`, run by benchmarks/gpu.py): the GPU gives the CPU's results as far as the
precision policy of chimle.devices promises.

    pytest -m cuda tests/test_cuda.py                            # on a machine with a CUDA GPU
    CHIMLE_TEST_DEVICE=cpu pytest -m cuda tests/test_cuda.py     # a rehearsal: the same checks, the CPU twice

- the code search in float32 picks the CPU's winners, on a trained model (the built-in super-resolution model)
  and on a random tiny one; on the trained model, the bfloat16 search with float32 re-scoring (the GPU's default,
  search.precision=auto) picks them in >= 95% of examples at every level;
- sampling gives the CPU's pixels to float rounding;
- training (`chimle.train.train`) picks the same codes as on the CPU and reaches its weights to float rounding;
- a run killed and resumed with `chimle train --resume` reaches an uninterrupted run's weights to float rounding;
- `torchrun` with one process joins an NCCL process group and trains like a run without torchrun.

Every check also records what it measured (agreement, largest differences) in the JSON file that
$CHIMLE_CUDA_REPORT names, for the GPU report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chimle import files, tasks
from chimle.checkpoint import load_state
from chimle.data import ImageFolder, builtin_photos
from chimle.devices import configure, native_bf16
from chimle.generator import Generator
from chimle.perceptual import LPIPS
from chimle.sample import load
from chimle.search import hierarchical_search
from chimle.train import train
from conftest import assert_same_searches_and_losses, randomize, tiny_config, weight_agreement

DEVICE = torch.device(os.environ.get("CHIMLE_TEST_DEVICE", "cuda"))
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device (CHIMLE_TEST_DEVICE=cpu rehearses)")]

# 2 rounds of 3 steps at a fixed learning rate, float32 search (the CPU's default on CPUs without native bf16).
SETTINGS = ["train.rounds=2", "train.round_size=4", "train.steps_per_round=3", "train.checkpoint_every=2",
            "train.grid_every=100", "train.log_every=1", "search.precision=float32"]
LR = 1e-3  # the tiny preset's train.lr


@pytest.fixture(scope="module", autouse=True)
def policy():
    configure()  # IEEE float32, deterministic cuDNN: what every chimle command sets


def record(name: str, values: dict) -> None:
    """Add one check's measurements to $CHIMLE_CUDA_REPORT (a JSON object of check name -> values)."""
    path = os.environ.get("CHIMLE_CUDA_REPORT")
    if not path:
        return
    path = Path(path)
    report = json.loads(path.read_text()) if path.exists() else {}
    report[name] = values
    path.write_text(json.dumps(report, indent=1))


def heldout(config, count: int):
    folder = ImageFolder(builtin_photos("heldout"), config.data.crop)
    images = torch.stack([folder.example(0, i).image for i in range(count)])
    return tasks.get(config.task).pair(images, config)


def search(generator, config, inputs, targets, device, pools, dtype=None):
    generator, lpips = generator.to(device), LPIPS(config.train.perceptual).to(device)
    seeds = torch.arange(len(inputs[0]))
    return hierarchical_search(generator, lpips, tasks.get(config.task), [x.to(device) for x in inputs],
                               [y.to(device) for y in targets], seeds, pools, max_batch=64, dtype=dtype)


def agreement(a, b) -> list[float]:
    """Per level, the fraction of examples whose winner is the same in both searches."""
    return (a.winners == b.winners).float().mean(0).tolist()


@pytest.mark.parametrize("model", ["builtin", "random"])
def test_search_picks_the_cpus_winners(model):
    if model == "builtin":
        m = load("builtin:super-resolution", device="cpu")
        generator, config = m.generator, m.config
        count, pools = (24 if DEVICE.type == "cuda" else 6), [32, 32, 16, 8]
    else:
        config = tiny_config("super-resolution")
        generator, count, pools = randomize(Generator(config.model)), 8, [16, 12]
    generator.eval()
    inputs, targets = heldout(config, count)
    cpu = search(generator, config, inputs, targets, torch.device("cpu"), pools)
    gpu = search(generator, config, inputs, targets, DEVICE, pools)
    # (A rehearsal on a CPU without native bfloat16 skips it: emulated, it is 5-40x slower than float32.)
    bf16 = search(generator, config, inputs, targets, DEVICE, pools, dtype=torch.bfloat16) if native_bf16(DEVICE) else gpu
    float32_agree, bf16_agree = agreement(cpu, gpu), agreement(cpu, bf16)
    difference = (cpu.distances - gpu.distances.cpu()).abs().max().item()
    record(f"search/{model}", {"examples": count, "pools": pools, "float32_agreement": float32_agree,
                               "bf16_rescored_agreement": bf16_agree, "float32_max_distance_difference": difference})
    assert min(float32_agree) == 1.0, float32_agree
    torch.testing.assert_close(gpu.distances.cpu(), cpu.distances, rtol=1e-4, atol=1e-5)
    if model == "builtin":  # a random model's near-ties say nothing about a trained model's
        assert min(bf16_agree) >= 0.95, bf16_agree


def test_sampling_gives_the_cpus_pixels():
    cpu, gpu = load("builtin:super-resolution", device="cpu"), load("builtin:super-resolution", device=str(DEVICE))
    inputs, targets = heldout(cpu.config, 2)
    image = targets[-1][0]
    a, b = cpu.sample(image, n=4, seed=3), gpu.sample(image, n=4, seed=3)
    batched = gpu.sample(image, n=4, seed=3, batch=4)
    difference = (a - b).abs().max().item()
    record("sample", {"max_pixel_difference": difference,
                      "batched_max_pixel_difference": (a - batched).abs().max().item()})
    assert b.device.type == "cpu" and b.shape == a.shape
    assert difference < 1e-3
    torch.testing.assert_close(batched, b, rtol=0, atol=1e-3)


def assert_close_weights(a: Path, b: Path, name: str, steps: int) -> None:
    """Weights equal to float rounding (see weight_agreement), what they measured recorded under `name`."""
    tight, largest = weight_agreement(a, b)
    record(name, {"fraction_within_1e-4": tight, "max_weight_difference": largest, "bound": steps * LR})
    assert tight > 0.995 and largest < steps * LR, (tight, largest)


@pytest.fixture(scope="module")
def on_gpu(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu") / "run"
    train(tiny_config("super-resolution", *SETTINGS), out, device=str(DEVICE))
    return out


def test_training_picks_the_cpus_codes_and_reaches_its_weights(on_gpu, tmp_path):
    cpu = tmp_path / "cpu"
    train(tiny_config("super-resolution", *SETTINGS), cpu, device="cpu")
    a, b = (load_state(run / "state-000000004.pt")["search"] for run in (cpu, on_gpu))
    assert torch.equal(a["seeds"], b["seeds"]) and torch.equal(a["winners"], b["winners"])
    assert_close_weights(cpu, on_gpu, "train", steps=6)
    assert_same_searches_and_losses(cpu, on_gpu)


def chimle_train(out: Path, *extra: str, crash_at: str = "", launcher: list[str] | None = None):
    command = [*(launcher or [sys.executable]), "-m", "chimle", "train", "--preset", "tiny", "--out", str(out),
               "--device", DEVICE.type, *[f"-o{s}" for s in SETTINGS], *extra]
    env = {**os.environ, files.CRASH_VARIABLE: crash_at}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_a_killed_run_resumes_to_the_uninterrupted_weights(on_gpu, tmp_path):
    out = tmp_path / "run"
    killed = chimle_train(out, crash_at="step:5")  # killed in round 2, after its second step
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = chimle_train(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step" in (out / "log.txt").read_text()
    assert_close_weights(on_gpu, out, "resume", steps=6)


def test_torchrun_with_one_process_joins_nccl_and_trains_alike(on_gpu, tmp_path):
    out = tmp_path / "run"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    script = tmp_path / "backend.py"
    script.write_text("import sys, torch.distributed as dist, chimle.distributed as d\n"
                      "world, device = d.init(sys.argv[1])\nprint(dist.get_backend(), device)\nd.cleanup()\n")
    backend = subprocess.run([*launcher, str(script), DEVICE.type], capture_output=True, text=True, timeout=120)
    assert backend.returncode == 0, backend.stderr[-3000:]
    expected = "nccl" if DEVICE.type == "cuda" else "gloo"
    assert backend.stdout.split()[0] == expected, backend.stdout
    result = chimle_train(out, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    record("torchrun", {"backend": backend.stdout.strip()})
    assert_close_weights(on_gpu, out, "torchrun", steps=6)
