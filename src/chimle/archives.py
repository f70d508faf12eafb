"""Read files out of wheels, tarballs, Debian packages and Qt resource bundles, in memory, with the standard
library only.

A Debian package (``.deb``) is an ``ar`` archive of three members: ``debian-binary``, ``control.tar.*`` and
``data.tar.*``, the last holding the installed files (xz-compressed in Debian 12; gzip, bzip2 and plain tar are
also allowed by dpkg; zstd needs Python 3.14's ``compression.zstd``). Some packages keep their images inside
Qt resource bundles (``.rcc``, GCompris does): a tree of UTF-16 names over a blob of file contents, each stored
plainly or zlib-compressed.

Nothing here writes to disk: names inside an archive never become paths, callers get bytes.
"""

from __future__ import annotations

import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

AR_MAGIC = b"!<arch>\n"
AR_HEADER = 60  # name 16, mtime 12, uid 6, gid 6, mode 8, size 10, magic 2
# data.tar member name -> tarfile stream mode (dpkg-deb(1) lists the allowed compressors).
DATA_TARS = {"data.tar.xz": "r|xz", "data.tar.gz": "r|gz", "data.tar.bz2": "r|bz2", "data.tar": "r|",
             "data.tar.zst": "r|zst"}

RCC_MAGIC = b"qres"
RCC_COMPRESSED, RCC_DIRECTORY, RCC_ZSTD = 0x1, 0x2, 0x4  # node flags (Qt's rcc.cpp)


class ArchiveError(ValueError):
    """An archive is malformed, or lacks a member it was asked for."""


# ---------------------------------------------------------------------------------------------------------
# ar and .deb


def ar_members(path: str | Path) -> dict[str, tuple[int, int]]:
    """The members of an ``ar`` archive as ``name -> (offset, size)`` of their contents in the file."""
    members = {}
    with open(path, "rb") as f:
        if f.read(len(AR_MAGIC)) != AR_MAGIC:
            raise ArchiveError(f"{path}: not an ar archive (a .deb starts with '!<arch>')")
        while header := f.read(AR_HEADER):
            if len(header) < AR_HEADER or header[58:60] != b"`\n":
                raise ArchiveError(f"{path}: truncated or corrupt ar member header at byte {f.tell() - len(header)}")
            name = header[:16].decode("ascii", "replace").rstrip().removesuffix("/")  # GNU ar ends names with /
            size = int(header[48:58].decode("ascii").strip() or 0)
            members[name] = (f.tell(), size)
            f.seek(size + size % 2, 1)  # contents are padded to an even length
    return members


class _Window:
    """A read-only view of ``size`` bytes of an open file from ``offset``: what tarfile's stream mode reads."""

    def __init__(self, f, offset: int, size: int):
        self.f, self.left = f, size
        f.seek(offset)

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data


def _data_tar(path: Path) -> tuple[str, int, int]:
    """The name, offset and size of a .deb's ``data.tar.*`` member."""
    members = ar_members(path)
    for name in DATA_TARS:
        if name in members:
            return (name, *members[name])
    raise ArchiveError(f"{path}: no data.tar member (found {', '.join(members) or 'nothing'}); not a .deb file")


def deb_files(path: str | Path, wanted: set[str]) -> dict[str, bytes]:
    """The contents of the files ``wanted`` (paths as installed, without a leading ``/``) of a .deb, read in
    one pass over its data archive."""
    path = Path(path)
    name, offset, size = _data_tar(path)
    found: dict[str, bytes] = {}
    with open(path, "rb") as f:
        try:
            with tarfile.open(fileobj=_Window(f, offset, size), mode=DATA_TARS[name]) as tar:
                for info in tar:
                    member = info.name.removeprefix("./").lstrip("/")
                    if member not in wanted:
                        continue
                    if not info.isfile():  # a link would need a second pass; name its target instead
                        raise ArchiveError(f"{path.name}: {member} is not a regular file (a link?)")
                    found[member] = tar.extractfile(info).read()
                    if len(found) == len(wanted):
                        break
        except tarfile.CompressionError as error:
            raise ArchiveError(f"{path.name}: this Python cannot decompress {name} ({error}); zstd needs "
                               "Python 3.14 or later") from None
        except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
            raise ArchiveError(f"{path.name}: {name} could not be read ({error}); the file may be corrupt") from None
    missing = sorted(wanted - found.keys())
    if missing:
        raise ArchiveError(f"{path.name}: no such file(s) in the package: {', '.join(missing)}")
    return found


# ---------------------------------------------------------------------------------------------------------
# Qt resource bundles (.rcc)


def _rcc_name(data: bytes, names: int, offset: int) -> str:
    """The name stored at ``offset`` of the names table: u16 length, u32 hash, UTF-16BE characters."""
    start = names + offset
    (length,) = struct.unpack_from(">H", data, start)
    return data[start + 6:start + 6 + 2 * length].decode("utf-16-be")


def rcc_files(data: bytes) -> dict[str, bytes]:
    """Every file of a Qt resource bundle as ``"/dir/name" -> contents`` (decompressed)."""
    if data[:4] != RCC_MAGIC or len(data) < 20:
        raise ArchiveError("not a Qt resource bundle (an .rcc file starts with 'qres')")
    version, tree, blobs, names = struct.unpack_from(">4I", data, 4)
    if not 1 <= version <= 3:
        raise ArchiveError(f"Qt resource bundle format version {version} is not supported (1 to 3 are)")
    node = 14 if version == 1 else 22  # version 2 added an 8-byte modification time to every node
    files: dict[str, bytes] = {}
    pending = [(0, "")]  # (node index, path of its parent); node 0 is the unnamed root directory
    try:
        while pending:
            index, parent = pending.pop()
            name_offset, flags = struct.unpack_from(">IH", data, tree + index * node)
            path = f"{parent}/{_rcc_name(data, names, name_offset)}" if index else ""
            if flags & RCC_DIRECTORY:
                count, first = struct.unpack_from(">II", data, tree + index * node + 6)
                pending.extend((first + k, path) for k in range(count))
                continue
            (blob,) = struct.unpack_from(">I", data, tree + index * node + 10)
            (size,) = struct.unpack_from(">I", data, blobs + blob)
            content = data[blobs + blob + 4:blobs + blob + 4 + size]
            if len(content) != size:
                raise ArchiveError(f"{path}: truncated contents")
            files[path] = _rcc_content(path, content, flags)
    except (struct.error, UnicodeDecodeError) as error:
        raise ArchiveError(f"corrupt Qt resource bundle ({error})") from None
    return files


def _rcc_content(path: str, content: bytes, flags: int) -> bytes:
    """A resource's bytes: stored as is, or as Qt's qCompress (u32 length, then a zlib stream)."""
    if flags & RCC_ZSTD:
        raise ArchiveError(f"{path} is zstd-compressed, which the standard library cannot read")
    if flags & RCC_COMPRESSED:
        (length,) = struct.unpack_from(">I", content)
        out = zlib.decompress(content[4:])
        if len(out) != length:
            raise ArchiveError(f"{path}: decompressed to {len(out)} bytes, expected {length}")
        return out
    return content


def read_member(archive: str | Path, member: str) -> bytes:
    """The bytes of one member of a .tar.gz or a wheel/zip, read in memory (nothing extracted to disk)."""
    archive = Path(archive)
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    with tarfile.open(archive, "r:*") as t:
        info = t.getmember(member)
        f = t.extractfile(info) if info.isfile() else None
        if f is None:
            raise KeyError(f"{member} in {archive} is not a regular file")
        return f.read()
