"""Score model files the way benchmarks/quality.py scores its runs: a learning curve from the snapshots that
scripts/train_builtin.py --snapshot-every keeps.

    OMP_NUM_THREADS=1 python benchmarks/score_models.py runs/builtin-sr/snapshots/*.safetensors runs/builtin-sr/run
    OMP_NUM_THREADS=1 python benchmarks/score_models.py MODEL --photos 60 --seeds 0,1,2   # the sampling spread

For each model (a model file or a run directory): best-of-8 and mean LPIPS-VGG as a ratio to the task's baseline,
and the diversity, on the demo's 12 held-out tiles (`builtin`) and centre tiles of `--photos` held-out photos of
the open photo set (`photos`), one line each (quality.heldout_sets and quality.score). With several `--seeds`
(sampling seeds; the built-in models' records use seed 0), one line per seed and then the mean and standard
deviation over them: how far a model's numbers move with the luck of its 8 samples.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import quality  # noqa: E402

from chimle.checkpoint import read_config  # noqa: E402
from chimle.perceptual import LPIPS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="model files or run directories")
    parser.add_argument("--photos", type=int, default=30, help="held-out photos of the open photo set (default 30, "
                        "as benchmarks/quality.py)")
    parser.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0],
                        help="sampling seeds, e.g. 0,1,2 (default 0)")
    args = parser.parse_args()
    lpips = LPIPS("vgg")
    for model in args.models:
        sets = quality.heldout_sets(read_config(model), args.photos)
        runs = []
        for seed in args.seeds:
            runs.append(quality.score(model, sets, False, lpips, seed=seed))
            label = f"{model}" + (f" seed {seed}" if len(args.seeds) > 1 else "")
            print(f"{label}: " + "; ".join(f"{name} best-of-8 / baseline {ratio(s['ratio_best'])}, mean / baseline "
                                           f"{ratio(s['ratio_mean'])}, diversity {s['diversity']:.3f}"
                                           for name, s in runs[-1].items()), flush=True)
        if len(runs) > 1:
            print(f"{model} over seeds {','.join(map(str, args.seeds))}: " + "; ".join(
                f"{name} best-of-8 / baseline {spread([r[name]['ratio_best'] for r in runs])}, mean / baseline "
                f"{spread([r[name]['ratio_mean'] for r in runs])}" for name in runs[0]), flush=True)


def ratio(value: float | None) -> str:
    """A ratio to the baseline, to 3 decimals ('-' for a task without a baseline: layouts)."""
    return "-" if value is None else f"{value:.3f}"


def spread(values: list[float]) -> str:
    """'mean ± standard deviation' of values, to 4 decimals ('-' for a task without a baseline)."""
    return "-" if None in values else common.pm(common.spread(values), 4)


if __name__ == "__main__":
    main()
