"""What the tests look at in network namespaces: a pod's (CNI made it, the shim adds
TAPs, filters and an nftables table there) and containerd's own (the bridge's, where
kubelet's probes would come from). Read with pyroute2 on a thread that enters the
namespace (shim.netns), so nothing here shells out to `ip` or `tc`."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from shim.netns import run_in_netns
from tests.integration.ctr_fixtures import Env


@dataclass(frozen=True)
class NetnsState:
    links: dict[str, tuple[str, str]]  # name -> (kind, MAC)
    ingress_filters: dict[str, int]  # link name -> how many ingress filters (by preference)
    nft_tables: tuple[str, ...]


def pod_netns(env: Env, pod_id: str) -> str:
    """The pod's network namespace path, from its sandbox bundle's spec."""
    bundle = env.containerd.root / "state" / "io.containerd.runtime.v2.task" / "k8s.io" / pod_id
    spec = json.loads((bundle / "config.json").read_text())
    for entry in spec["linux"]["namespaces"]:
        if entry["type"] == "network":
            return str(entry["path"])
    raise AssertionError(f"pod {pod_id} has no network namespace")


def netns_state(path: str) -> NetnsState:
    def read() -> NetnsState:
        from pyroute2 import IPRoute
        from pyroute2.nftables.main import NFTables

        with IPRoute() as ipr:
            links: dict[str, tuple[str, str]] = {}
            filters: dict[str, int] = {}
            for link in ipr.get_links():
                name = link.get_attr("IFLA_IFNAME")
                info = link.get_attr("IFLA_LINKINFO")
                kind = info.get_attr("IFLA_INFO_KIND") if info else ""
                links[name] = (kind or "", link.get_attr("IFLA_ADDRESS") or "")
                # A u32 filter dumps as several messages (its hash table, its node).
                found = {
                    f["info"] >> 16
                    for f in ipr.get_filters(index=link["index"], parent=0xFFFF0000)
                    if f.get_attr("TCA_KIND")
                }
                if found:
                    filters[name] = len(found)
        nft = NFTables(nfgen_family=1)
        try:
            tables = tuple(t.get_attr("NFTA_TABLE_NAME") for t in nft.get_tables())
        finally:
            nft.close()
        return NetnsState(links, filters, tables)

    return run_in_netns(path, read)


def bridge_netns_links(env: Env) -> set[str]:
    return set(netns_state(f"/run/netns/{env.containerd.netns}").links)


def in_bridge_netns(env: Env, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command where CNI's bridge is: containerd's (test-made) namespace."""
    return subprocess.run(
        ["ip", "netns", "exec", env.containerd.netns, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tcp_probe(env: Env, host: str, port: int) -> subprocess.CompletedProcess[str]:
    """kubelet's tcp probe: a TCP connect from the bridge's namespace, nothing sent."""
    code = f"import socket; socket.create_connection(({host!r}, {port}), 3).close()"
    return in_bridge_netns(env, sys.executable, "-c", code)


def keep_netns(path: str, keeper: Path) -> None:
    """Bind-mount a namespace file so the namespace outlives CRI's removal of it."""
    keeper.touch()
    subprocess.run(["mount", "--bind", path, str(keeper)], check=True)


def release_netns(keeper: Path) -> None:
    subprocess.run(["umount", str(keeper)], check=False)
    keeper.unlink(missing_ok=True)
