"""The C library this interpreter is linked with, for the few calls Python lacks
(mount, setns, madvise): one handle for the whole shim."""

from __future__ import annotations

import ctypes

# dlopen(NULL), not ctypes.util.find_library, which runs `ldconfig -p` and imports
# tempfile into every daemon.
LIBC = ctypes.CDLL(None, use_errno=True)
