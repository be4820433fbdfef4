"""CRI's mounts, made to work inside the VM: copy what is small, refuse the rest.

CRI hands each container an OCI spec whose bind mounts name host paths that do
not exist in the guest. Every mount in the spec is classified:

- Kernel and guest filesystems (proc, sysfs, devpts, mqueue, tmpfs, cgroup,
  cgroup2) are kept as they are.
- A bind mount on /dev/shm (CRI binds the sandbox's shm directory there) is
  pointed at the guest's own /dev/shm: a tmpfs shared by every container in the
  VM, which is the pod, as the sandbox's shm is shared on the host.
- A bind mount of one of containerd's per-pod files that the pod network put
  in the guest (its resolv.conf and hosts, see shim/network.py) is pointed at
  that one guest file, shared by the pod's containers as on the host.
- A bind mount of a regular host file (/etc/hosts, /etc/resolv.conf,
  /etc/hostname, /dev/termination-log) is copied into the guest with the agent's
  CopyFile, at `<guest_root>/<container id>/<n>` (n = the mount's index in the
  spec), and the mount's source is rewritten to that path; type and options
  (ro/rw, propagation) stay.
- A bind mount of a small host directory (ConfigMap/Secret style) is copied the
  same way, tree and all: directories, regular files and symlinks that stay
  inside it, with their modes and owners.
- Anything else (a device, socket or FIFO, a big directory, another filesystem
  type) is an InvalidArgument naming the mount's destination, its source and
  why, never a silent drop.

The guest root is `/run/cloudhv/mounts`, not the container's bundle directory
(`/run/cloudhv/containers/<id>`): the agent's CreateContainer empties the bundle
directory first, so copies made before it would vanish.

A copy is a snapshot. What the container writes stays in the VM (a read-write
directory is noted in `MountPlan.notes` so the caller can log it), and what
changes on the host later reaches the guest only through `changed_copies()`.

The I/O is `scan_mounts()` (stat and walk the host) and `read_copy()` (read a
file to send); `plan_mounts()` and `changed_copies()` decide from data only.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import os
import posixpath
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shim.errors import Internal, InvalidArgument

GUEST_ROOT = "/run/cloudhv/mounts"
KERNEL_FILESYSTEMS = frozenset({"proc", "sysfs", "devpts", "mqueue", "tmpfs", "cgroup", "cgroup2"})
SHM = "/dev/shm"
# Files CRI writes once per pod; the container writing to its copy changes nothing anyone reads.
CRI_POD_FILES = frozenset({"/etc/hosts", "/etc/resolv.conf", "/etc/hostname"})

MAX_FILE_BYTES = 1 << 20  # CopyFileRequest.data holds at most 1 MiB (proto/agent.options)
MAX_DIR_FILES = 64
MAX_DIR_ENTRIES = 256  # files, directories and symlinks: each is one CopyFile call
MAX_DIR_BYTES = 4 << 20
MAX_GUEST_PATH = 255  # CopyFileRequest.path is 256 bytes with the NUL
SCAN_LIMIT = 4096  # a walk stops here, so a huge host tree costs little to refuse


class Kind(enum.Enum):
    FILE = "regular file"
    DIR = "directory"
    SYMLINK = "symlink"
    SOCKET = "socket"
    FIFO = "FIFO"
    BLOCK = "block device"
    CHAR = "character device"
    MISSING = "missing path"
    UNREADABLE = "unreadable path"


@dataclass(frozen=True)
class HostEntry:
    """One path under a mount source, as lstat saw it (the source itself: stat)."""

    rel: str  # "" for the source itself, else relative to it ("a/b")
    kind: Kind
    mode: int = 0  # permission bits
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    target: str = ""  # a symlink's target
    error: str = ""  # why it is MISSING or UNREADABLE
    dev: int = 0  # identity at scan time: a read must find the same inode
    ino: int = 0


@dataclass(frozen=True)
class HostTree:
    """What scan_mounts found at one bind-mount source."""

    source: str
    entries: tuple[HostEntry, ...]  # the source first
    truncated: bool = False  # the walk stopped at the scan limit


@dataclass(frozen=True)
class FileCopy:
    """One CopyFile call: a directory, a regular file (data read from host_path) or a symlink.

    A file's bytes are read from `root` (the bind mount's source, followed as a bind
    mount follows it) then `rel` component by component, never through a symlink,
    and only if the inode is the one scanned (`dev`, `ino`).
    """

    host_path: str
    guest_path: str
    mode: int
    uid: int
    gid: int
    is_dir: bool = False
    symlink_target: str | None = None
    size: int = 0
    mtime_ns: int = 0  # host mtime when scanned: a changed one means copy again
    root: str = ""
    rel: str = ""  # "" for the source itself
    root_dev: int = 0
    root_ino: int = 0
    dev: int = 0
    ino: int = 0


@dataclass(frozen=True)
class MountPlan:
    copies: tuple[FileCopy, ...]  # in order: every directory before what it holds
    mounts: tuple[Mapping[str, Any], ...]  # the spec's mounts, sources rewritten
    notes: tuple[str, ...] = ()  # for the log: mounts whose semantics the copy changes


# -- Deciding ------------------------------------------------------------------------------


def is_bind(mount: Mapping[str, Any]) -> bool:
    """As runc and the agent decide: type "bind", or a bind/rbind option."""
    options = mount.get("options") or []
    return mount.get("type") == "bind" or "bind" in options or "rbind" in options


def needs_host(mount: Mapping[str, Any]) -> bool:
    """Whether planning this mount needs its source scanned on the host."""
    return is_bind(mount) and mount.get("destination") != SHM


def plan_mounts(
    container_id: str,
    spec_mounts: Sequence[Mapping[str, Any]],
    hosts: Mapping[str, HostTree],
    *,
    pod_files: Mapping[str, str] | None = None,
    max_file_bytes: int = MAX_FILE_BYTES,
    max_dir_files: int = MAX_DIR_FILES,
    max_dir_entries: int = MAX_DIR_ENTRIES,
    max_dir_bytes: int = MAX_DIR_BYTES,
    guest_root: str = GUEST_ROOT,
) -> MountPlan:
    """Classify every mount of a container's spec; `hosts` is scan_mounts() of the same mounts.

    Raises InvalidArgument for the first mount that cannot be honoured.
    """
    copies: list[FileCopy] = []
    mounts: list[Mapping[str, Any]] = []
    notes: list[str] = []
    for index, mount in enumerate(spec_mounts):
        destination = mount.get("destination")
        if not isinstance(destination, str) or not destination:
            raise InvalidArgument(f"mount #{index} of container {container_id}: no destination")
        source = str(mount.get("source", ""))
        where = f"mount {destination} (source {source})"
        if not is_bind(mount):
            kind = str(mount.get("type", ""))
            if kind not in KERNEL_FILESYSTEMS:
                supported = ", ".join(sorted(KERNEL_FILESYSTEMS))
                raise InvalidArgument(
                    f"{where}: filesystem type {kind!r} cannot be mounted in the VM; "
                    f"only bind mounts of files and small directories, and {supported}, are"
                )
            mounts.append(mount)
            continue
        if destination == SHM:
            mounts.append({**mount, "source": SHM})
            continue
        if pod_files and source in pod_files:
            mounts.append({**mount, "source": pod_files[source]})
            continue
        if not posixpath.isabs(source):
            raise InvalidArgument(f"{where}: a bind mount's source must be an absolute host path")
        tree = hosts.get(source)
        if tree is None or not tree.entries:
            raise Internal(f"{where}: the source was not scanned")
        guest_path = f"{guest_root}/{container_id}/{index}"
        top = tree.entries[0]
        read_only = "ro" in (mount.get("options") or [])
        if top.kind is Kind.FILE:
            _check_file(where, "file", top, max_file_bytes)
            copies.append(_copy(tree, guest_path, top))
            if not read_only and destination not in CRI_POD_FILES:
                notes.append(
                    f"{where}: read-write file copied into the VM; what the container "
                    "writes there stays in the VM (a termination message does not reach the host)"
                )
        elif top.kind is Kind.DIR:
            copies.extend(
                _plan_dir(
                    where,
                    tree,
                    guest_path,
                    max_file_bytes=max_file_bytes,
                    max_dir_files=max_dir_files,
                    max_dir_entries=max_dir_entries,
                    max_dir_bytes=max_dir_bytes,
                )
            )
            if not read_only:
                notes.append(
                    f"{where}: read-write directory copied into the VM; what the container "
                    "writes there stays in the VM, unseen by the host and other containers"
                )
        elif top.kind in (Kind.MISSING, Kind.UNREADABLE):
            raise InvalidArgument(f"{where}: {top.error or top.kind.value} on the host")
        else:
            raise InvalidArgument(
                f"{where}: a {top.kind.value} cannot be copied into the VM; "
                "only regular files and small directories are"
            )
        mounts.append({**mount, "source": guest_path})
    return MountPlan(copies=tuple(copies), mounts=tuple(mounts), notes=tuple(notes))


def changed_copies(previous: MountPlan, current: MountPlan) -> list[FileCopy]:
    """The copies of `current` to make again: new, or changed on the host since `previous`.

    Both plans come from the same spec mounts, scanned at two times (so guest
    paths match). The shim calls this on Task.Update of the container (CRI's
    UpdateContainerResources), after scan_mounts() + plan_mounts() again, and
    sends the result in order. That refreshes ConfigMap/Secret-style
    directories: kubelet's atomic writer adds a new timestamped directory and
    swaps the `..data` symlink, which arrive here as new entries and a changed
    symlink, the symlink last. A single-file mount is refreshed in place: the
    agent's CopyFile rewrites an existing regular file without changing its inode,
    so the container's bind mount of it sees the new content.
    """
    before = {copy.guest_path: copy for copy in previous.copies}
    changed = []
    for copy in current.copies:
        old = before.get(copy.guest_path)
        if old is None or _differs(old, copy):
            changed.append(copy)
    return changed


def stale_guest_paths(previous: MountPlan, current: MountPlan) -> list[str]:
    """Guest paths copied for `previous` that `current` no longer has, deepest first."""
    kept = {copy.guest_path for copy in current.copies}
    gone = [copy.guest_path for copy in previous.copies if copy.guest_path not in kept]
    return sorted(gone, key=lambda path: (-path.count("/"), path))


def _differs(old: FileCopy, new: FileCopy) -> bool:
    if new.is_dir:  # a directory's mtime moves with its entries, which are compared themselves
        return (old.is_dir, old.mode, old.uid, old.gid) != (True, new.mode, new.uid, new.gid)
    return old != new


def _copy(tree: HostTree, guest_path: str, entry: HostEntry) -> FileCopy:
    top = tree.entries[0]
    return FileCopy(
        host_path=posixpath.join(tree.source, entry.rel) if entry.rel else tree.source,
        guest_path=guest_path,
        root=tree.source,
        rel=entry.rel,
        root_dev=top.dev,
        root_ino=top.ino,
        dev=entry.dev,
        ino=entry.ino,
        mode=entry.mode,
        uid=entry.uid,
        gid=entry.gid,
        is_dir=entry.kind is Kind.DIR,
        symlink_target=entry.target if entry.kind is Kind.SYMLINK else None,
        size=entry.size if entry.kind is Kind.FILE else 0,
        mtime_ns=entry.mtime_ns,
    )


def _check_file(where: str, what: str, entry: HostEntry, max_file_bytes: int) -> None:
    if entry.size > max_file_bytes:
        raise InvalidArgument(
            f"{where}: {what} is {entry.size} bytes; "
            f"only files up to {max_file_bytes} bytes are copied into the VM"
        )


def _plan_dir(
    where: str,
    tree: HostTree,
    guest_base: str,
    *,
    max_file_bytes: int,
    max_dir_files: int,
    max_dir_entries: int,
    max_dir_bytes: int,
) -> list[FileCopy]:
    below = tree.entries[1:]
    if tree.truncated:
        raise InvalidArgument(
            f"{where}: directory has more than {len(below)} entries; "
            f"only directories up to {max_dir_files} files are copied into the VM"
        )
    files = [entry for entry in below if entry.kind is Kind.FILE]
    if len(files) > max_dir_files:
        raise InvalidArgument(
            f"{where}: directory has {len(files)} files; "
            f"only directories up to {max_dir_files} files are copied into the VM"
        )
    if len(below) > max_dir_entries:
        raise InvalidArgument(
            f"{where}: directory has {len(below)} entries (files, directories, symlinks); "
            f"only directories up to {max_dir_entries} entries are copied into the VM"
        )
    total = sum(entry.size for entry in files)
    if total > max_dir_bytes:
        raise InvalidArgument(
            f"{where}: directory holds {total} bytes; "
            f"only directories up to {max_dir_bytes} bytes are copied into the VM"
        )
    copies = [_copy(tree, guest_base, tree.entries[0])]
    # Sorting by path components puts every directory before what it holds.
    for entry in sorted(below, key=lambda e: e.rel.split("/")):
        name = _printable(entry.rel)
        try:
            entry.rel.encode()
        except UnicodeEncodeError:
            raise InvalidArgument(f"{where}: {name} is not a UTF-8 name") from None
        if entry.kind in (Kind.MISSING, Kind.UNREADABLE):
            raise InvalidArgument(f"{where}: {name}: {entry.error or entry.kind.value}")
        if entry.kind not in (Kind.FILE, Kind.DIR, Kind.SYMLINK):
            raise InvalidArgument(
                f"{where}: {name} is a {entry.kind.value}; "
                "only regular files, directories and symlinks are copied into the VM"
            )
        if entry.kind is Kind.FILE:
            _check_file(where, name, entry, max_file_bytes)
        if entry.kind is Kind.SYMLINK and not _inside(entry.rel, entry.target):
            raise InvalidArgument(
                f"{where}: {name} is a symlink to {entry.target}, outside the directory; "
                "it would dangle in the VM"
            )
        guest_path = f"{guest_base}/{entry.rel}"
        if len(guest_path.encode()) > MAX_GUEST_PATH:
            raise InvalidArgument(
                f"{where}: {name}: its path in the VM ({guest_path}) is longer than "
                f"{MAX_GUEST_PATH} bytes"
            )
        copies.append(_copy(tree, guest_path, entry))
    return copies


def _inside(rel: str, target: str) -> bool:
    """Whether a symlink at `rel` pointing to `target` resolves inside the copied tree."""
    if not target or posixpath.isabs(target):
        return False
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
    return resolved != ".." and not resolved.startswith("../")


def _printable(rel: str) -> str:
    return rel.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")


# -- Reading the host -----------------------------------------------------------------------


def scan_mounts(
    spec_mounts: Sequence[Mapping[str, Any]],
    *,
    limit: int = SCAN_LIMIT,
    skip: frozenset[str] = frozenset(),
) -> dict[str, HostTree]:
    """Stat (and for directories walk, up to `limit` entries) every bind source that needs
    it; sources in `skip` (the pod's files, already in the guest) are not read."""
    trees: dict[str, HostTree] = {}
    for mount in spec_mounts:
        source = mount.get("source")
        if (
            needs_host(mount)
            and isinstance(source, str)
            and posixpath.isabs(source)
            and source not in trees
            and source not in skip
        ):
            trees[source] = scan_source(source, limit=limit)
    return trees


def scan_source(source: str, *, limit: int = SCAN_LIMIT) -> HostTree:
    """The source as a bind mount sees it (symlinks followed), then what it holds (lstat)."""
    try:
        top = _entry("", os.stat(source))
    except OSError as err:
        kind = Kind.MISSING if err.errno in (errno.ENOENT, errno.ENOTDIR) else Kind.UNREADABLE
        return HostTree(source, (HostEntry("", kind, error=_strerror(err)),))
    entries = [top]
    if top.kind is not Kind.DIR:
        return HostTree(source, tuple(entries))
    pending = [""]
    while pending:
        rel_dir = pending.pop()
        try:
            with os.scandir(posixpath.join(source, rel_dir)) as listing:
                names = sorted(item.name for item in listing)
        except OSError as err:
            entries.append(HostEntry(rel_dir or ".", Kind.UNREADABLE, error=_strerror(err)))
            continue
        subdirs = []
        for name in names:
            rel = posixpath.join(rel_dir, name) if rel_dir else name
            path = posixpath.join(source, rel)
            try:
                info = os.lstat(path)
                entry = _entry(rel, info)
                if entry.kind is Kind.SYMLINK:
                    entry = dataclasses.replace(entry, target=os.readlink(path))
            except OSError as err:
                entry = HostEntry(rel, Kind.UNREADABLE, error=_strerror(err))
            entries.append(entry)
            if len(entries) > limit:
                return HostTree(source, tuple(entries), truncated=True)
            if entry.kind is Kind.DIR:
                subdirs.append(rel)
        pending.extend(reversed(subdirs))
    return HostTree(source, tuple(entries))


def read_copy(copy: FileCopy, *, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes to send for a regular-file copy, read now (the file may have changed).

    The path is walked from the mount source down, one component at a time with
    O_NOFOLLOW, and each step must be the inode the scan saw: a file swapped for a
    symlink (to a root-only host file, say) between scan and read is refused, not
    followed. Also refused, as InvalidArgument: a path that is no longer a regular
    file (opening a FIFO would block) or has grown past `max_bytes`.
    """
    what = f"copy {copy.host_path} into the VM"
    fd = -1
    try:
        # The source itself is followed, as the bind mount follows it.
        fd = os.open(copy.root, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        _same(fd, copy.root_dev, copy.root_ino, what)
        parts = [p for p in copy.rel.split("/") if p]
        for index, name in enumerate(parts):
            last = index == len(parts) - 1
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            if not last:
                flags |= os.O_DIRECTORY
            child = os.open(name, flags, dir_fd=fd)
            os.close(fd)
            fd = child
        _same(fd, copy.dev, copy.ino, what)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidArgument(f"{what}: no longer a regular file")
        with os.fdopen(fd, "rb") as file:
            fd = -1
            data = file.read(max_bytes + 1)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            why = "a symlink now stands on its path (not followed)"
            raise InvalidArgument(f"{what}: {why}") from err
        raise InvalidArgument(f"{what}: {_strerror(err)}") from err
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > max_bytes:
        raise InvalidArgument(
            f"{what}: grew past {max_bytes} bytes, the largest file copied into the VM"
        )
    return data


def _same(fd: int, dev: int, ino: int, what: str) -> None:
    info = os.fstat(fd)
    if (info.st_dev, info.st_ino) != (dev, ino):
        raise InvalidArgument(f"{what}: replaced since the scan (another inode)")


_KINDS = {
    stat.S_IFREG: Kind.FILE,
    stat.S_IFDIR: Kind.DIR,
    stat.S_IFLNK: Kind.SYMLINK,
    stat.S_IFSOCK: Kind.SOCKET,
    stat.S_IFIFO: Kind.FIFO,
    stat.S_IFBLK: Kind.BLOCK,
    stat.S_IFCHR: Kind.CHAR,
}


def _entry(rel: str, info: os.stat_result) -> HostEntry:
    return HostEntry(
        rel=rel,
        kind=_KINDS.get(stat.S_IFMT(info.st_mode), Kind.UNREADABLE),
        mode=stat.S_IMODE(info.st_mode),
        uid=info.st_uid,
        gid=info.st_gid,
        size=info.st_size,
        mtime_ns=info.st_mtime_ns,
        dev=info.st_dev,
        ino=info.st_ino,
    )


def _strerror(err: OSError) -> str:
    return err.strerror or str(err)
