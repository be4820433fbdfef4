"""The wire between the binary (shim/entry.py) and the shared parent (shim/forker.py):
the parent's socket, named by the version of the code it runs, and the netstrings a
`start` or `delete` invocation and its answer travel in.

Builtin modules only: the binary imports this before anything else.
"""

from __future__ import annotations

import os
import sys
import zlib

SOCKET_DIR = "/run/cloudhv"
RUN_VERB = b"run"
FIELD_MAX = 16 * 1024 * 1024


# This process' version, once known. A parent's is the one it started as: its workers
# (forks of it) run the code it imported, whatever is on disk since.
_key: str | None = None


def code_key() -> str:
    """A short hash of the shim's code (names, sizes, mtimes) and interpreter: the
    version a shared parent serves, computed once per process. Not a security
    boundary (the socket directory is root's alone): it keeps an upgrade from being
    served by the old code."""
    global _key
    if _key is None:
        _key = _hash_code()
    return _key


def pin_code_key(key: str) -> None:
    """Take `key` as this process' version (a parent: the one its socket is named by)."""
    global _key
    _key = key


def _hash_code() -> str:
    root = os.path.dirname(os.path.abspath(__file__))
    entries: list[str] = []
    pending = [root]
    while pending:
        directory = pending.pop()
        with os.scandir(directory) as scan:
            for item in scan:
                if item.is_dir(follow_symlinks=False):
                    if item.name != "__pycache__":
                        pending.append(item.path)
                elif item.name.endswith(".py"):
                    info = item.stat()
                    entries.append(f"{item.path[len(root) + 1:]}:{info.st_size}:{info.st_mtime_ns}")
    text = "\n".join([sys.executable, *sorted(entries)]).encode()
    return f"{zlib.crc32(text):08x}{zlib.adler32(text):08x}"


def socket_path(key: str | None = None) -> str:
    return f"{SOCKET_DIR}/forker-{key or code_key()}.sock"


# -- the wire: netstrings (`<length>:<bytes>,`), in both directions -------------------------


class WireError(ValueError):
    pass


def encode(fields: list[bytes]) -> bytes:
    return b"".join(b"%d:%s," % (len(field), field) for field in fields)


def decode(data: bytes) -> list[bytes]:
    fields = []
    at = 0
    while at < len(data):
        colon = data.find(b":", at, at + 12)
        if colon < 0 or not data[at:colon].isdigit():
            raise WireError(f"bad netstring at byte {at}")
        size = int(data[at:colon])
        end = colon + 1 + size
        if size > FIELD_MAX or end >= len(data) or data[end : end + 1] != b",":
            raise WireError(f"truncated netstring at byte {at}")
        fields.append(data[colon + 1 : end])
        at = end + 1
    return fields


def run_request(argv: list[str], cwd: str, env: dict[str, str], stdin: bytes) -> bytes:
    """The request a worker runs: the verb, cwd, stdin, then argc args and the env."""
    fields = [RUN_VERB, os.fsencode(cwd), stdin, b"%d" % len(argv)]
    fields += [os.fsencode(arg) for arg in argv]
    fields += [os.fsencode(f"{key}={value}") for key, value in env.items()]
    return encode(fields)


def parse_run_request(fields: list[bytes]) -> tuple[list[str], str, dict[str, str], bytes]:
    """(argv, cwd, env, stdin) of a request `run_request` made (its fields decoded)."""
    if len(fields) < 4 or fields[0] != RUN_VERB or not fields[3].isdigit():
        raise WireError("not a run request")
    argc = int(fields[3])
    if len(fields) < 4 + argc:
        raise WireError(f"run request names {argc} arguments, carries {len(fields) - 4}")
    argv = [os.fsdecode(arg) for arg in fields[4 : 4 + argc]]
    env = {}
    for pair in fields[4 + argc :]:
        key, sep, value = os.fsdecode(pair).partition("=")
        if not sep:
            raise WireError(f"environment entry without '=': {key[:40]!r}")
        env[key] = value
    return argv, os.fsdecode(fields[1]), env, fields[2]
