"""Every random draw chimle makes, by name: which stream a sample's code, a candidate pool, a crop or a data order
comes from.

A stream is a CPU `torch.Generator` seeded from a key of integers, mixed by splitmix64 steps so that nearby keys
give unrelated streams. The keys are laid out so that no two uses can share one:

    sample code     (seed, index, level)            3 numbers: level `level` of sample `index` of `--seed seed`
    candidate pool  (pool seed, level)              2 numbers: the candidates one example is searched over
    a run's draws   (RUN, draw, seed, number)       4 numbers: `draw` names what is drawn (Draw below)

Keys of different lengths differ, and the run's draws differ in their `draw` field, so two different uses never
ask for the same key. (Seeds are 63-bit hashes of the keys: tests/test_streams.py checks that the streams of a
run and of sampling come out distinct.) The sample and pool keys are the ones chimle has always used, so a
sample named `seed:index` on the command line renders the same image as in earlier versions.
"""

from __future__ import annotations

from enum import IntEnum

import torch

RUN = 0x6368696D6C65  # "chimle": the first number of every key below that is not a code's


class Draw(IntEnum):
    """What a run draws from its seed, each from its own stream."""
    ORDER = 1  # the order of one pass over the training files (number: the pass)
    CROP = 2  # one example's crop, flip and channel order (number: the example)
    POOL_SEEDS = 3  # the pool seeds of one round's examples (number: the round)
    FIXED_ORDER = 4  # the order of one pass over a fixed example set (train.examples; number: the pass)
    REBALANCE = 5  # the file a rebalanced layout example starts from (number: the example)
    NIGHT_NOISE = 6  # the sensor noise of a synthetic night shot (number: 0)


def mix(*numbers: int) -> int:
    """A 63-bit seed from several integers (splitmix64 steps), so nearby inputs give unrelated streams."""
    state = 0x9E3779B97F4A7C15
    for n in numbers:
        state = (state ^ (n & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
    return state & 0x7FFFFFFFFFFFFFFF


def seeded(*numbers: int) -> torch.Generator:
    """A CPU random generator seeded from a key of integers. Package code names its stream with the functions
    below; this is for streams of their own (benchmarks, tests)."""
    return torch.Generator().manual_seed(mix(*numbers))


def sample_code(seed: int, index: int, level: int) -> torch.Generator:
    """The stream of the code at `level` of sample `index` drawn with seed `seed`."""
    return seeded(seed, index, level)


def pool(pool_seed: int, level: int) -> torch.Generator:
    """The stream of one example's candidate codes at `level`."""
    return seeded(pool_seed, level)


def run(draw: Draw, seed: int, number: int = 0) -> torch.Generator:
    """The stream of draw `draw` number `number` of the run seeded `seed` (train.seed)."""
    return seeded(RUN, int(draw), seed, number)
