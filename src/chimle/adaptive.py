"""Adaptive IMLE (Aghabozorgi, Peng and Li, ICML 2023) in the hierarchical search (config `search.adaptive`).

Plain IMLE searches a new code for every example each time it is visited. Adaptive IMLE keeps each example's
code while training is still pulling that code's output towards the example, and searches again only once the
pull has worked: when the example's current distance d_i has fallen below its threshold tau_i (and at least
`adaptive_min_visits` visits have passed since its last search), or unconditionally after `adaptive_max_visits`
visits. At a search the threshold becomes tau_i = (1 - `adaptive_shrink`) x d_i, the distance the example had
reached with its old code (AdaIMLE's gamma = 0.04, 7 and 30 iterations). The searches saved are the gain.

Its state is per example, so it needs examples that come back: a fixed set of `train.examples` crops, visited
once per pass in a fresh order each pass. Ours is conditional and hierarchical where the paper's is neither: an
example's whole code (every level) is kept or searched again together, and d_i is the training loss of that
example, the sum of its per-level distances. An example's first visit always searches; its threshold is then
(1 - gamma) x the distance of the code found.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chimle import streams
from chimle.streams import Draw


def data_point(seed: int, number: int, examples: int) -> int:
    """Which of a fixed set of `examples` training examples is example `number` of the run: every pass over the
    set visits each once, in an order drawn from (seed, pass)."""
    order = torch.randperm(examples, generator=streams.run(Draw.FIXED_ORDER, seed, number // examples))
    return int(order[number % examples])


@dataclass
class AdaptiveState:
    """Per example of the fixed set: its current code (pool seed and winning index per level; seed -1: none
    yet), its threshold and the visits since its last search."""

    seeds: torch.Tensor  # (E,) int64
    winners: torch.Tensor  # (E, levels) int64
    pool_sizes: list[int]
    thresholds: torch.Tensor  # (E,) float32
    visits: torch.Tensor  # (E,) int64: visits since the last search

    @classmethod
    def empty(cls, examples: int, pool_sizes: list[int]) -> AdaptiveState:
        return cls(torch.full((examples,), -1, dtype=torch.long), torch.zeros(examples, len(pool_sizes), dtype=torch.long),
                   list(pool_sizes), torch.full((examples,), float("inf")), torch.zeros(examples, dtype=torch.long))

    def has_code(self, ids: torch.Tensor) -> torch.Tensor:
        return self.seeds[ids] >= 0

    def due(self, ids: torch.Tensor, current: torch.Tensor, min_visits: int, max_visits: int) -> torch.Tensor:
        """Which of the examples `ids` (current distances `current`, +inf where they have no code) are searched
        again at this visit."""
        visits = self.visits[ids] + 1
        return ~self.has_code(ids) | ((current < self.thresholds[ids]) & (visits >= min_visits)) | (visits >= max_visits)

    def update(self, ids: torch.Tensor, searched: torch.Tensor, seeds: torch.Tensor, winners: torch.Tensor,
               before: torch.Tensor, after: torch.Tensor, shrink: float) -> None:
        """Record a visit of the examples `ids`: those `searched` take their new codes (`seeds`, `winners`) and
        the threshold (1 - shrink) x their distance `before` the search (`after` it for a first search)."""
        self.visits[ids] += 1
        s = ids[searched]
        reached = torch.where(torch.isfinite(before[searched]), before[searched], after[searched])
        self.thresholds[s] = (1 - shrink) * reached
        self.seeds[s], self.winners[s], self.visits[s] = seeds[searched], winners[searched], 0

    def state_dict(self) -> dict:
        return {"seeds": self.seeds, "winners": self.winners, "pool_sizes": list(self.pool_sizes),
                "thresholds": self.thresholds, "visits": self.visits}

    @classmethod
    def from_state(cls, state: dict) -> AdaptiveState:
        return cls(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()})
