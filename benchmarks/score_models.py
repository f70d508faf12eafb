"""Score model files the way benchmarks/quality.py scores its runs: a learning curve from the snapshots that
scripts/train_builtin.py --snapshot-every keeps.

    OMP_NUM_THREADS=1 python benchmarks/score_models.py runs/builtin-sr/snapshots/*.safetensors runs/builtin-sr/run

For each model (a model file or a run directory): best-of-8 and mean LPIPS-VGG as a ratio to the task's baseline,
and the diversity, on the demo's 12 held-out tiles (`builtin`) and centre tiles of `--photos` held-out photos of
the open photo set (`photos`), one line each (quality.heldout_sets and quality.score).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402

from chimle.checkpoint import read_config  # noqa: E402
from chimle.perceptual import LPIPS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="model files or run directories")
    parser.add_argument("--photos", type=int, default=30, help="held-out photos of the open photo set (default 30, "
                        "as benchmarks/quality.py)")
    args = parser.parse_args()
    lpips = LPIPS("vgg")
    for model in args.models:
        sets = quality.heldout_sets(read_config(model), args.photos)
        scores = quality.score(model, sets, False, lpips)
        print(f"{model}: " + "; ".join(f"{name} best-of-8 / baseline {s['ratio_best']:.3f}, mean / baseline "
                                       f"{s['ratio_mean']:.3f}, diversity {s['diversity']:.3f}"
                                       for name, s in scores.items()), flush=True)


if __name__ == "__main__":
    main()
