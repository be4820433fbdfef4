"""`cloudhvctl cache ls / prune`: the host's cache of read-only rootfs images.

The cache is the shim's own (shim/rootfs/cache.py: layout, lock, references); this
module only views it for the command line. Pruning removes unreferenced images, least
recently used first, under the cache's lock, until what is left fits `keep_bytes`:
an image a pod uses is never removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shim.rootfs.cache import ImageCache


@dataclass(frozen=True)
class CacheEntry:
    key: str
    path: Path
    size: int  # allocated bytes
    last_used: float  # Unix time
    refs: int


def _cache(root: Path, keep_bytes: int = 0) -> ImageCache:
    # The format only chooses what a build writes; listing and eviction cover all.
    return ImageCache(root, max_bytes=keep_bytes, fmt="erofs")


def entries(root: Path) -> list[CacheEntry]:
    return [
        CacheEntry(e.key, e.path, e.size, e.last_used_ns / 1e9, e.refs)
        for e in _cache(root).entries()
    ]


def prune(root: Path, keep_bytes: int = 0) -> list[CacheEntry]:
    """Remove unreferenced entries, oldest use first, until the rest fit `keep_bytes`."""
    if not (root / "images").is_dir():
        return []
    before = entries(root)
    _cache(root, keep_bytes).evict()
    still = {e.key for e in entries(root)}
    return [e for e in before if e.key not in still]
