"""Rebuild the built-in sample set (src/chimle/assets/photos) from the project's development photos.

    python scripts/make_sample_set.py ../shared/data/photos

Only CC0, public-domain and CC-BY photos are shipped; each is resized so that its shorter side is 256 px
(anti-aliased) and stored as JPEG quality 95 without chroma subsampling. Held-out photos are whole source
photos, so no held-out pixels are ever seen in training.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

SIDE = 256
# file stem -> (author, licence, split); sources: see ATTRIBUTION.md written below.
PHOTOS = {
    "seeding": ("Clemens Engelhardt", "CC0-1.0", "train"),
    "citrus": ("US Department of Agriculture", "Public Domain", "train"),
    "aitzgorri": ("Aitzol Berasategi", "CC-BY-4.0", "train"),
    "friends": ("Aitzol Berasategi", "CC-BY-4.0", "train"),
    "life": ("Aitzol Berasategi", "CC-BY-4.0", "train"),
    "picosdeeuropa": ("Aitzol Berasategi", "CC-BY-4.0", "train"),
    "sunset": ("Aitzol Berasategi", "CC-BY-4.0", "train"),
    "picture_0b": ('Trevor "Freespace"', "CC-BY-4.0", "train"),
    "wine": ("Jakub Mede", "CC-BY-4.0", "train"),
    "cincinnati": ("Derek Jensen (Roebling Suspension Bridge)", "Public Domain", "heldout"),
    "european": ("John Severns (European honey bee)", "Public Domain", "heldout"),
    "picture_1a": ('Trevor "Freespace"', "CC-BY-4.0", "heldout"),
}
SOURCES = {
    "seeding": "Debian package lomiri-wallpapers-16.04 20.04.0-2",
    "citrus": "Debian package palapeli-data 22.12.3-1",
    "cincinnati": "Debian package palapeli-data 22.12.3-1",
    "european": "Debian package palapeli-data 22.12.3-1",
}


def main(source: Path) -> None:
    out = Path(__file__).parents[1] / "src" / "chimle" / "assets" / "photos"
    rows = []
    for stem, (author, licence, split) in PHOTOS.items():
        image = Image.open(source / f"{stem}.jpg").convert("RGB")
        scale = SIDE / min(image.size)
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=None)
        (out / split).mkdir(parents=True, exist_ok=True)
        image.save(out / split / f"{stem}.jpg", quality=95, subsampling=0)
        where = SOURCES.get(stem, "Debian package lomiri-wallpapers-16.04 20.04.0-2")
        rows.append(f"| {split}/{stem}.jpg | {author} | {licence} | {where} |")
    (out / "ATTRIBUTION.md").write_text(
        "# Built-in sample photos\n\n"
        f"Resized copies (shorter side {SIDE} px, JPEG quality 95) of freely licensed photographs, made by\n"
        "`scripts/make_sample_set.py`. The split into training and held-out images is by source photo.\n\n"
        "| file | author | licence | source |\n|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "CC-BY-4.0: https://creativecommons.org/licenses/by/4.0/ (changes: resized, re-encoded).\n"
        "CC0-1.0: https://creativecommons.org/publicdomain/zero/1.0/\n"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/photos"))
