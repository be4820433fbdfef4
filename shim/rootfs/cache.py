"""The host's shared cache of read-only rootfs images, keyed by the layers they are made of.

Layout under `cache_dir` (all on one filesystem, so that renames are atomic):

    lock                       held (flock) around every change to images/ and refs/
    journal                    one JSON line per build and per eviction
    images/<key>.<format>      complete images; mtime = last use (LRU)
    building/<key>.<holder>    an image being written (never looks complete)
    locks/<key>                held (flock) by the one process building <key>
    refs/<key>/<holder>        one per pod using the image: {"state": ..., "record": ...}

**Key.** `cache_key` hashes, top layer first, each layer directory's path, device,
inode number, ctime and mtime (nanoseconds), with the image format and a build
version. A layer directory is a committed containerd snapshot (`.../snapshots/<id>/fs`):
containerd never writes to it again, and its snapshot id comes from a bolt
sequence that is never handed out twice by one metadata store. Two images that
differ in any byte differ in some layer, so in some snapshot, so in some path.
A path that comes back with other content (containerd's root wiped and
recreated, ids starting over) is a new directory: a new inode, and a ctime of its
creation that no earlier directory had (ctime cannot be set from user space).
Nothing is read but one stat per layer, so a hit costs microseconds. Out of
contract and not detected: a host administrator editing files deep inside a
committed snapshot.

**Concurrency.** A miss takes the key's build lock, looks again (another process
may just have finished), builds into building/, fsyncs, and renames into images/
under the cache lock, where it also takes its reference: an entry is never seen
half-written and never evicted between its rename and its first reference.
**References** are files, one per pod, written under the cache lock after the
pod's state recorded them; `release` removes one, and so does crash cleanup
from the pod's record. **Eviction** (LRU by mtime, above `max_bytes` of allocated
space) only removes entries without references, under the cache lock.
**Garbage** (references whose pod state no longer names them, builds whose
builder is gone) is collected by `collect_garbage`, which a daemon runs at start.

`python -m shim.rootfs.cache CACHE_DIR` lists the entries (of every format), one JSON line
each: key, size, last use, builds, and the pods referencing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from shim.rootfs.image import FORMATS, Format, RootfsError

log = logging.getLogger(__name__)

BUILD_VERSION = 1  # bump when what a build writes changes: old entries then never match
LOCK_POLL_S = 0.02
T = TypeVar("T")


@dataclass(frozen=True)
class Layer:
    """What identifies one layer directory (see the module docstring)."""

    path: str
    dev: int
    ino: int
    ctime_ns: int
    mtime_ns: int


def layer_identity(path: str) -> Layer:
    try:
        st = os.stat(path)
    except OSError as err:
        raise RootfsError(f"layer {path}: {err.strerror or err}") from err
    return Layer(path, st.st_dev, st.st_ino, st.st_ctime_ns, st.st_mtime_ns)


def cache_key(layers: Sequence[Layer], fmt: Format) -> str:
    """The cache key of the image merged from `layers` (top first), in format `fmt`."""
    digest = hashlib.sha256(f"cloudhv-rootfs v{BUILD_VERSION} {fmt}\n".encode())
    for layer in layers:
        digest.update(
            f"{layer.path}\0{layer.dev}\0{layer.ino}\0{layer.ctime_ns}\0{layer.mtime_ns}\n".encode()
        )
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class Entry:
    key: str
    path: Path
    size: int  # allocated bytes
    last_used_ns: int
    refs: int
    format: str = ""


def choose_evictions(entries: Sequence[Entry], max_bytes: int) -> list[Entry]:
    """Which entries go so that the rest fit in `max_bytes`: unreferenced ones only,
    least recently used first. May leave the total above the cap when the rest is in use."""
    total = sum(e.size for e in entries)
    chosen: list[Entry] = []
    for entry in sorted(
        (e for e in entries if e.refs == 0), key=lambda e: (e.last_used_ns, e.key)
    ):
        if total <= max_bytes:
            break
        chosen.append(entry)
        total -= entry.size
    return chosen


@dataclass(frozen=True)
class Holder:
    """Who holds a reference: a pod (by its state file) and the record naming the ref."""

    name: str  # unique per pod: the pod's state dir name
    state_file: Path
    record_id: str


class ImageCache:
    def __init__(self, root: Path, *, max_bytes: int, fmt: Format) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.format = fmt

    # -- paths ---------------------------------------------------------------------------

    def image_path(self, key: str) -> Path:
        return self.root / "images" / f"{key}.{self.format}"

    def ref_path(self, key: str, holder: str) -> Path:
        return self.root / "refs" / key / holder

    def building_path(self, key: str, holder: str) -> Path:
        return self.root / "building" / f"{key}.{holder}"

    # -- acquire and release ---------------------------------------------------------------

    async def acquire(
        self, key: str, holder: Holder, build: Callable[[Path], Awaitable[object]]
    ) -> tuple[Path, bool]:
        """The image of `key`, referenced by `holder`; built with `build(tmp)` (which
        writes and fsyncs the image at tmp) if missing. Returns (path, built here)."""
        hit = await _uninterrupted(self._take_ref, key, holder)
        if hit is not None:
            return hit, False
        async with self._build_lock(key):
            hit = await _uninterrupted(self._take_ref, key, holder)
            if hit is not None:
                return hit, False  # someone else built it while we waited
            tmp = self.building_path(key, holder.name)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)
            try:
                started = time.monotonic()
                await build(tmp)
                build_ms = int((time.monotonic() - started) * 1000)
                path = await _uninterrupted(self._publish, key, holder, tmp, build_ms)
            finally:
                tmp.unlink(missing_ok=True)
        try:
            evicted = await asyncio.to_thread(self.evict)
        except OSError as err:  # the image is built and referenced: that is what counts
            log.warning("event=image_evict_failed error=%r", str(err))
            evicted = []
        for line in evicted:
            log.info("event=image_evicted %s", line)
        return path, True

    def _take_ref(self, key: str, holder: Holder) -> Path | None:
        image = self.image_path(key)
        with self._locked():
            if not image.exists():
                return None
            self._write_ref(key, holder)
            os.utime(image)  # last use, for LRU
        return image

    def _publish(self, key: str, holder: Holder, tmp: Path, build_ms: int) -> Path:
        image = self.image_path(key)
        image.parent.mkdir(parents=True, exist_ok=True)
        size = tmp.stat().st_blocks * 512
        with self._locked():
            os.rename(tmp, image)
            _fsync_dir(image.parent)
            self._write_ref(key, holder)
            self._journal(event="built", key=key, by=holder.name, ms=build_ms, bytes=size)
        return image

    def _journal(self, **event: object) -> None:
        """One line per build or eviction (under the cache lock; not fsynced: it is a
        record for people, nothing decides on it)."""
        line = json.dumps({"at": time.time(), **event}) + "\n"
        fd = os.open(self.root / "journal", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def journal(self) -> list[dict[str, object]]:
        try:
            text = (self.root / "journal").read_text()
        except FileNotFoundError:
            return []
        events = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    def listing(self) -> list[dict[str, object]]:
        """The entries, with their builds and the pods referencing them."""
        events = self.journal()
        out = []
        for entry in self.entries():
            builds = [e for e in events if e.get("event") == "built" and e.get("key") == entry.key]
            try:
                holders = sorted(os.listdir(self.root / "refs" / entry.key))
            except FileNotFoundError:
                holders = []
            out.append({
                "key": entry.key,
                "format": entry.format,
                "bytes": entry.size,
                "last_used": entry.last_used_ns / 1e9,
                "builds": len(builds),
                "built_by": [b.get("by") for b in builds],
                "refs": holders,
            })
        return out

    def _write_ref(self, key: str, holder: Holder) -> None:
        ref = self.ref_path(key, holder.name)
        ref.parent.mkdir(parents=True, exist_ok=True)
        # Not fsynced: after a host crash every VM, and so every reference, is gone.
        ref.write_text(json.dumps({"state": str(holder.state_file), "record": holder.record_id}))

    # -- listing, eviction, garbage ------------------------------------------------------

    def entries(self) -> list[Entry]:
        found = []
        images = self.root / "images"
        with contextlib.suppress(FileNotFoundError):
            # Every format counts against the cap: it is the directory's size.
            for item in sorted(images.iterdir()):
                key, dot, fmt = item.name.partition(".")
                if not dot or fmt not in FORMATS:
                    continue
                try:
                    st = item.stat()
                except FileNotFoundError:
                    continue
                found.append(
                    Entry(key, item, st.st_blocks * 512, st.st_mtime_ns, self._refs(key), fmt)
                )
        return found

    def _refs(self, key: str) -> int:
        try:
            return len(os.listdir(self.root / "refs" / key))
        except FileNotFoundError:
            return 0

    def evict(self) -> list[str]:
        """Remove least recently used unreferenced entries above the cap."""
        done = []
        with self._locked():
            for entry in choose_evictions(self.entries(), self.max_bytes):
                with contextlib.suppress(FileNotFoundError):
                    entry.path.unlink()
                    self._journal(event="evicted", key=entry.key, bytes=entry.size)
                    done.append(f"key={entry.key} size_mib={entry.size >> 20}")
        return done

    def collect_garbage(self) -> list[str]:
        """References whose pod no longer records them, and builds nobody is running."""
        done = []
        with self._locked():
            refs = self.root / "refs"
            with contextlib.suppress(FileNotFoundError):
                for key_dir in refs.iterdir():
                    for ref in list(key_dir.iterdir()):
                        if not _ref_alive(ref):
                            ref.unlink(missing_ok=True)
                            done.append(f"released orphan reference {ref}")
                    with contextlib.suppress(OSError):
                        key_dir.rmdir()
        building = self.root / "building"
        with contextlib.suppress(FileNotFoundError):
            for tmp in building.iterdir():
                key = tmp.name.partition(".")[0]
                with self._try_build_lock(key) as free:
                    if free:
                        tmp.unlink(missing_ok=True)
                        done.append(f"removed unfinished build {tmp}")
        done += [f"evicted {line}" for line in self.evict()]
        self._compact_journal()
        return done

    def _compact_journal(self) -> None:
        """Keep the journal's lines about entries still there: it stays small."""
        with self._locked():
            present = {e.key for e in self.entries()}
            kept = [e for e in self.journal() if e.get("key") in present]
            tmp = self.root / "journal.tmp"
            tmp.write_text("".join(json.dumps(e) + "\n" for e in kept))
            os.replace(tmp, self.root / "journal")

    # -- locks ---------------------------------------------------------------------------

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return _locked(self.root)

    @contextlib.contextmanager
    def _try_build_lock(self, key: str) -> Iterator[bool]:
        fd = self._open_build_lock(key)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    @contextlib.asynccontextmanager
    async def _build_lock(self, key: str) -> AsyncIterator[None]:
        """The key's build lock, waited for without blocking the event loop."""
        fd = self._open_build_lock(key)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(LOCK_POLL_S)
            yield
        finally:
            os.close(fd)

    def _open_build_lock(self, key: str) -> int:
        # Lock files are never removed: a waiter on an unlinked file would lock alone.
        path = self.root / "locks" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """The cache lock: held for microseconds, around changes to images/ and refs/."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def release_ref(ref: Path) -> bool:
    """Drop one reference (`<cache>/refs/<key>/<holder>`); idempotent. Returns whether
    it was there. Needs nothing but the path: crash cleanup calls it from a record."""
    if not ref.exists():
        return False
    with _locked(ref.parents[2]):
        try:
            os.unlink(ref)
        except FileNotFoundError:
            return False
        with contextlib.suppress(OSError):
            os.rmdir(ref.parent)  # only if it was the last one
        return True


def _ref_alive(ref: Path) -> bool:
    """Whether the pod state a reference names still records it."""
    try:
        info = json.loads(ref.read_text())
        state = json.loads(Path(info["state"]).read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError):
        return True  # unreadable: its owner's cleanup decides, not us
    for record in state.get("resources") or ():
        if isinstance(record, dict) and record.get("id") == info.get("record"):
            return (record.get("host") or {}).get("ref") == str(ref)
    return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _uninterrupted(fn: Callable[..., T], *args: object) -> T:
    """Run a short blocking call in a thread and see it through even if cancelled: a
    reference taken there must be known to the caller, or it would never be released."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise



def main(argv: Sequence[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m shim.rootfs.cache CACHE_DIR", file=sys.stderr)
        return 2
    cache = ImageCache(Path(argv[0]), max_bytes=0, fmt="erofs")
    for item in cache.listing():
        print(json.dumps(item))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
