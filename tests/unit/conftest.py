"""Shared fixtures for unit tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests run beside VMs on a 2-core machine: a per-example deadline would
# fail them for the machine's load, not for the code.
settings.register_profile("cloudhv", deadline=None)
settings.load_profile("cloudhv")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (pytest's tmp_path can exceed the 108-byte limit)."""
    path = Path(tempfile.mkdtemp(prefix="chv-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
