"""Make the built-in layout dataset: a label map for each built-in photo, by clustering the colours of all the
photos together (k-means in Lab) and smoothing the result into regions. The maps play the role of semantic
layouts so that the layout task can be trained and demonstrated offline; a class here means "a region of this
kind of colour and brightness", not an object category.

    python scripts/make_layouts.py          # rewrites src/chimle/assets/layouts/{train,heldout}/*.png + palette.json

Deterministic: the same photos give the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from chimle.colour import rgb_to_lab
from chimle.data import builtin_photos, list_images, load_image

CLASSES = 8
SMOOTHING = 15  # side of the majority filter that turns pixel clusters into regions, px
COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230)]
OUT = Path(__file__).resolve().parents[1] / "src/chimle/assets/layouts"


def kmeans(points: np.ndarray, k: int, iterations: int = 30) -> np.ndarray:
    """Cluster centres by Lloyd's algorithm from k-means++-like farthest-point initial centres."""
    centres = [points[np.argmin(points[:, 0])]]  # start at the darkest point
    for _ in range(k - 1):
        d = np.min([((points - c) ** 2).sum(1) for c in centres], axis=0)
        centres.append(points[np.argmax(d)])
    centres = np.array(centres)
    for _ in range(iterations):
        assign = np.argmin(((points[:, None] - centres[None]) ** 2).sum(2), axis=1)
        centres = np.array([points[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(k)])
    return centres[np.argsort(centres[:, 0])]  # darkest first


def main() -> None:
    photos = {split: list_images(builtin_photos(split)) for split in ("train", "heldout")}
    labs = {p: rgb_to_lab(load_image(p)[None])[0] for files in photos.values() for p in files}
    sample = np.concatenate([lab[:, ::4, ::4].reshape(3, -1).T.numpy() for lab in labs.values()])
    centres = torch.from_numpy(kmeans(sample.astype(np.float64), CLASSES)).float()
    for split, files in photos.items():
        (OUT / split).mkdir(parents=True, exist_ok=True)
        for path in files:
            lab = labs[path].reshape(3, -1).T
            labels = torch.cdist(lab, centres).argmin(1).reshape(labs[path].shape[1:])
            votes = F.one_hot(labels, CLASSES).permute(2, 0, 1).float()[None]
            votes = F.avg_pool2d(votes, SMOOTHING, stride=1, padding=SMOOTHING // 2, count_include_pad=False)
            labels = votes[0].argmax(0)
            colour = np.array(COLOURS, dtype=np.uint8)[labels.numpy()]
            Image.fromarray(colour).save(OUT / split / f"{path.stem}.png", optimize=True)
    palette = {"classes": [{"name": f"region {j} (L={centres[j, 0]:.0f})", "colour": list(COLOURS[j])}
                           for j in range(CLASSES)], "void": [[0, 0, 0]]}
    (OUT / "palette.json").write_text(json.dumps(palette, indent=1) + "\n")
    print(f"wrote {sum(map(len, photos.values()))} label maps and palette.json to {OUT}")


if __name__ == "__main__":
    main()
