"""What the guest image gives containers: a crun that takes the OCI versions current
containerd writes, and the kernel features privileged pods and Istio's init use."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from shim.agent import AgentClient
from shim.devices import DeviceManager
from shim.vmm.base import DiskSpec
from shim.vmm.qemu import QemuVmm
from tests.integration.busybox_tree import add_host_programs, make_busybox_tree, make_ext4
from tests.integration.oci_spec import default_spec
from tests.integration.test_guest import read_all
from tests.integration.vm_fixtures import booted_vm


async def mount_tree(vm: QemuVmm, agent: AgentClient, tree: Path, image: Path) -> str:
    disk = DiskSpec(id="root", path=make_ext4(tree, image, size_mib=48), serial="root")
    await DeviceManager(vm, vm.hotplug_slots).add_disk(disk)
    await agent.mount_disk("root", "/run/cloudhv/disks/root", fstype="ext4", wait=10)
    return "/run/cloudhv/disks/root"


async def run_container(
    agent: AgentClient, cid: str, spec: dict[str, Any], rootfs: str
) -> tuple[int, bytes, bytes]:
    """Creates, starts and waits for a container; returns (exit status, stdout, stderr)."""
    await agent.create_container(cid, json.dumps(spec).encode(), rootfs_path=rootfs)
    await agent.start_container(cid)
    out, err, status = await asyncio.gather(
        read_all(agent, cid, "", "stdout"),
        read_all(agent, cid, "", "stderr"),
        agent.wait_process(cid, "", timeout=120),
    )
    await agent.remove_container(cid)
    return status.exit_status, out, err


async def test_specs_of_current_containerd_run(tmp_path: Path) -> None:
    """containerd 1.7 writes ociVersion 1.2.0 and 2.1 writes 1.2.1. Bookworm's crun
    1.8.1 refused both ("unknown version specified"); the spec goes to crun as given."""
    async with booted_vm(tmp_path / "vm") as (vm, agent):
        rootfs = await mount_tree(vm, agent, make_busybox_tree(tmp_path / "tree"), tmp_path / "img")
        for n, version in enumerate(["1.0.2", "1.2.0", "1.2.1"]):
            spec = default_spec(["echo", "ran"])
            spec["ociVersion"] = version
            status, out, err = await run_container(agent, f"v{n}", spec, rootfs)
            assert (status, out, err) == (0, b"ran\n", b""), version


# Istio's init container (REDIRECT mode) and what CNI-style privileged pods run, each
# step failing the script (set -e) if the kernel lacks the feature.
NET_SCRIPT = r"""
set -e
echo "links at start:" $(ls /sys/class/net)
brctl addbr br0
ip link add v0 type veth  # busybox ip names the peer veth0
ip link set veth0 name v1
brctl addif br0 v0
echo "bridge ports: $(ls /sys/class/net/br0/brif)"
ip link add m0 link v1 type macvlan
tunctl -t tap0 >/dev/null
for link in br0 v1 m0 tap0; do test -e /sys/class/net/$link; done
echo links ok

# Serves one connection on port 15001 with a token, and dials $2 port 80 until
# something answers: the token when the nat rules redirect the call.
redirect_probe() {
  echo "redirected-$1" | nc -l -p 15001 &
  for i in $(seq 50); do
    got=$(sleep 1 | nc "$2" 80 2>/dev/null) && [ -n "$got" ] && break
    sleep 0.2
  done
  kill $! 2>/dev/null || true
  wait 2>/dev/null || true
  echo "$1 $2: $got"
}

for front in nft legacy; do
  for family in ip ip6; do
    ipt=/usr/sbin/${family}tables-$front
    $ipt -t nat -N ISTIO_REDIRECT
    $ipt -t nat -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
    $ipt -t nat -A OUTPUT -p tcp -m owner ! --uid-owner 1337 -m multiport --dports 80,443 \
      -m comment --comment "istio outbound" -j ISTIO_REDIRECT
    $ipt -t nat -A POSTROUTING -o br0 -j MASQUERADE
    $ipt -A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
    $ipt -A INPUT -p udp --dport 9 -j REJECT
    $ipt -A OUTPUT -m addrtype --dst-type LOCAL -j ACCEPT
    $ipt -t mangle -A PREROUTING -p tcp -j MARK --set-mark 1337
    $ipt -t mangle -A PREROUTING -p tcp -j CONNMARK --save-mark
    $ipt -t raw -A OUTPUT -p udp --dport 53 -j CT --zone 1
  done
  redirect_probe $front 127.0.0.1
  redirect_probe $front ::1
  for family in ip ip6; do
    for table in nat filter mangle raw; do
      /usr/sbin/${family}tables-$front -t $table -F
      /usr/sbin/${family}tables-$front -t $table -X
    done
  done
done
"""

NET_CAPS = ["CAP_NET_ADMIN", "CAP_NET_RAW"]
TUN = {"type": "c", "major": 10, "minor": 200}


async def test_privileged_network_features(tmp_path: Path) -> None:
    """What critest's "adding capability NET_ADMIN" (brctl addbr) and Istio's init
    container need from the guest kernel: bridge, veth, macvlan, tun, and netfilter
    NAT (REDIRECT) with conntrack, through iptables-nft and iptables-legacy, for IPv4
    and IPv6."""
    tree = make_busybox_tree(tmp_path / "tree")
    add_host_programs(
        tree,
        [
            Path(f"/usr/sbin/{family}tables-{front}")
            for family in ("ip", "ip6")
            for front in ("nft", "legacy")
        ],
        plugin_dirs=(Path("/usr/lib/x86_64-linux-gnu/xtables"),),
    )
    async with booted_vm(tmp_path / "vm") as (vm, agent):
        rootfs = await mount_tree(vm, agent, tree, tmp_path / "img")
        spec = default_spec(["sh", "-c", NET_SCRIPT])
        caps = spec["process"]["capabilities"]
        for kind in ("bounding", "effective", "permitted"):
            caps[kind] += NET_CAPS
        spec["linux"]["devices"] = [{"path": "/dev/net/tun", **TUN, "fileMode": 0o666}]
        spec["linux"]["resources"]["devices"].append({"allow": True, "access": "rwm", **TUN})
        status, out, err = await run_container(agent, "net", spec, rootfs)
        assert (status, err) == (0, b""), out.decode() + err.decode()
        assert out.decode().splitlines() == [
            "links at start: lo",  # no dummy0 or sit0 from built-in drivers
            "bridge ports: v0",
            "links ok",
            "nft 127.0.0.1: redirected-nft",
            "nft ::1: redirected-nft",
            "legacy 127.0.0.1: redirected-legacy",
            "legacy ::1: redirected-legacy",
        ]
