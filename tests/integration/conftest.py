"""Integration tests need root (QEMU, loop devices, mounts, netns, containerd): fail loudly
rather than skip, so a run without root can never look green.

Suites whose `env` fixture is parametrized over VMM backends run once per backend; a
test marked `only_vmm("<name>")` belongs to one backend's run and is deselected (not
skipped) from the others."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "only_vmm(name): run the test only with this VMM backend's env"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    integration = [item for item in items if "tests/integration" in str(item.fspath)]
    if integration and os.geteuid() != 0:
        raise pytest.UsageError("tests/integration needs root (run scripts/test.sh as root)")
    kept, dropped = [], []
    for item in items:
        marker = item.get_closest_marker("only_vmm")
        callspec = getattr(item, "callspec", None)
        vmm = callspec.params.get("env") if callspec is not None else None
        if marker is not None and vmm is not None and vmm != marker.args[0]:
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
