import pytest
import torch

from chimle.generator import Generator
from chimle.perceptual import LPIPS
from chimle import search
from chimle.search import codes_from, flat_search, hierarchical_search, level_batch, pool
from chimle.tasks import get, pyramid
from conftest import randomize, tiny_config


@pytest.fixture(scope="module")
def lpips():
    return LPIPS("alex")


def setup(levels=2, seed=0):
    cfg = tiny_config("super-resolution", "model.levels=2", "data.crop=32")
    g = randomize(Generator(cfg.model), seed).eval()
    g.requires_grad_(False)
    return g, get("super-resolution")


def planted_targets(g, task, inputs, seeds, pool_sizes, planted):
    """Targets rendered from candidate `planted[i][level]` of each example's own pools."""
    sizes = g.code_sizes(g.start(inputs))
    codes = [
        torch.stack([pool(int(s), level, pool_sizes[level], sizes[level])[planted[i][level]] for i, s in enumerate(seeds)])
        for level in range(len(sizes))
    ]
    with torch.no_grad():
        raw = g(inputs, codes)
    return [task.image(r, inputs, level) for level, r in enumerate(raw)]


def test_planted_candidate_equal_to_the_target_is_chosen(lpips):
    g, task = setup()
    inputs = [torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))]
    seeds = torch.tensor([11, 12, 13])
    planted = [[5, 2], [0, 7], [9, 9]]
    targets = planted_targets(g, task, inputs, seeds, [10, 10], planted)
    result = hierarchical_search(g, lpips, task, inputs, targets, seeds, [10, 10], max_batch=16)
    assert result.winners.tolist() == planted
    assert result.distances.abs().max() < 1e-5


def test_results_do_not_depend_on_batch_or_chunk_sizes(lpips):
    g, task = setup(seed=1)
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.rand(5, 3, 4, 4, generator=gen)]
    targets = pyramid(torch.rand(5, 3, 16, 16, generator=gen), 2)
    seeds = torch.arange(100, 105)
    results = [hierarchical_search(g, lpips, task, inputs, targets, seeds, [7, 6], max_batch=b) for b in (1, 5, 13, 64)]
    for r in results[1:]:
        assert torch.equal(r.winners, results[0].winners)
        torch.testing.assert_close(r.distances, results[0].distances, atol=1e-5, rtol=1e-4)
    # The search is not trivial: different examples pick different candidates.
    assert len(set(results[0].winners[:, 0].tolist())) > 1
    flats = [flat_search(g, lpips, task, inputs, targets, seeds, 9, max_batch=b) for b in (4, 64)]
    assert torch.equal(flats[0].winners, flats[1].winners)


def test_cpu_batches_are_capped_by_output_pixels_and_results_do_not_change(lpips, monkeypatch):
    assert level_batch(64, torch.empty(1, 3, 32, 32)) == 64  # 64 renders of 32 px fit the budget
    assert level_batch(64, torch.empty(1, 3, 128, 128)) == 4
    assert level_batch(64, torch.empty(1, 3, 1024, 1024)) == 1  # never none
    assert level_batch(3, torch.empty(1, 3, 8, 8)) == 3  # never more than max_batch
    assert level_batch(64, torch.empty(1, 3, 128, 128, device="meta")) == 64  # accelerators: the whole max_batch
    g, task = setup(seed=2)
    gen = torch.Generator().manual_seed(2)
    inputs = [torch.rand(4, 3, 4, 4, generator=gen)]
    targets = pyramid(torch.rand(4, 3, 16, 16, generator=gen), 2)
    seeds = torch.arange(200, 204)
    before = hierarchical_search(g, lpips, task, inputs, targets, seeds, [7, 6], max_batch=64, dtype=torch.bfloat16)
    batches = []
    render_level = g.render_level
    monkeypatch.setattr(g, "render_level", lambda p, c: batches.append((p.level, c.shape[0])) or render_level(p, c))
    monkeypatch.setattr(search, "CPU_BATCH_PIXELS", 3 * 16 * 16)  # 3 renders at 16 px, 12 at 8 px
    capped = hierarchical_search(g, lpips, task, inputs, targets, seeds, [7, 6], max_batch=64, dtype=torch.bfloat16)
    assert max(n for level, n in batches if level == 1) == 3 and max(n for level, n in batches if level == 0) == 12
    assert torch.equal(capped.winners, before.winners)
    torch.testing.assert_close(capped.distances, before.distances, atol=1e-5, rtol=1e-4)


def test_the_last_levels_winners_render_no_prefix(lpips, monkeypatch):
    """A level's winners are rendered once more, as the next level's prefix; after the last level there is none."""
    g, task = setup(seed=3)
    inputs = [torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(3))]
    targets = pyramid(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4)), 2)
    levels = []
    render_level = g.render_level
    monkeypatch.setattr(g, "render_level", lambda p, c: levels.append(p.level) or render_level(p, c))
    hierarchical_search(g, lpips, task, inputs, targets, torch.tensor([5]), [4, 4], max_batch=64)
    assert levels == [0, 0, 1]  # level 0: its candidates, then its winner's prefix; level 1: its candidates only


def test_regenerated_codes_equal_the_chosen_ones(lpips):
    g, task = setup(seed=2)
    gen = torch.Generator().manual_seed(2)
    inputs = [torch.rand(4, 3, 4, 4, generator=gen)]
    targets = pyramid(torch.rand(4, 3, 16, 16, generator=gen), 2)
    seeds = torch.tensor([3, 1, 4, 1])
    result = hierarchical_search(g, lpips, task, inputs, targets, seeds, [6, 5], max_batch=8)
    codes = codes_from(result, g.code_sizes(g.start(inputs)))
    with torch.no_grad():
        raw = g(inputs, codes)
    for level in range(2):
        d = lpips(task.image(raw[level], inputs, level), targets[level])
        torch.testing.assert_close(d, result.distances[:, level], atol=1e-5, rtol=1e-4)
    # Each level's winner is the best of its pool given the levels chosen before it.
    sizes = g.code_sizes(g.start(inputs))
    with torch.no_grad():
        for i in range(4):
            one = [inputs[0][i : i + 1]]
            _, prefix = g.render_level(g.start(one), codes[0][i : i + 1])
            candidates = pool(int(seeds[i]), 1, 5, sizes[1])
            out, _ = g.render_level(prefix.repeat(5), candidates)
            d = lpips(task.image(out, one * 5, 1), targets[1][i : i + 1].expand(5, -1, -1, -1))
            assert int(d.argmin()) == int(result.winners[i, 1])


def test_flat_search_finds_a_planted_full_code(lpips):
    g, task = setup(seed=3)
    inputs = [torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))]
    seeds = torch.tensor([21, 22])
    targets = planted_targets(g, task, inputs, seeds, [12, 12], [[4, 4], [11, 11]])
    result = flat_search(g, lpips, task, inputs, targets, seeds, 12, max_batch=5)
    assert result.winners.tolist() == [[4, 4], [11, 11]]
    assert result.pool_sizes == [12, 12]
