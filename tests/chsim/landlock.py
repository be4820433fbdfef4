"""Landlock for the stand-in, as Cloud Hypervisor applies it at vm.create.

CH (vmm/src/landlock.rs, v53) handles every filesystem right of Landlock ABI 3, maps
access "r" to execute/read-file/read-dir and "w" to every write right, narrows a
rule on a file to the rights a file can have, and skips a path it cannot open.
The stand-in does the same to itself; QEMU and the vsock backend it starts
afterwards inherit the domain. A disk hot-plugged from a directory no rule
covers then fails to open, as it would in CH.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
PR_SET_NO_NEW_PRIVS = 38
RULE_PATH_BENEATH = 1

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK = 1 << 8, 1 << 9, 1 << 10, 1 << 11
MAKE_SYM, REFER, TRUNCATE = 1 << 12, 1 << 13, 1 << 14

READ = EXECUTE | READ_FILE | READ_DIR
WRITE = (
    WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_CHAR | MAKE_DIR | MAKE_REG | MAKE_SOCK
    | MAKE_FIFO | MAKE_BLOCK | MAKE_SYM | REFER | TRUNCATE
)
HANDLED = READ | WRITE
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE


class _RulesetAttr(ctypes.Structure):
    _fields_: ClassVar = [("handled_access_fs", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1  # struct landlock_path_beneath_attr is packed
    _fields_: ClassVar = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class LandlockError(OSError):
    pass


def access_bits(access: str) -> int:
    """CH's access strings: any of 'r' and 'w'."""
    if not access or set(access) - {"r", "w"}:
        raise LandlockError(f"Invalid Landlock access: {access!r}")
    return (READ if "r" in access else 0) | (WRITE if "w" in access else 0)


def restrict(rules: Iterable[tuple[Path, str]]) -> list[str]:
    """Confine this thread (and whatever it starts later) to `rules`; returns the paths
    skipped because they could not be opened, as CH skips them."""
    libc = ctypes.CDLL(None, use_errno=True)
    attr = _RulesetAttr(HANDLED)
    ruleset = libc.syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    if ruleset < 0:
        raise LandlockError(ctypes.get_errno(), "landlock_create_ruleset")
    skipped = []
    try:
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                skipped.append(str(path))
                continue
            try:
                allowed = access_bits(access)
                if not Path(path).is_dir():
                    allowed &= FILE_RIGHTS
                beneath = _PathBeneath(allowed, fd)
                if libc.syscall(SYS_ADD_RULE, ruleset, RULE_PATH_BENEATH, ctypes.byref(beneath), 0):
                    raise LandlockError(ctypes.get_errno(), f"landlock_add_rule {path}")
            finally:
                os.close(fd)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
            raise LandlockError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if libc.syscall(SYS_RESTRICT_SELF, ruleset, 0):
            raise LandlockError(ctypes.get_errno(), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return skipped
