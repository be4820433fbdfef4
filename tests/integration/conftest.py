"""Integration tests need root (QEMU, loop devices, mounts, netns, containerd): fail loudly
rather than skip, so a run without root can never look green."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    integration = [item for item in items if "tests/integration" in str(item.fspath)]
    if integration and os.geteuid() != 0:
        raise pytest.UsageError("tests/integration needs root (run scripts/test.sh as root)")
