"""Builds OCI image-layout tarballs locally (no registry here) for `ctr images import`."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any


def _blob(blobs: dict[str, bytes], data: bytes) -> dict[str, Any]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"digest": digest, "size": len(data)}


class Layer:
    """A layer tar written entry by entry: what `docker build` would produce, including
    what a directory on disk cannot say (owners, whiteouts, opaque dirs, xattrs as PAX
    `SCHILY.xattr.*` records, which containerd applies)."""

    def __init__(self) -> None:
        self._buffer = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._buffer, mode="w", format=tarfile.PAX_FORMAT)

    def tree(self, tree: Path) -> Layer:
        for path in sorted(tree.rglob("*")):
            info = self._tar.gettarinfo(str(path), arcname=str(path.relative_to(tree)))
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = 0
            if info.isfile():
                with open(path, "rb") as handle:
                    self._tar.addfile(info, handle)
            else:
                self._tar.addfile(info)
        return self

    def _add(
        self, name: str, kind: bytes, *, data: bytes = b"", mode: int = 0o644, uid: int = 0,
        gid: int = 0, link: str = "", xattrs: dict[str, bytes] | None = None,
    ) -> Layer:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.uid, info.gid = kind, mode, uid, gid
        info.mtime, info.linkname, info.size = 0, link, len(data)
        # Binary values travel as surrogate escapes (tarfile marks them hdrcharset=BINARY).
        info.pax_headers = {
            f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
            for k, v in (xattrs or {}).items()
        }
        self._tar.addfile(info, io.BytesIO(data) if data else None)
        return self

    def file(self, name: str, data: bytes, **attrs: Any) -> Layer:
        return self._add(name, tarfile.REGTYPE, data=data, **attrs)

    def dir(self, name: str, **attrs: Any) -> Layer:
        attrs.setdefault("mode", 0o755)
        return self._add(name, tarfile.DIRTYPE, **attrs)

    def symlink(self, name: str, target: str) -> Layer:
        return self._add(name, tarfile.SYMTYPE, link=target, mode=0o777)

    def hardlink(self, name: str, target: str) -> Layer:
        return self._add(name, tarfile.LNKTYPE, link=target)

    def whiteout(self, name: str) -> Layer:
        """Delete `name` of the layers below."""
        parent, _, base = name.rpartition("/")
        return self.file(f"{parent}/.wh.{base}" if parent else f".wh.{base}", b"")

    def opaque(self, directory: str) -> Layer:
        """`directory` replaces the one below instead of merging with it."""
        return self.dir(directory).file(f"{directory}/.wh..wh..opq", b"")

    def tar(self) -> bytes:
        self._tar.close()
        return self._buffer.getvalue()


def build_image(trees: list[Path | Layer], ref: str, cmd: list[str], out: Path) -> Path:
    """Write an OCI image-layout tar with one layer per tree or Layer (bottom first)."""
    blobs: dict[str, bytes] = {}
    layers, diff_ids = [], []
    for tree in trees:
        raw = tree.tar() if isinstance(tree, Layer) else Layer().tree(tree).tar()
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        layer = _blob(blobs, gzip.compress(raw, mtime=0))
        layer["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip"
        layers.append(layer)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config_desc = _blob(blobs, json.dumps(config).encode())
    config_desc["mediaType"] = "application/vnd.oci.image.config.v1+json"
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": layers,
    }
    manifest_desc = _blob(blobs, json.dumps(manifest).encode())
    manifest_desc["mediaType"] = "application/vnd.oci.image.manifest.v1+json"
    manifest_desc["annotations"] = {"io.containerd.image.name": ref}
    index = {"schemaVersion": 2, "manifests": [manifest_desc]}
    with tarfile.open(out, "w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add("index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            add("blobs/sha256/" + digest.split(":", 1)[1], data)
    return out
