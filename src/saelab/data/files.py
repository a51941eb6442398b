"""The data sets' files, without torch: find them, read them, check them by content (IDX headers,
md5 against the published checksums), and decompress the offline mirror into the cache.

Files are checked as they enter the cache and, through a stamp beside each (its md5, size and
modification time), whenever they are used: a stat instead of hashing 47 MB.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from pathlib import Path

from saelab.config.catalogue import KNOWN_MD5, MD5, title
from saelab.errors import ConfigError

log = logging.getLogger(__name__)

# IDX magic numbers: unsigned bytes in three dimensions (images), in one (labels).
IMAGES_MAGIC, LABELS_MAGIC = 0x803, 0x801
# (file stem, IDX magic, item shape, item count) for the four files of each dataset.
IDX_FILES = [
    ("train-images-idx3-ubyte", IMAGES_MAGIC, (28, 28), 60000),
    ("train-labels-idx1-ubyte", LABELS_MAGIC, (), 60000),
    ("t10k-images-idx3-ubyte", IMAGES_MAGIC, (28, 28), 10000),
    ("t10k-labels-idx1-ubyte", LABELS_MAGIC, (), 10000),
]
def read_idx(path: Path, key: str = "data.mirror") -> bytes:
    """Return the bytes of an IDX file (plain or .gz), raising ConfigError (naming `key`, the
    setting that pointed there) if it is unreadable."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ConfigError(key, str(path), f"unreadable or corrupt gzip ({exc})") from exc
    return raw


def check_idx(raw: bytes, path: Path, magic: int, shape: tuple, count: int | None,
              key: str = "data.mirror") -> None:
    """Check an IDX header (magic, dimensions; `count` None: any number of items) and that the
    payload has exactly that length."""
    ndim = 1 + len(shape)
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise ConfigError(key, str(path), f"not an IDX file with magic {magic:#06x}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    count = dims[0] if count is None else count
    if dims != (count, *shape):
        raise ConfigError(key, str(path), f"IDX dimensions {dims}, expected {(count, *shape)}")
    expected = header + count * (shape[0] * shape[1] if shape else 1)
    if len(raw) != expected:
        raise ConfigError(key, str(path),
                          f"truncated or padded: {len(raw)} bytes, expected {expected}")


def md5_of(data: bytes) -> str:
    """Hex md5 of `data`: a content check, not security (so FIPS-mode Pythons allow it)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def check_md5(md5: str, name: str, stem: str, key: str, path: Path) -> None:
    """Raise ConfigError unless `md5` is that of data set `name`'s file `stem`, saying which known
    file the content is instead, if any."""
    if md5 == MD5[name][stem]:
        return
    other = f"; it is {title(*KNOWN_MD5[md5])}" if md5 in KNOWN_MD5 else ""
    raise ConfigError(key, str(path), f"content is not {title(name, stem)} (md5 {md5}{other})")


def _stamp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.md5")


def _write_stamp(path: Path, md5: str) -> None:
    """Record `md5` with the size and mtime of `path`, so that later uses need only a stat."""
    st = path.stat()
    stamp = json.dumps({"md5": md5, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    tmp = path.with_name(f"{path.name}.md5.tmp{os.getpid()}")
    try:
        tmp.write_text(stamp)
        tmp.replace(_stamp_path(path))
    except OSError as exc:  # a read-only cache still works, hashing its files on every use
        log.debug("cannot stamp %s: %s", path, exc)


def _check_cached(path: Path, name: str, stem: str) -> str:
    """The md5 of a cached file, checked: the stamp's while the file keeps the stamped size and
    mtime (a stat instead of hashing 47 MB), else recomputed and the stamp rewritten."""
    st = path.stat()
    try:
        stamp = json.loads(_stamp_path(path).read_text())
    except (OSError, ValueError):
        stamp = None
    expected = MD5[name][stem]
    # The stamp only spares the hashing: one that does not vouch for the expected content, or is
    # stale, is no verdict, and the file is hashed.
    if stamp == {"md5": expected, "size": st.st_size, "mtime_ns": st.st_mtime_ns}:
        return expected
    md5 = md5_of(path.read_bytes())
    check_md5(md5, name, stem, "data.root", path)
    _write_stamp(path, md5)
    return md5


def check_cache(name: str, raw_dir: Path) -> dict[str, str] | None:
    """{file stem: md5} of the four cached files, None if one is missing; ConfigError (data.root)
    naming a cached file with the wrong content."""
    if not all((raw_dir / stem).is_file() for stem, *_ in IDX_FILES):
        return None
    return {stem: _check_cached(raw_dir / stem, name, stem) for stem, *_ in IDX_FILES}


def clear_cache(raw_dir: Path) -> None:
    for stem, *_ in IDX_FILES:
        (raw_dir / stem).unlink(missing_ok=True)
        _stamp_path(raw_dir / stem).unlink(missing_ok=True)


def from_mirror(name: str, mirror: Path, folder: str, raw_dir: Path) -> dict[str, str]:
    """Check the mirror's four files (.gz or plain) and decompress them into the cache; return
    {file stem: md5}. A file is written only once checked, so a bad one never enters the cache."""
    src_dir = mirror / folder / "raw"
    if not mirror.is_dir():
        raise ConfigError("data.mirror", str(mirror), "directory does not exist")
    raw_dir.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for stem, magic, shape, count in IDX_FILES:
        candidates = [src_dir / f"{stem}.gz", src_dir / stem]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise ConfigError("data.mirror", str(mirror), f"missing {folder}/raw/{stem}[.gz]")
        raw = read_idx(path)
        check_idx(raw, path, magic, shape, count)
        checksums[stem] = md5_of(raw)
        check_md5(checksums[stem], name, stem, "data.mirror", path)
        tmp = raw_dir / f"{stem}.tmp{os.getpid()}"
        tmp.write_bytes(raw)
        tmp.replace(raw_dir / stem)
        _write_stamp(raw_dir / stem, checksums[stem])
    return checksums
