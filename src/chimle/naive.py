"""The naive reference mode: the work the official implementation does, done with our modules, so that
benchmarks/speed.py can measure what `chimle.search` and the training levers save (DESIGN.md §2.5).

`naive_search` follows the official sampler step for step: for each level l, for each example, for each
mini-batch of 20 of its m_l candidates, it
    renders levels 0..l-1 again with the codes already chosen, for 20 identical copies of the example,
    renders level l for the mini-batch,
    computes the LPIPS features of the example's target again,
and finally keeps the nearest candidate. Weight normalisation is recomputed in every forward (the generator
is not folded), tensors stay NCHW, and autograd is only told `no_grad`. The one difference on purpose: the
official code projects the LPIPS features to about 1000 dimensions with random matrices and asks an
approximate nearest-neighbour index (a CUDA extension); here the distance is the exact one, so the naive
search chooses the same winners as `hierarchical_search` from the same seeds (tests/test_naive.py).
`reuse_prefix=True` renders the lower levels once per example and level instead: the prefix-caching lever
alone, for the benchmark's ladder.

`naive_step` is one training step as the official code takes it: with autograd's anomaly detection on.
"""

from __future__ import annotations

import warnings

import torch
from torch.profiler import record_function

from chimle.generator import Generator
from chimle.perceptual import LPIPS, Distance
from chimle.search import SearchResult, pool
from chimle.tasks import Task
from chimle.train import level_losses

MINI_BATCH = 20  # candidates rendered at once by the official sampler (its `mini_batch_size`, default 20)


@torch.no_grad()
def naive_search(
    generator: Generator,
    distance: Distance | LPIPS,
    task: Task,
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    seeds: torch.Tensor,
    pool_sizes: list[int],
    mini_batch: int = MINI_BATCH,
    reuse_prefix: bool = False,
) -> SearchResult:
    """Hierarchical search doing the official implementation's work (see the module docstring)."""
    device = inputs[0].device
    count, levels = inputs[0].shape[0], len(pool_sizes)
    winners = torch.zeros(count, levels, dtype=torch.long)
    distances = torch.zeros(count, levels)
    chosen: list[torch.Tensor] = []  # (count, code size) per level done
    code_sizes = generator.code_sizes(generator.start([x[:1] for x in inputs]))
    for level, size in enumerate(pool_sizes):
        chosen.append(torch.empty(count, code_sizes[level]))
        for ex in range(count):
            candidates = pool(int(seeds[ex]), level, size, code_sizes[level])
            example = [x[ex : ex + 1] for x in inputs]
            cached = _prefix(generator, example, [c[ex : ex + 1].to(device) for c in chosen[:level]]) if reuse_prefix else None
            scores = []
            for start in range(0, size, mini_batch):
                codes = candidates[start : start + mini_batch].to(device)
                n = codes.shape[0]
                if cached is None:
                    prefix = _prefix(generator, [x.expand(n, -1, -1, -1) for x in example],
                                     [c[ex : ex + 1].expand(n, -1).to(device) for c in chosen[:level]])
                else:
                    prefix = cached.repeat(n)
                with record_function("search.candidates"):
                    raw, _ = generator.render_level(prefix, codes)
                with record_function("search.candidate_features"):
                    features = distance.features(task.image(raw, prefix.inputs, level))
                with record_function("search.target_features"):
                    target_features = distance.features(targets[level][ex : ex + 1])  # again, per mini-batch
                with record_function("search.distance"):
                    scores.append(distance.distance(features, target_features).cpu())
            with record_function("search.argmin"):
                scores = torch.cat(scores)
                j = int(scores.argmin())
            winners[ex, level], distances[ex, level] = j, scores[j]
            chosen[level][ex] = candidates[j]
        if not torch.isfinite(distances[:, level]).all():
            raise FloatingPointError(f"code search: non-finite LPIPS distances at level {level}; the model has diverged")
    return SearchResult(seeds.clone(), winners, list(pool_sizes), distances)


def _prefix(generator: Generator, inputs: list[torch.Tensor], codes: list[torch.Tensor]):
    """The prefix after rendering levels 0..len(codes)-1 with `codes`."""
    with record_function("search.prefix"):
        prefix = generator.start(inputs)
        for code in codes:
            _, prefix = generator.render_level(prefix, code)
        return prefix


def naive_step(generator: Generator, distance: Distance | LPIPS, task: Task, optimizer: torch.optim.Optimizer,
               inputs: list[torch.Tensor], targets: list[torch.Tensor], codes: list[torch.Tensor]) -> torch.Tensor:
    """One Adam step as the official code takes it (anomaly detection on); returns the per-level losses."""
    generator.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")
        with torch.autograd.detect_anomaly():
            optimizer.zero_grad()
            losses = level_losses(generator, distance, task, inputs, targets, codes)
            losses.sum().backward()
    optimizer.step()
    return losses.detach()
