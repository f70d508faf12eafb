"""Code search: for each training example, find codes whose outputs lie near its target (DESIGN.md §2.1, §2.2).

Hierarchical search (CHIMLE): level by level, coarse to fine. For level l draw a pool of m_l candidate codes,
render level l for all of them from the example's cached prefix (levels < l rendered once with the codes
already chosen), and keep the candidate whose output is nearest to the target downsampled to that level,
by the exact LPIPS distance. With the paper's pools (200, 200, 20, 10) that is 430 renders reaching into
8e6 code combinations.

Flat search (cIMLE, for comparison): one pool of full codes per example, each rendered through the whole
tower and judged at the last level only.

Both return a `SearchResult`: per example the seed of its candidate pools and the winning index per level,
from which `codes_from` regenerates the chosen codes exactly; the codes themselves are never stored.

Compared with the official implementation: lower levels are rendered once per example, not once per
candidate; candidates of several examples share a batch (up to `max_batch` renders); target features are
computed once per example and level; distances are exact (no random projection, no approximate index).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chimle.data import seeded
from chimle.generator import Generator, Prefix
from chimle.perceptual import LPIPS, Distance
from chimle.tasks import Task


@dataclass
class SearchResult:
    seeds: torch.Tensor  # (B,) int64: seed of each example's candidate pools
    winners: torch.Tensor  # (B, levels) int64: index of the chosen candidate in each level's pool
    pool_sizes: list[int]  # candidates per level (flat search: its single pool size at every level)
    distances: torch.Tensor  # (B, levels) LPIPS of the chosen candidate at each level (flat: the last level only)


def pool(seed: int, level: int, size: int, code_size: int) -> torch.Tensor:
    """The candidate codes of one example at one level, (size, code_size), drawn on the CPU from (seed, level)."""
    return torch.randn(size, code_size, generator=seeded(seed, level))


def codes_from(result: SearchResult, code_sizes: list[int], device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Regenerate the chosen codes of every example, one (B, code size) tensor per level."""
    codes = []
    for level, size in enumerate(code_sizes):
        rows = [
            pool(int(seed), level, result.pool_sizes[level], size)[int(win)]
            for seed, win in zip(result.seeds, result.winners[:, level])
        ]
        codes.append(torch.stack(rows).to(device))
    return codes


def _chunks(count: int, pool_size: int, max_batch: int):
    """(example, first candidate, end candidate) runs covering count x pool_size renders, max_batch at a time."""
    run = []
    used = 0
    for example in range(count):
        start = 0
        while start < pool_size:
            take = min(pool_size - start, max_batch - used)
            run.append((example, start, start + take))
            used += take
            start += take
            if used == max_batch:
                yield run
                run, used = [], 0
    if run:
        yield run


class _Pools:
    """Draws each example's pool when first needed and forgets pools of examples already done."""

    def __init__(self, seeds: torch.Tensor, level: int, size: int, code_size: int):
        self.seeds, self.level, self.size, self.code_size = seeds, level, size, code_size
        self.cache: dict[int, torch.Tensor] = {}

    def rows(self, example: int, start: int, end: int) -> torch.Tensor:
        if example not in self.cache:
            self.cache = {k: v for k, v in self.cache.items() if k > example}
            self.cache[example] = pool(int(self.seeds[example]), self.level, self.size, self.code_size)
        return self.cache[example][start:end]


@torch.no_grad()
def hierarchical_search(
    generator: Generator,
    distance: Distance | LPIPS,
    task: Task,
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    seeds: torch.Tensor,
    pool_sizes: list[int],
    max_batch: int = 64,
) -> SearchResult:
    """Choose each example's code level by level (see module docstring); the result does not depend on max_batch.

    Examples are searched in groups small enough that a group's prefixes and target features stay within the
    memory of about `max_batch` renders, while a group's candidates still fill batches of `max_batch`."""
    group = max(1, max_batch // min(pool_sizes))
    with generator.folded():
        return _in_groups(group, inputs, targets, seeds, lambda x, y, s: _hierarchical_group(
            generator, distance, task, x, y, s, pool_sizes, max_batch))


def _in_groups(group: int, inputs, targets, seeds, search) -> SearchResult:
    """Run `search(inputs, targets, seeds)` on consecutive groups of examples and join the results."""
    parts = [
        search([x[i : i + group] for x in inputs], [y[i : i + group] for y in targets], seeds[i : i + group])
        for i in range(0, inputs[0].shape[0], group)
    ]
    return SearchResult(
        torch.cat([p.seeds for p in parts]), torch.cat([p.winners for p in parts]), parts[0].pool_sizes,
        torch.cat([p.distances for p in parts]),
    )


def _hierarchical_group(generator, distance, task, inputs, targets, seeds, pool_sizes, max_batch) -> SearchResult:
    device = inputs[0].device
    count = inputs[0].shape[0]
    winners = torch.zeros(count, len(pool_sizes), dtype=torch.long)
    distances = torch.zeros(count, len(pool_sizes))
    prefix = generator.start(inputs)
    for level, size in enumerate(pool_sizes):
        code_size = generator.code_sizes(prefix)[level]
        target_features = distance.features(targets[level])  # once per example and level
        pools = _Pools(seeds, level, size, code_size)
        best = torch.full((count,), float("inf"))
        chosen = torch.empty(count, code_size)
        for run in _chunks(count, size, max_batch):
            examples = torch.cat([torch.full((end - start,), ex, dtype=torch.long) for ex, start, end in run])
            rows = [pools.rows(ex, start, end) for ex, start, end in run]
            index = examples.to(device)
            scores = _score(generator, distance, task, prefix.index(index), torch.cat(rows).to(device),
                            [f[index] for f in target_features]).cpu()
            offset = 0
            for (ex, start, end), candidates in zip(run, rows):
                segment = scores[offset : offset + end - start]
                offset += end - start
                j = int(segment.argmin())
                if segment[j] < best[ex]:  # strict: the first of equal candidates wins, as argmin would
                    best[ex], winners[ex, level], chosen[ex] = segment[j], start + j, candidates[j]
        if not torch.isfinite(best).all():
            raise FloatingPointError(f"code search: non-finite LPIPS distances at level {level}; the model has diverged")
        distances[:, level] = best
        _, prefix = generator.render_level(prefix, chosen.to(device))
    return SearchResult(seeds.clone(), winners, list(pool_sizes), distances)


def _score(generator: Generator, distance: Distance | LPIPS, task: Task, prefix: Prefix, codes: torch.Tensor,
           target_features: list[torch.Tensor]) -> torch.Tensor:
    """LPIPS distance of each candidate's output at `prefix.level` to its example's target."""
    level = prefix.level
    raw, _ = generator.render_level(prefix, codes)
    return distance.distance(distance.features(task.image(raw, prefix.inputs, level)), target_features)


@torch.no_grad()
def flat_search(
    generator: Generator,
    distance: Distance | LPIPS,
    task: Task,
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    seeds: torch.Tensor,
    pool_size: int,
    max_batch: int = 64,
) -> SearchResult:
    """Flat cIMLE: one pool of full codes per example, rendered through every level, judged at the last."""
    group = max(1, max_batch // pool_size)
    with generator.folded():
        return _in_groups(group, inputs, targets, seeds, lambda x, y, s: _flat_group(
            generator, distance, task, x, y, s, pool_size, max_batch))


def _flat_group(generator, distance, task, inputs, targets, seeds, pool_size, max_batch) -> SearchResult:
    device = inputs[0].device
    count, levels = inputs[0].shape[0], generator.cfg.levels
    code_sizes = generator.code_sizes(generator.start(inputs))
    target_features = distance.features(targets[-1])
    pools = [_Pools(seeds, level, pool_size, code_sizes[level]) for level in range(levels)]
    scores = torch.empty(count, pool_size)
    for run in _chunks(count, pool_size, max_batch):
        examples = torch.cat([torch.full((end - start,), ex, dtype=torch.long) for ex, start, end in run]).to(device)
        prefix = generator.start([x[examples] for x in inputs])
        for level in range(levels - 1):
            codes = torch.cat([pools[level].rows(ex, start, end) for ex, start, end in run]).to(device)
            _, prefix = generator.render_level(prefix, codes)
        codes = torch.cat([pools[-1].rows(ex, start, end) for ex, start, end in run]).to(device)
        scores_run = _score(generator, distance, task, prefix, codes, [f[examples] for f in target_features])
        offset = 0
        for ex, start, end in run:
            scores[ex, start:end] = scores_run[offset : offset + end - start].cpu()
            offset += end - start
    best = scores.argmin(dim=1)
    distances = torch.zeros(count, levels)
    distances[:, -1] = scores.gather(1, best[:, None]).squeeze(1)
    return SearchResult(seeds.clone(), best[:, None].repeat(1, levels), [pool_size] * levels, distances)
