"""Pod network and port-forward: cloudhv pods side by side with runc pods on one bridge.

Usage: python -m bench.network [--pings 1000] [--mib 64] [--runs 3]
       (root, from the repository root, PYTHONPATH=.)

Two pods per runtime handler (cloudhv, runc) on the same CNI bridge, in a
namespace the harness makes. Measured inside the pods, with busybox:
- ping RTT: `ping -A -c N` from pod B to pod A (each reply triggers the next
  request), the median of the N round trips;
- TCP throughput: `dd if=/dev/zero bs=64k | nc A 5001` into `cat > /dev/null`,
  timed with busybox `time` in pod B (nc exits once the sink has read it all),
  median of runs;
- port-forward (cloudhv only): 10 MiB from a container through CRI PortForward
  over containerd's websocket streaming, timed by the client, median of runs.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

from tests.integration.cri import CriClient
from tests.integration.ctr_fixtures import containerd_env
from tests.integration.portforward_client import forward
from tests.integration.test_cri import Pod

SINK_PORT = 5001
SOURCE_PORT = 9100
PF_BYTES = 10 << 20


def ip_of(cri: CriClient, pod: Pod) -> str:
    status = cri.runtime.PodSandboxStatus(cri.pb.PodSandboxStatusRequest(pod_sandbox_id=pod.id))
    return str(status.status.network.ip)


def wait_listening(pod: Pod, cid: str, *ports: int) -> None:
    for port in ports:
        for _ in range(150):
            if pod.exec_sync(cid, ["sh", "-c", f"netstat -ltn | grep -q ':{port} '"])[2] == 0:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"nothing listens on {port}")


def ping_median_ms(pod: Pod, cid: str, target: str, count: int) -> float:
    out, err, code = pod.exec_sync(cid, ["ping", "-A", "-c", str(count), "-W", "10", target])
    assert code == 0, err
    times = [float(t) for t in re.findall(rb"time=([0-9.]+) ms", out)]
    assert len(times) >= count * 0.99, f"{len(times)} replies of {count}"
    return statistics.median(times)


def tcp_mbit_s(pod: Pod, cid: str, target: str, mib: int) -> float:
    """busybox `time` of dd piped into nc, which exits once the sink has read it all."""
    send = f"dd if=/dev/zero bs=64k count={mib * 16} 2>/dev/null | nc {target} {SINK_PORT}"
    script = f"time sh -c '{send}'"
    reply = pod.cri.runtime.ExecSync(
        pod.pb.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", script], timeout=600),
        timeout=660,
    )
    assert reply.exit_code == 0, reply.stderr
    match = re.search(rb"real\s+(\d+)m\s*([0-9.]+)s", reply.stderr)
    assert match, reply.stderr
    seconds = int(match.group(1)) * 60 + float(match.group(2))
    return mib * 8 * 1.048576 / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pings", type=int, default=1000)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    # A generous boot deadline: other work on a small machine can slow TCG boots a lot.
    with containerd_env(agent_startup_timeout_s=120) as env:
        cri = CriClient(env.containerd.address)
        for handler in ("cloudhv", "runc"):
            a = Pod(cri, env, f"{handler}-a", handler=handler)
            b = Pod(cri, env, f"{handler}-b", handler=handler)
            try:
                pb = cri.pb
                # Its own PID namespace: the servers then die with `sh` at stop.
                own_pid = pb.LinuxContainerConfig(
                    security_context=pb.LinuxContainerSecurityContext(
                        namespace_options=pb.NamespaceOption(pid=pb.CONTAINER)
                    )
                )
                server = a.container(
                    "sink",
                    ["sh", "-c", f"nc -ll -p {SINK_PORT} -e sh -c 'cat > /dev/null' & "
                                 f"nc -ll -p {SOURCE_PORT} -e head -c {PF_BYTES} /dev/zero & "
                                 "wait"],
                    linux=own_pid,
                )
                client = b.container("client", ["sleep", "3600"])
                target = ip_of(cri, a)
                wait_listening(a, server, SINK_PORT, SOURCE_PORT)
                rtt = ping_median_ms(b, client, target, args.pings)
                rates = [tcp_mbit_s(b, client, target, args.mib) for _ in range(args.runs)]
                row = {"ping_ms": rtt, "tcp_mbit_s": statistics.median(rates)}
                if handler == "cloudhv":
                    seconds = []
                    for _ in range(args.runs):
                        url = cri.runtime.PortForward(
                            cri.pb.PortForwardRequest(pod_sandbox_id=a.id, port=[SOURCE_PORT])
                        ).url
                        got = forward(env.containerd.netns, url, [b""])
                        assert len(got.data[0]) == PF_BYTES, len(got.data[0])
                        seconds.append(got.seconds)
                    row["portforward_mbit_s"] = PF_BYTES * 8 / 1e6 / statistics.median(seconds)
                    row["portforward_s"] = statistics.median(seconds)
                results[handler] = row
            finally:
                a.remove()
                b.remove()
        cri.close()
    print(f"pings={args.pings} tcp={args.mib}MiB x{args.runs} portforward=10MiB x{args.runs}")
    for handler, row in results.items():
        print(handler, " ".join(f"{k}={v:.3f}" for k, v in row.items()))


if __name__ == "__main__":
    main()
