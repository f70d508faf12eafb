"""The search's speed levers (channels-last weights, inference mode, bfloat16 autocast) change how it runs, not
what it finds, and leave the generator as they found it."""

import pytest
import torch

from chimle.generator import Generator
from chimle.perceptual import LPIPS
from chimle.search import channels_last, hierarchical_search, pool
from chimle.tasks import get, pyramid
from conftest import tiny_config


@pytest.fixture(scope="module")
def lpips():
    return LPIPS("alex")


def setup(seed: int):
    cfg = tiny_config("super-resolution", "model.levels=2", "data.crop=32")
    torch.manual_seed(seed)
    g = Generator(cfg.model).eval()  # as initialised, outputs depend on the codes clearly (unlike `randomize`)
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.rand(3, 3, 4, 4, generator=gen)]
    targets = pyramid(torch.rand(3, 3, 16, 16, generator=gen), 2)
    return g, get("super-resolution"), inputs, targets


def test_layouts_give_the_same_result_and_the_generator_is_left_trainable(lpips):
    g, task, inputs, targets = setup(4)
    seeds = torch.tensor([5, 6, 7])
    before = {name: p.detach().clone() for name, p in g.named_parameters()}
    nchw = hierarchical_search(g, lpips, task, inputs, targets, seeds, [8, 6], max_batch=7, layout=False)
    nhwc = hierarchical_search(g, lpips, task, inputs, targets, seeds, [8, 6], max_batch=7)
    assert torch.equal(nchw.winners, nhwc.winners)
    assert len(set(nchw.winners.flatten().tolist())) > 2
    torch.testing.assert_close(nchw.distances, nhwc.distances, atol=1e-5, rtol=1e-4)

    # Same values and layout as before, results usable outside inference mode, weights trainable again.
    for name, p in g.named_parameters():
        assert torch.equal(p, before[name]) and p.is_contiguous() and not p.is_inference(), name
    assert not any(t.is_inference() for t in (nhwc.seeds, nhwc.winners, nhwc.distances))
    sizes = g.code_sizes(g.start(inputs))
    out = g(inputs, [torch.randn(3, s) for s in sizes])[-1]
    out.sum().backward()
    assert all(p.grad is not None for p in g.levels[-1].style.parameters())


def test_weights_already_channels_last_stay_so(lpips):
    g, task, inputs, targets = setup(5)
    g.to(memory_format=torch.channels_last)
    hierarchical_search(g, lpips, task, inputs, targets, torch.tensor([1, 2, 3]), [4, 4], max_batch=8)
    assert g.levels[0].feat.weight_v.is_contiguous(memory_format=torch.channels_last)
    with channels_last(g, enabled=False):
        assert g.levels[0].feat.weight_v.is_contiguous(memory_format=torch.channels_last)


def test_bfloat16_search_finds_planted_candidates(lpips):
    g, task, inputs, targets = setup(6)
    seeds = torch.tensor([11, 12, 13])
    planted = [[3, 1], [0, 5], [7, 2]]
    sizes = g.code_sizes(g.start(inputs))
    codes = [torch.stack([pool(int(s), level, 8, sizes[level])[planted[i][level]] for i, s in enumerate(seeds)])
             for level in range(2)]
    with torch.no_grad():
        targets = [task.image(r, inputs, level) for level, r in enumerate(g(inputs, codes))]
    fp32 = hierarchical_search(g, lpips, task, inputs, targets, seeds, [8, 8], max_batch=8)
    bf16 = hierarchical_search(g, lpips, task, inputs, targets, seeds, [8, 8], max_batch=8, dtype=torch.bfloat16,
                               rescore=0)
    assert fp32.winners.tolist() == planted == bf16.winners.tolist()
    assert bf16.distances.dtype == torch.float32
    # bf16 renders are not exact: the planted candidate's distance is small but, unlike float32, not zero.
    assert fp32.distances.abs().max() < 1e-5 < bf16.distances.abs().max() < 0.05
    # Rescored, the winners' distances are the float32 ones.
    rescored = hierarchical_search(g, lpips, task, inputs, targets, seeds, [8, 8], max_batch=5, dtype=torch.bfloat16)
    assert rescored.winners.tolist() == planted and rescored.distances.abs().max() < 1e-5


def test_bfloat16_search_rescoring_every_candidate_is_the_float32_search(lpips):
    """With every candidate re-judged in float32 (and float32 prefixes), a bf16 search chooses exactly what the
    float32 search chooses, at every level, with the same distances."""
    g, task, inputs, targets = setup(7)
    seeds = torch.tensor([21, 22, 23])
    fp32 = hierarchical_search(g, lpips, task, inputs, targets, seeds, [8, 6], max_batch=7)
    bf16 = hierarchical_search(g, lpips, task, inputs, targets, seeds, [8, 6], max_batch=7, dtype=torch.bfloat16,
                               rescore=8)
    assert bf16.winners.tolist() == fp32.winners.tolist()
    torch.testing.assert_close(bf16.distances, fp32.distances, atol=1e-6, rtol=1e-5)


def test_a_channels_last_tower_stays_channels_last():
    """Every convolution of a channels-last render gets a channels-last input: none converts its input (a style
    block's instance norm used to return NCHW, so every later convolution copied its input)."""
    g, _, inputs, _ = setup(2)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
             for name, m in g.named_modules() if name.endswith("rdbs.2.convs.4") or name.endswith("style.conv")]
    codes = [torch.randn(3, s) for s in g.code_sizes(g.start(inputs))]
    with torch.no_grad():
        plain = g(inputs, codes)
        seen.clear()
        with channels_last(g):
            fast = g(inputs, codes)
    for h in hooks:
        h.remove()
    assert seen and all(seen)
    for a, b in zip(plain, fast):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
