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

Compared with the official implementation (whose work `chimle.naive` reproduces, for benchmarks/speed.py):
lower levels are rendered once per example, not once per mini-batch of candidates; candidates of several
examples share a batch (up to `max_batch` renders, fewer at high resolutions on a CPU: `level_batch`); target
features are computed once per example and level and compared with each candidate without being copied;
distances are exact (no random projection, no approximate index); and every render runs `fixed_weights`: weight
normalisation folded into plain weights, channels-last tensors, inference mode, optionally bfloat16 autocast,
optionally torch.compile (`renderer`).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cache

import torch
from torch.profiler import record_function

from chimle import streams
from chimle.blocks import fold, folded
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
    return torch.randn(size, code_size, generator=streams.pool(seed, level))


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


@contextmanager
def channels_last(module: torch.nn.Module, enabled: bool = True):
    """The module's 4-D parameters in channels-last layout for the duration of the block, then back to the
    default layout. oneDNN's CPU convolutions run 1.1-1.4x faster on channels-last tensors (measured in
    benchmarks/speed.py), and a conv with channels-last weights keeps its output channels-last, so the whole
    tower follows. Parameters already channels-last are left alone."""
    convert = _to_channels_last(module) if enabled else []
    try:
        yield module
    finally:
        with torch.no_grad():
            for p in convert:
                p.data = p.data.contiguous()


def _to_channels_last(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Convert `module`'s 4-D parameters to channels-last layout; returns those that were not already."""
    convert = [p for p in module.parameters() if p.ndim == 4 and not p.is_contiguous(memory_format=torch.channels_last)]
    with torch.no_grad():
        for p in convert:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
    return convert


def fix(generator: Generator) -> Generator:
    """Prepare `generator` for good as `fixed_weights` does for a block, for weights that never change again (a
    loaded `chimle.Model`): channels-last weights, weight normalisation folded. Inference mode stays per call."""
    _to_channels_last(generator)
    fold(generator)
    return generator


@contextmanager
def fixed_weights(generator: Generator, device: torch.device, dtype: torch.dtype | None = None, layout: bool = True,
                  fold: bool = True):
    """How to render while the weights do not change (the search; sampling too): channels-last weights
    (`layout`), weight normalisation folded into plain weights (`fold`), inference mode (no autograd
    bookkeeping, not even version counters), and autocast to `dtype` if given (bfloat16 pays on GPUs and CPUs
    with bf16 arithmetic; on others, e.g. AVX2-only CPUs, oneDNN falls back to kernels 10-40x slower than
    float32)."""
    with (channels_last(generator, layout), folded(generator) if fold else nullcontext(), torch.inference_mode(),
          torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)):
        yield


CPU_BATCH_PIXELS = 64 * 32 * 32  # on a CPU, a batch of renders outputs at most this many pixels (see level_batch)


def level_batch(max_batch: int, target: torch.Tensor) -> int:
    """Renders per batch at a level whose outputs have the size of `target` (N, C, H, W): `max_batch`, and on a
    CPU no more than `CPU_BATCH_PIXELS` output pixels (at least one render). Past that a batch's activations
    outgrow the caches and every render in it is slower: at the paper's widths, a 128 px render costs 1.2-1.4x
    more in batches of 32-64 than of 4 (float32 and bfloat16 alike), while at 16-32 px batches of 64 are the
    fastest (measured per level and batch size on a 2-core AMD EPYC). GPUs keep the whole `max_batch`."""
    if target.device.type != "cpu":
        return max_batch
    return max(1, min(max_batch, CPU_BATCH_PIXELS // (target.shape[-2] * target.shape[-1])))


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

    def codes(self, run, device) -> torch.Tensor:
        """The codes of a run's candidates, in the run's order, on `device`."""
        return torch.cat([self.rows(ex, start, end) for ex, start, end in run]).to(device)


def _spans(run):
    """(example, start, end, rows) for each part of a run: candidates start..end of the example's pool, at `rows`
    of the run's renders."""
    offset = 0
    for ex, start, end in run:
        yield ex, start, end, slice(offset, offset + end - start)
        offset += end - start


def _examples_of(run) -> torch.Tensor:
    """The example of each of a run's renders."""
    return torch.cat([torch.full((end - start,), ex, dtype=torch.long) for ex, start, end in run])


def hierarchical_search(
    generator: Generator,
    distance: Distance | LPIPS,
    task: Task,
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    seeds: torch.Tensor,
    pool_sizes: list[int],
    max_batch: int = 64,
    dtype: torch.dtype | None = None,
    layout: bool = True,
    rescore: int = 2,
    reject_below: list[float] | None = None,
    compile: bool = False,
) -> SearchResult:
    """Choose each example's code level by level (see module docstring); the result does not depend on max_batch.

    Examples are searched in groups small enough that a group's prefixes and target features stay within the
    memory of about `max_batch` renders, while a group's candidates still fill batches of `max_batch`. Only
    the level being searched has its weight normalisation folded: folding all levels at once would hold a
    second copy of every convolution weight (0.8 GB at the paper's widths) where one level's is enough.
    `dtype` (e.g. torch.bfloat16) renders the candidates under autocast, and then renders each example's
    `rescore` nearest candidates again in float32 and keeps the nearest of those by the float32 distance; the
    prefixes (the chosen codes' renders) are float32 too. Whenever the float32 search's winner is among the
    low-precision top `rescore`, the choice is exactly the float32 one (benchmarks/speed.py measures how often).
    `layout=False` keeps the weights' layout (see `channels_last`). `reject_below` (one value, or one per level)
    turns on rejection sampling (see `reject`). `compile` renders the candidates through torch.compile (see
    `renderer`)."""
    group = max(1, max_batch // min(pool_sizes))
    rescore = rescore if dtype is not None else 0
    thresholds = per_level(reject_below, len(pool_sizes))
    render = renderer(generator, distance, task, compile, layout)
    with fixed_weights(generator, inputs[0].device, dtype, layout, fold=False):
        result = _in_groups(group, inputs, targets, seeds, lambda x, y, s: _hierarchical_group(
            generator, distance, x, y, s, pool_sizes, max_batch, rescore, thresholds, render))
    return _plain(result)


def renderer(generator: Generator, distance: Distance | LPIPS, task: Task, compile: bool = False,
             layout: bool = True):
    """`render(prefix, codes, batch)`: the float32 perceptual features of the candidates `codes` (at most `batch`)
    rendered at `prefix.level`. With `compile`, through torch.compile: every batch is padded to `batch` rows
    (copies of its last) and its prefix copied into one memory layout, so that all batches of a level share one
    shape and one graph serves each level for as long as the process lives (four compiles for the paper's four
    levels, eight with bfloat16 and its float32 re-scoring; the weights are the graph's inputs, so training them
    does not compile again)."""
    if not compile:
        def render(prefix: Prefix, codes: torch.Tensor, batch: int) -> list[torch.Tensor]:
            with record_function("search.candidates"):
                raw, _ = generator.render_level(prefix, codes)
            with record_function("search.candidate_features"):
                return _features(distance, task.image(raw, prefix.inputs, prefix.level))

        return render
    compiled, layout_4d = _compiled(), torch.channels_last if layout else torch.contiguous_format

    def render(prefix: Prefix, codes: torch.Tensor, batch: int) -> list[torch.Tensor]:
        count = codes.shape[0]
        rows = torch.arange(batch, device=codes.device).clamp(max=count - 1)

        def padded(t: torch.Tensor) -> torch.Tensor:
            t = t[rows]
            return t.contiguous(memory_format=layout_4d) if t.ndim == 4 else t.contiguous()

        with record_function("search.candidates"):  # rendering and features in one graph
            features = compiled(generator, distance, task, prefix.map(padded), padded(codes))
        return [f[:count] for f in features]

    return render


def candidate_features(generator: Generator, distance: Distance | LPIPS, task: Task, prefix: Prefix,
                       codes: torch.Tensor) -> list[torch.Tensor]:
    """Render `codes` at `prefix.level` and return the perceptual features of the outputs, in float32 (what
    `renderer` compiles)."""
    raw, _ = generator.render_level(prefix, codes)
    return _features(distance, task.image(raw, prefix.inputs, prefix.level))


@cache
def _compiled():
    """`candidate_features` through torch.compile (made once: the compiled graphs are kept per function)."""
    return torch.compile(candidate_features, dynamic=False)


def per_level(values: list[float] | None, levels: int) -> list[float]:
    """A per-level setting given as nothing (0 everywhere), one value for every level, or one per level."""
    values = list(values or [0.0])
    return values * levels if len(values) == 1 else values


def reject(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Rejection sampling IMLE (RS-IMLE; Vashist, Peng and Li, ECCV 2024): candidates nearer to the target than
    `threshold` are rejected (their distance set to +inf) before the nearest is chosen, so that the codes
    training pulls towards their targets are typical draws of N(0, I), as at test time, and not the rare
    outliers that happen to land unusually close. Where every candidate of an example is rejected, the model
    already renders that target closely whatever the code: the example keeps all its candidates and the
    nearest is chosen, as without rejection. Rows are examples, columns candidates; +inf entries stay."""
    if threshold <= 0:
        return scores
    kept = scores.masked_fill(scores < threshold, float("inf"))
    none_left = torch.isinf(kept).all(dim=1, keepdim=True)
    return torch.where(none_left, scores, kept)


def _plain(result: SearchResult) -> SearchResult:
    """The result as ordinary tensors (made outside inference mode), free to be used in autograd later."""
    return SearchResult(result.seeds.clone(), result.winners.clone(), list(result.pool_sizes), result.distances.clone())


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


def _hierarchical_group(generator, distance, inputs, targets, seeds, pool_sizes, max_batch, rescore, thresholds,
                        render) -> SearchResult:
    count = inputs[0].shape[0]
    winners = torch.zeros(count, len(pool_sizes), dtype=torch.long)
    distances = torch.zeros(count, len(pool_sizes))
    device, prefix = inputs[0].device, generator.start(inputs)
    for level, size in enumerate(pool_sizes):
        with folded(generator.levels[level]):
            chosen = _search_level(generator, distance, render, targets, seeds, prefix, size, max_batch, winners,
                                   distances, rescore, thresholds[level])
            if level + 1 < len(pool_sizes):  # the last level's winners need no prefix; prefixes are float32
                with record_function("search.prefix"), torch.autocast(device.type, enabled=False):
                    _, prefix = generator.render_level(prefix, chosen.to(device))
    return SearchResult(seeds.clone(), winners, list(pool_sizes), distances)


def _search_level(generator, distance, render, targets, seeds, prefix, size, max_batch, winners, distances,
                  rescore, threshold) -> torch.Tensor:
    """Choose every example's code at `prefix.level` (into `winners`, `distances`); return the chosen codes."""
    device, level, count = targets[0].device, prefix.level, prefix.batch
    code_size = generator.code_sizes(prefix)[level]
    batch = level_batch(max_batch, targets[level])
    with record_function("search.target_features"):
        target_features = _features(distance, targets[level])  # once per example and level
    pools = _Pools(seeds, level, size, code_size)
    scores = torch.empty(count, size)
    for run in _chunks(count, size, batch):
        with record_function("search.draw_codes"):
            codes = pools.codes(run, device)
        run_scores = _score(render, distance, _candidates_prefix(prefix, run, device), codes, target_features, run,
                            batch)
        for ex, start, end, rows in _spans(run):
            scores[ex, start:end] = run_scores[rows]
    if not torch.isfinite(scores).all():
        raise FloatingPointError(f"code search: non-finite LPIPS distances at level {level}; the model has diverged")
    with torch.autocast(device.type, enabled=False):  # below, float32 whatever the candidates were rendered in
        scores = reject(scores, threshold)
        if rescore > 0:
            scores = _rescore(generator, distance, render, targets, seeds, prefix, scores, rescore, batch)
            scores = reject(scores, threshold)
        with record_function("search.argmin"):
            best = scores.argmin(dim=1)  # the first of equal candidates wins
            winners[:, level], distances[:, level] = best, scores.gather(1, best[:, None]).squeeze(1)
        return torch.stack([pool(int(seeds[ex]), level, size, code_size)[int(best[ex])] for ex in range(count)])


def _rescore(generator, distance, render, targets, seeds, prefix, scores, k, batch) -> torch.Tensor:
    """`scores` (count, pool size) with each example's k lowest replaced by their float32 distances and every
    other candidate set to +inf, so that the float32 distances alone decide."""
    device, level = targets[0].device, prefix.level
    count, size = scores.shape
    k = min(k, size)
    code_size = generator.code_sizes(prefix)[level]
    top = scores.topk(k, dim=1, largest=False).indices.sort(dim=1).values  # pool order: ties keep argmin's rule
    exact = torch.full_like(scores, float("inf"))
    with record_function("search.rescore"):
        target_features = _features(distance, targets[level])
        per_batch = max(1, batch // k)
        for first in range(0, count, per_batch):
            examples = range(first, min(count, first + per_batch))
            run = [(ex, 0, k) for ex in examples]
            codes = torch.cat([pool(int(seeds[ex]), level, size, code_size)[top[ex]] for ex in examples]).to(device)
            run_scores = _score(render, distance, _candidates_prefix(prefix, run, device), codes, target_features, run,
                                max(batch, k))
            for i, ex in enumerate(examples):
                exact[ex, top[ex]] = run_scores[i * k : (i + 1) * k]
    return exact


def _candidates_prefix(prefix: Prefix, run, device) -> Prefix:
    """The prefix of each candidate of a run: its example's prefix, repeated (a broadcast view if the run
    holds one example, so nothing is copied)."""
    with record_function("search.repeat_prefix"):
        if len(run) == 1:
            ex, start, end = run[0]
            return prefix.map(lambda t: t[ex : ex + 1].expand(end - start, *t.shape[1:]))
        return prefix.index(_examples_of(run).to(device))


def _features(distance: Distance | LPIPS, images: torch.Tensor) -> list[torch.Tensor]:
    """Perceptual features in float32 (under autocast they are computed in the lower precision)."""
    return [f.float() for f in distance.features(images)]


def _score(render, distance: Distance | LPIPS, prefix: Prefix, codes: torch.Tensor,
           target_features: list[torch.Tensor], run, batch: int) -> torch.Tensor:
    """LPIPS distance (on the CPU) of each candidate's output at `prefix.level` to its example's target; `run`
    (at most `batch` renders) says which rows belong to which example. Target features are broadcast, never copied
    per candidate."""
    features = render(prefix, codes, batch)
    with record_function("search.distance"), torch.autocast(codes.device.type, enabled=False):
        scores = [distance.distance([f[rows] for f in features], [t[ex : ex + 1] for t in target_features])
                  for ex, _, _, rows in _spans(run)]
        return torch.cat(scores).cpu()


def flat_search(
    generator: Generator,
    distance: Distance | LPIPS,
    task: Task,
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    seeds: torch.Tensor,
    pool_size: int,
    max_batch: int = 64,
    dtype: torch.dtype | None = None,
    layout: bool = True,
    reject_below: float = 0.0,
    compile: bool = False,
) -> SearchResult:
    """Flat cIMLE: one pool of full codes per example, rendered through every level, judged at the last
    (with rejection sampling below `reject_below`, see `reject`; `compile` as in `hierarchical_search`, for the
    last level's renders)."""
    group = max(1, max_batch // pool_size)
    render = renderer(generator, distance, task, compile, layout)
    with fixed_weights(generator, inputs[0].device, dtype, layout):
        result = _in_groups(group, inputs, targets, seeds, lambda x, y, s: _flat_group(
            generator, distance, task, x, y, s, pool_size, max_batch, reject_below, render))
    return _plain(result)


def _flat_group(generator, distance, task, inputs, targets, seeds, pool_size, max_batch,
                threshold, render) -> SearchResult:
    device = inputs[0].device
    count, levels = inputs[0].shape[0], generator.cfg.levels
    code_sizes = generator.code_sizes(generator.start(inputs))
    target_features = _features(distance, targets[-1])
    pools = [_Pools(seeds, level, pool_size, code_sizes[level]) for level in range(levels)]
    scores = torch.empty(count, pool_size)
    batch = level_batch(max_batch, targets[-1])
    for run in _chunks(count, pool_size, batch):
        examples = _examples_of(run).to(device)
        prefix = generator.start([x[examples] for x in inputs])
        for level in range(levels - 1):
            _, prefix = generator.render_level(prefix, pools[level].codes(run, device))
        run_scores = _score(render, distance, prefix, pools[-1].codes(run, device), target_features, run, batch)
        for ex, start, end, rows in _spans(run):
            scores[ex, start:end] = run_scores[rows]
    scores = reject(scores, threshold)
    best = scores.argmin(dim=1)
    distances = torch.zeros(count, levels)
    distances[:, -1] = scores.gather(1, best[:, None]).squeeze(1)
    return SearchResult(seeds.clone(), best[:, None].repeat(1, levels), [pool_size] * levels, distances)
