import pytest
import torch

from chimle.generator import Generator
from chimle.naive import naive_search, naive_step
from chimle.perceptual import LPIPS
from chimle.search import hierarchical_search
from chimle.tasks import get, pyramid
from chimle.train import level_losses
from conftest import randomize, tiny_config


@pytest.fixture(scope="module")
def lpips():
    return LPIPS("alex")


def setup(task_name: str, seed: int):
    cfg = tiny_config(task_name, "model.levels=3", "model.channels=[8,8,8]", "model.growth=[8,8,8]",
                      "search.samples_per_level=[4,4,4]", "data.crop=32")
    g = randomize(Generator(cfg.model), seed).eval()
    g.requires_grad_(False)
    task = get(task_name)
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(4, 3, 32, 32, generator=gen)
    if task.wiring == "super-resolution":
        inputs, targets = [torch.nn.functional.avg_pool2d(images, 8)], pyramid(images, 3)
    else:
        inputs = pyramid(torch.rand(4, 3, 16, 16, generator=gen), 3)
        targets = pyramid(images[..., :16, :16], 3)
    return g, task, inputs, targets


@pytest.mark.parametrize("task_name", ["super-resolution", "paired"])
def test_naive_search_chooses_the_same_winners_as_the_hierarchical_search(lpips, task_name):
    g, task, inputs, targets = setup(task_name, seed=5)
    seeds = torch.tensor([7, 8, 9, 10])
    pools = [9, 7, 5]
    fast = hierarchical_search(g, lpips, task, inputs, targets, seeds, pools, max_batch=6)
    # Mini-batches of 4 leave partial ones (9 = 4 + 4 + 1), as the official sampler's last one can be.
    for reuse in (False, True):
        naive = naive_search(g, lpips, task, inputs, targets, seeds, pools, mini_batch=4, reuse_prefix=reuse)
        assert torch.equal(naive.winners, fast.winners)
        torch.testing.assert_close(naive.distances, fast.distances, atol=1e-5, rtol=1e-4)
    # Not a trivial agreement: examples and levels pick different candidates.
    assert len(set(fast.winners.flatten().tolist())) > 2


def test_naive_step_takes_the_same_step_as_a_plain_one(lpips):
    cfg = tiny_config("super-resolution")
    task = get("super-resolution")
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 16, 16, generator=gen)
    inputs, targets = task.pair(images, cfg)
    models = [randomize(Generator(cfg.model), 3) for _ in range(2)]
    sizes = models[0].code_sizes(models[0].start(inputs))
    codes = [torch.randn(2, s, generator=gen) for s in sizes]
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in models]

    naive = naive_step(models[0], lpips, task, optimizers[0], inputs, targets, codes)
    plain = level_losses(models[1], lpips, task, inputs, targets, codes)
    optimizers[1].zero_grad()
    plain.sum().backward()
    optimizers[1].step()

    torch.testing.assert_close(naive, plain.detach())
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b)
    assert not torch.is_anomaly_enabled()  # switched off again after the step
