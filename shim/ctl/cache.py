"""`cloudhvctl cache ls / prune`: the host's cache of read-only rootfs images.

The layout under `config.cache_dir` (made by the shim's image cache):

    lock                  flock held around every change to images/ and refs/
    images/<key>.<fmt>    one image; its mtime is its last use
    refs/<key>/<holder>   one file per pod using the image

Pruning removes unreferenced images, least recently used first, under the lock,
until what is left fits `keep_bytes`: an image a pod uses is never removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CacheEntry:
    key: str
    path: Path
    size: int  # allocated bytes
    last_used: float  # Unix time
    refs: int


def entries(root: Path) -> list[CacheEntry]:
    found = []
    with contextlib.suppress(FileNotFoundError):
        for item in sorted((root / "images").iterdir()):
            key = item.name.partition(".")[0]
            try:
                st = item.stat()
            except FileNotFoundError:
                continue
            found.append(CacheEntry(key, item, st.st_blocks * 512, st.st_mtime, _refs(root, key)))
    return found


def _refs(root: Path, key: str) -> int:
    try:
        return len(os.listdir(root / "refs" / key))
    except (FileNotFoundError, NotADirectoryError):
        return 0


def prune(root: Path, keep_bytes: int = 0) -> list[CacheEntry]:
    """Remove unreferenced entries, oldest use first, until the rest fit `keep_bytes`."""
    removed: list[CacheEntry] = []
    if not (root / "images").is_dir():
        return removed
    with _locked(root):
        current = entries(root)
        total = sum(e.size for e in current)
        for entry in sorted((e for e in current if e.refs == 0),
                            key=lambda e: (e.last_used, e.key)):
            if total <= keep_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                entry.path.unlink()
                removed.append(entry)
                total -= entry.size
    return removed


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
