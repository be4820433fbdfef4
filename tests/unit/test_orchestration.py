"""Sandbox and container orchestration, with every step of a boot and a create broken once.

In-process fakes stand in for the VMM and the agent (tests/unit/fakes.py); the
state store, the image builder (mkfs.ext4) and the host files are real. For each
step we assert: the error names the step, everything done before it is undone,
the persisted state matches what is left, and the pod still works afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from shim import config as config_mod
from shim import spec as spec_mod
from shim import stdio as stdio_mod
from shim.devices import device_id
from shim.errors import FailedPrecondition, Internal, NotFound, ShimError, Unavailable
from shim.events import Event, Publisher, TaskExit
from shim.pod import Pod
from shim.state import PodState
from shim.types import CreateTask, ExecTask, Mount, StdioSpec
from shim.vmm.base import VmmError, VmSpec
from tests.unit.fakes import Failures, FakeAgent, FakeFsHost, FakeVmm, FlakyStore

POD = "pod1"


class RecordingPublisher(Publisher):
    def __init__(self) -> None:
        super().__init__("", "default")
        self.events: list[Event] = []

    def publish(self, event: Event) -> None:
        self.events.append(event)


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.failures = Failures()
        self.vmms: list[FakeVmm] = []
        self.agent: FakeAgent | None = None
        self.store = FlakyStore(tmp / "state")
        self.events = RecordingPublisher()
        self.fs_host = FakeFsHost(self.failures)
        self.config = config_mod.parse(
            {
                "vmm": "qemu",
                "agent_reconnect_timeout_s": 0.5,
                "agent_health_interval_s": 0.2,
                "agent_health_misses": 2,
                "kernel_path": "/k",
                "rootfs_path": "/r",
                "kernel_args": "quiet",
                "state_dir": str(tmp / "state"),
                "disk_dir": str(tmp / "disks"),
                "cache_dir": str(tmp / "cache"),
                "container_upper": {"size_mib": 16},
            }
        )
        self.pod = Pod(
            self.config,
            POD,
            "default",
            self.store,
            self.events,
            vmm_factory=self._vmm,
            agent_connect=self._connect,
            fs_host=self.fs_host,
        )

    def _vmm(self, config: config_mod.Config, spec: VmSpec) -> FakeVmm:
        vmm = FakeVmm(spec, self.failures)
        self.vmms.append(vmm)
        return vmm

    async def _connect(self, socket: Path, port: int, deadline: float) -> Any:
        self.failures.check("agent_connect")
        if self.agent is not None and not self.vmm.stopped and self.agent.closed:
            self.agent = self.agent.reconnect()  # the same VM: a new connection
        else:
            self.agent = FakeAgent(self.failures)
        return self.agent

    @property
    def vmm(self) -> FakeVmm:
        return self.vmms[-1]

    def bundle(self, task_id: str, annotations: dict[str, str], **spec: Any) -> str:
        path = self.tmp / "bundles" / task_id
        path.mkdir(parents=True, exist_ok=True)
        # A network namespace without a path: a new, empty one (no NIC to plug).
        spec.setdefault("linux", {"namespaces": [{"type": "network"}]})
        (path / "config.json").write_text(json.dumps({"annotations": annotations, **spec}))
        return str(path)

    async def create_sandbox(self) -> None:
        bundle = self.bundle(
            POD, {spec_mod.CONTAINER_TYPE: "sandbox", spec_mod.SANDBOX_ID: POD}, hostname="web"
        )
        await self.pod.create(CreateTask(POD, bundle, (), StdioSpec()))

    def rootfs(
        self, name: str, *, missing: bool = False, shared: bool = False
    ) -> tuple[Mount, ...]:
        """A tree as containerd would mount it: a read-only view of a committed snapshot
        (`shared`: its image goes through the cache) or a writable bind (private)."""
        tree = self.tmp / "trees" / name
        if not missing:
            (tree / "bin").mkdir(parents=True, exist_ok=True)
            (tree / "bin" / "app").write_text("#!/bin/sh\n")
        return (Mount("bind", str(tree), "", ("rbind", "ro" if shared else "rw")),)

    async def create_container(
        self, cid: str, *, missing_rootfs: bool = False, shared: bool = False,
        image: str = "", annotations: dict[str, str] | None = None,
    ) -> None:
        hosts = self.tmp / "hosts"
        hosts.write_text("127.0.0.1 localhost\n")
        data = self.tmp / "volumes" / "data"  # a hostPath: shared through virtio-fs
        data.mkdir(parents=True, exist_ok=True)
        bundle = self.bundle(
            cid,
            {spec_mod.CONTAINER_TYPE: "container", spec_mod.SANDBOX_ID: POD, **(annotations or {})},
            mounts=[
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {
                    "destination": "/etc/hosts",
                    "type": "bind",
                    "source": str(hosts),
                    "options": ["rbind", "ro"],
                },
                {
                    "destination": "/data",
                    "type": "bind",
                    "source": str(data),
                    "options": ["rbind", "rslave", "rw"],
                },
            ],
        )
        rootfs = self.rootfs(image or cid, missing=missing_rootfs, shared=shared)
        await self.pod.create(CreateTask(cid, bundle, rootfs, StdioSpec()))

    def persisted(self) -> PodState:
        state = self.store.load("default", POD)
        assert state is not None
        return state

    def images(self) -> list[Path]:
        """Per-container files in the pod's work dir: private images and uppers."""
        return sorted(p for p in (self.tmp / "disks").rglob("*") if p.is_file())

    def cache_refs(self) -> list[Path]:
        return sorted((self.tmp / "cache" / "refs").rglob("*"))

    def cache_entries(self) -> list[Path]:
        return sorted((self.tmp / "cache" / "images").glob("*"))

    def owned_by(self, owner: str) -> list[str]:
        return [r.kind for r in self.persisted().resources if r.owner == owner]

    def disk_mounts(self) -> dict[str, str]:
        assert self.agent is not None
        return {t: s for t, s in self.agent.mounts.items() if not s.startswith("virtiofs:")}


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path)
    yield h
    await h.pod.close()


def _fail(method: str, error: BaseException) -> Callable[[Harness], None]:
    def inject(h: Harness) -> None:
        h.failures.pending[method] = error

    return inject


def _fail_record(kind: str) -> Callable[[Harness], None]:
    def inject(h: Harness) -> None:
        h.store.fail_when = lambda st: any(r.kind == kind for r in st.resources)

    return inject


def _upper_file_exists(h: Harness) -> None:
    """The upper's file name is taken: its O_EXCL create fails."""
    work_dir = Path(h.pod.sandbox.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / f"{device_id('u', 'c1')}.ext4").write_text("")


# (step named in the error, how to break it, shared image or private)
CREATE_STEPS: dict[str, tuple[str, Callable[[Harness], None] | None, bool]] = {
    "private record": ("state record", _fail_record("disk"), False),
    "private build": ("image build", None, False),  # a rootfs dir that does not exist
    "private plug": ("plug", _fail("add_disk:p", VmmError("no slot today")), False),
    "private mount": ("guest mount", _fail("mount_disk:p", Internal("no such disk")), False),
    "upper record": ("state record", _fail_record("upper"), False),
    "upper create": ("upper disk", _upper_file_exists, False),
    "upper plug": ("plug", _fail("add_disk:u", VmmError("no slot today")), False),
    "upper mount": ("guest mount", _fail("mount_disk:u", Internal("bad fs")), False),
    "shared source": ("rootfs source", None, True),  # its layer does not exist
    "shared record": ("state record", _fail_record("image"), True),
    "shared plug": ("plug", _fail("add_disk:i", VmmError("no slot today")), True),
    "shared mount": ("guest mount", _fail("mount_disk:i", Internal("no such disk")), True),
    "volume record": ("volume /data (source", _fail_record("volume"), True),
    "volume bind": ("bind", _fail("bind", Internal("mount: permission denied")), True),
    "file copies": ("file copies", _fail("copy_file", Internal("guest disk full")), True),
    "crun create": ("crun create", _fail("create_container", Internal("crun: exit 1")), True),
}


@pytest.mark.parametrize("case", list(CREATE_STEPS))
async def test_container_create_failure_undoes_every_earlier_step(
    harness: Harness, case: str
) -> None:
    step, inject, shared = CREATE_STEPS[case]
    await harness.create_sandbox()
    if inject is not None:
        inject(harness)
    with pytest.raises(ShimError) as raised:
        await harness.create_container("c1", missing_rootfs=inject is None, shared=shared)
    assert step in str(raised.value) and "c1" in str(raised.value)

    agent, vmm = harness.agent, harness.vmm
    assert agent is not None
    assert vmm.disks == {}, "plugged disk left behind"
    assert harness.disk_mounts() == {}, "guest mount left behind"
    assert not [p for p in agent.files if "/c1/" in p], "guest copies left behind"
    assert harness.fs_host.binds == {}, "volume bind left behind"
    assert agent.containers == set()
    assert harness.cache_refs() == [], "cache reference left behind"
    state = harness.persisted()
    assert harness.owned_by("c1") == []
    assert [r.kind for r in state.resources] == ["sharedfs"]  # the pod's own stays
    assert state.containers == (POD,)
    assert "c1" not in harness.pod.containers
    for leftover in harness.images():
        assert case == "upper create", f"host image left behind: {leftover}"

    # Nothing stale blocks a retry: the same container now comes up.
    for leftover in harness.images():
        leftover.unlink()
    await harness.create_container("c1", shared=shared)
    assert agent.containers == {"c1"}
    assert len(vmm.disks) == 2 and len(harness.disk_mounts()) == 2
    assert list(harness.fs_host.binds) == ["c1/2"]
    resources = [(r.kind, r.owner) for r in harness.persisted().resources]
    if shared:
        assert resources == [("sharedfs", ""), ("image", ""), ("upper", "c1"), ("volume", "c1")]
        assert len(harness.images()) == 1 and len(harness.cache_refs()) == 2  # dir + ref
    else:
        assert resources == [("sharedfs", ""), ("disk", "c1"), ("upper", "c1"), ("volume", "c1")]
        assert len(harness.images()) == 2 and harness.cache_refs() == []


BOOT_STEPS = {
    "config virtiofs.binary": _fail("virtiofs_check", FailedPrecondition("config virtiofs.binary")),
    "shared fs record": _fail_record("sharedfs"),
    "shared root": _fail("make_root", Internal("mount: permission denied")),
    "virtiofsd start": _fail("start_daemon", Internal("exec: no such file")),
    "shared fs mount": _fail("mount_shared_fs", Internal("mount virtiofs: No such device")),
    "VMM start": _fail("start", VmmError("qemu: cannot open kernel")),
    "vsock ready": _fail("wait_vsock_ready", VmmError("no ready mark")),
    "agent connect": _fail("agent_connect", Unavailable("CONNECT refused")),
    "guest setup": _fail("setup_pod", Internal("sethostname: EINVAL")),
}


@pytest.mark.parametrize("step", list(BOOT_STEPS))
async def test_sandbox_boot_failure_stops_what_was_started(harness: Harness, step: str) -> None:
    BOOT_STEPS[step](harness)
    with pytest.raises(ShimError) as raised:
        await harness.create_sandbox()
    assert step in str(raised.value) and POD in str(raised.value)
    failed = list(harness.vmms)  # none when the boot failed before the VMM was made
    assert all(vmm.stopped for vmm in failed), "the VMM was left running"
    if harness.agent is not None:
        assert harness.agent.closed
    state = harness.persisted()
    assert (state.vmm, state.helpers, state.containers, state.resources) == (None, (), (), ())
    assert harness.pod.empty and not harness.pod.sandbox.booted
    assert harness.fs_host.running() == [], "virtiofsd left running"
    assert harness.fs_host.roots == set(), "share root left behind"

    await harness.create_sandbox()  # a retry boots a fresh VM
    assert len(harness.vmms) == len(failed) + 1
    assert harness.vmm.started and not harness.vmm.stopped
    assert harness.persisted().vmm is not None


async def test_delete_unplugs_and_forgets_the_disk(harness: Harness) -> None:
    await harness.create_sandbox()
    await harness.create_container("c1")
    await harness.create_container("c2")
    agent = harness.agent
    assert agent is not None
    assert sorted(harness.vmm.slots.values()) == [0, 1, 2, 3]
    await harness.pod.kill("c1", "", 9, False)
    await harness.pod.delete("c1", "")
    assert agent.containers == {"c2"}
    assert len(harness.vmm.disks) == 2 and len(harness.images()) == 2
    assert [r.owner for r in harness.persisted().resources] == ["", "c2", "c2", "c2"]
    assert list(harness.fs_host.binds) == ["c2/2"]
    assert harness.persisted().containers == (POD, "c2")
    # The freed slots are handed out again.
    await harness.create_container("c3")
    assert sorted(harness.vmm.slots.values()) == [0, 1, 2, 3]


async def test_containers_of_one_image_share_its_disk_until_the_last_goes(
    harness: Harness,
) -> None:
    await harness.create_sandbox()
    await harness.create_container("c1", shared=True, image="img")
    await harness.create_container("c2", shared=True, image="img")
    await harness.create_container("c3", shared=True, image="other")
    agent, vmm = harness.agent, harness.vmm
    assert agent is not None
    images = sorted(d for d in vmm.disks if d.startswith("i"))
    assert len(images) == 2, "one read-only disk per image, not per container"
    assert all(vmm.disks[d].read_only for d in images)
    assert {agent.roots["c1"][0], agent.roots["c2"][0]} == {agent.roots["c1"][0]}
    assert agent.roots["c1"][0] != agent.roots["c3"][0]
    # Each container writes to its own upper, on its own disk.
    assert len({agent.roots[c][1] for c in ("c1", "c2", "c3")}) == 3
    assert len(harness.cache_entries()) == 2
    refs = [p for p in harness.cache_refs() if p.is_file()]
    assert len(refs) == 2, "one host reference per image per pod"

    for cid in ("c1", "c2"):
        await harness.pod.kill(cid, "", 9, False)
        await harness.pod.delete(cid, "")
        still_plugged = any(agent.roots[cid][0] == t for t in agent.mounts)
        assert still_plugged == (cid == "c1"), "the shared disk went with the wrong container"
    assert len([d for d in vmm.disks if d.startswith("i")]) == 1
    assert len([p for p in harness.cache_refs() if p.is_file()]) == 1
    assert [(r.kind, r.owner) for r in harness.persisted().resources] == [
        ("sharedfs", ""), ("image", ""), ("upper", "c3"), ("volume", "c3")
    ]
    assert len(harness.cache_entries()) == 2, "an unused entry stays cached"


async def test_tmpfs_upper_from_an_annotation(harness: Harness) -> None:
    await harness.create_sandbox()
    await harness.create_container(
        "c1", shared=True,
        annotations={"io.cloudhv.container.upper": "tmpfs",
                     "io.cloudhv.container.upper_size_mib": "64"},
    )
    agent = harness.agent
    assert agent is not None
    _, upper, work, tmpfs_mib = agent.roots["c1"]
    assert (upper, work, tmpfs_mib) == ("", "", 64)
    assert len(harness.vmm.disks) == 1 and harness.images() == []


@pytest.mark.parametrize(
    ("key", "value"),
    [("io.cloudhv.container.upper", "ramdisk"), ("io.cloudhv.container.upper_size_mib", "8"),
     ("io.cloudhv.container.upper_size_mib", "lots")],
)
async def test_bad_upper_annotation_is_refused_by_name(
    harness: Harness, key: str, value: str
) -> None:
    await harness.create_sandbox()
    with pytest.raises(ShimError) as raised:
        await harness.create_container("c1", shared=True, annotations={key: value})
    assert key in str(raised.value) and repr(value) in str(raised.value)
    assert harness.vmm.disks == {} and harness.owned_by("c1") == []


async def test_vm_crash_reports_every_running_process_exited(harness: Harness) -> None:
    await harness.create_sandbox()
    await harness.pod.start(POD, "")
    await harness.create_container("c1")
    await harness.pod.start("c1", "")
    harness.vmm.crash(137)
    exit_ = await harness.pod.wait("c1", "")
    assert exit_.status == 255
    sandbox_exit = await harness.pod.wait(POD, "")
    assert sandbox_exit.status == 255
    exits = [e for e in harness.events.events if isinstance(e, TaskExit)]
    assert {e.container_id for e in exits} == {"c1", POD}
    # Stop and remove still work on the dead VM, and take its disk with them.
    await harness.pod.delete("c1", "")
    await harness.pod.delete(POD, "")
    assert harness.images() == [] and harness.persisted().resources == ()
    assert harness.fs_host.running() == [] and harness.fs_host.roots == set()


async def test_vmm_processes_are_persisted_before_start_returns(harness: Harness) -> None:
    """A shim killed while the VMM starts leaves pids that delete can find."""
    seen: list[tuple[int, ...]] = []
    original = harness._vmm

    def factory(config: config_mod.Config, spec: VmSpec) -> FakeVmm:
        vmm = original(config, spec)
        vmm.spawned.clear()
        return vmm

    harness.pod.sandbox._vmm_factory = factory
    boot = asyncio.create_task(harness.create_sandbox())
    for _ in range(100):
        await asyncio.sleep(0.01)
        state = harness.store.load("default", POD)
        if state is not None and state.helpers:
            seen.append(tuple(h.pid for h in state.helpers))
            break
    assert seen == [(4241,)], "the helper was not persisted while the start was in progress"
    harness.vmm.spawned.set()
    await boot


async def test_cancelled_stop_still_stops_the_vm(harness: Harness) -> None:
    await harness.create_sandbox()
    await harness.pod.start(POD, "")
    harness.vmm.shutdown_delay = 0.3
    kill = asyncio.create_task(harness.pod.kill(POD, "", 15, False))
    await asyncio.sleep(0.05)
    kill.cancel()  # what the ttrpc server does at a deadline or when containerd goes
    with pytest.raises(asyncio.CancelledError):
        await kill
    assert harness.pod.sandbox.booted, "the VM handle was dropped before it was stopped"
    for _ in range(100):  # the shielded stop goes on: the VM, then the shared fs, then state
        await asyncio.sleep(0.05)
        if harness.persisted().vmm is None:
            break
    assert harness.vmm.stopped
    state = harness.persisted()
    assert state.vmm is None and state.helpers == ()
    assert harness.fs_host.running() == []


async def test_dropped_agent_connection_is_reestablished(harness: Harness) -> None:
    await harness.create_sandbox()
    await harness.create_container("c1")
    await harness.pod.start("c1", "")
    first = harness.agent
    assert first is not None
    await first.close()  # the vsock path dropped; the agent lives on
    for _ in range(50):
        if harness.agent is not first:
            break
        await asyncio.sleep(0.02)
    assert harness.agent is not first
    harness.agent.finish("c1", 3)  # the process exits after the reconnect
    exit_ = await asyncio.wait_for(harness.pod.wait("c1", ""), 5)
    assert exit_.status == 3
    assert not harness.vmm.stopped


async def test_lost_agent_fails_the_pod_in_bounded_time(harness: Harness) -> None:
    await harness.create_sandbox()
    await harness.pod.start(POD, "")
    await harness.create_container("c1")
    await harness.pod.start("c1", "")
    assert harness.agent is not None
    harness.failures.pending["agent_connect"] = Unavailable("nobody listens")
    await harness.agent.close()
    exit_ = await asyncio.wait_for(harness.pod.wait("c1", ""), 5)
    assert exit_.status == 255
    assert (await asyncio.wait_for(harness.pod.wait(POD, ""), 5)).status == 255
    assert harness.vmm.stopped
    with pytest.raises(Unavailable, match="did not come back"):
        harness.pod.sandbox.require_agent()  # what every later call that needs it hears


async def test_hung_agent_fails_the_pod_in_bounded_time(harness: Harness) -> None:
    await harness.create_sandbox()
    await harness.create_container("c1")
    await harness.pod.start("c1", "")
    assert harness.agent is not None
    harness.agent.hung = True
    exit_ = await asyncio.wait_for(harness.pod.wait("c1", ""), 5)
    assert exit_.status == 255 and harness.vmm.stopped
    assert "Health" in harness.pod.sandbox.failure


def _slow_logger(tmp: Path) -> str:
    """A binary:// logger that takes 0.3 s to say it is ready: Exec awaits it."""
    script = tmp / "slow-logger"
    script.write_text(
        "#!/bin/sh\nsleep 0.3\nexec 5>&-\ncat <&3 >/dev/null & cat <&4 >/dev/null\nwait\n"
    )
    script.chmod(0o755)
    return f"binary://{script}"


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _loggers(tmp: Path) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(tmp).encode() in cmdline and b"slow-logger" in cmdline:
            found.append(pid)
    return found


async def test_concurrent_execs_of_one_id_one_wins_nothing_leaks(harness: Harness) -> None:
    await harness.create_sandbox()
    await harness.create_container("c1")
    await harness.pod.start("c1", "")
    baseline = _open_fds()
    stdio = StdioSpec(stdout=_slow_logger(harness.tmp))
    task = ExecTask("c1", "e1", stdio, b'{"args": ["true"]}')
    results = await asyncio.gather(
        harness.pod.exec(task), harness.pod.exec(task), return_exceptions=True
    )
    assert sorted(type(r).__name__ for r in results) == ["AlreadyExists", "NoneType"]
    await harness.pod.delete("c1", "e1")
    assert _open_fds() == baseline
    assert _loggers(harness.tmp) == []


async def test_exec_racing_a_delete_is_refused_and_leaks_nothing(harness: Harness) -> None:
    await harness.create_sandbox()
    await harness.create_container("c1")
    await harness.pod.start("c1", "")
    baseline = _open_fds()
    stdio = StdioSpec(stdout=_slow_logger(harness.tmp))
    exec_ = asyncio.create_task(harness.pod.exec(ExecTask("c1", "e1", stdio, b"{}")))
    await asyncio.sleep(0.1)  # the exec is opening its logger
    await harness.pod.kill("c1", "", 9, False)
    await harness.pod.wait("c1", "")
    await harness.pod.delete("c1", "")
    with pytest.raises(NotFound):
        await exec_
    assert "c1" not in harness.pod.containers
    assert _open_fds() == baseline
    assert _loggers(harness.tmp) == []


async def test_exit_waits_for_a_slow_reader_and_no_output_is_lost(harness: Harness) -> None:
    """The reader of stdout pauses 6 s after the process exited: all the output (more
    than the FIFO holds) arrives, and the exit is reported only then (it used to give
    up after 5 s and drop the rest)."""
    await harness.create_sandbox()
    fifo = harness.tmp / "stdout"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    hosts = harness.tmp / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    bundle = harness.bundle("c1", {spec_mod.CONTAINER_TYPE: "container", spec_mod.SANDBOX_ID: POD})
    await harness.pod.create(
        CreateTask("c1", bundle, harness.rootfs("c1"), StdioSpec(stdout=str(fifo)))
    )
    assert harness.agent is not None
    payload = os.urandom(4 * stdio_mod.FIFO_SIZE)
    chunks = [payload[i : i + 65536] for i in range(0, len(payload), 65536)]
    harness.agent.stdout[("c1", "")] = chunks
    harness.agent.finish("c1", 0)
    await harness.pod.start("c1", "")
    waiter = asyncio.create_task(harness.pod.wait("c1", ""))
    await asyncio.sleep(6.0)
    assert not waiter.done(), "the exit was reported before the output was delivered"
    got = bytearray()
    while not waiter.done() or len(got) < len(payload):
        try:
            chunk = os.read(reader, 1 << 16)
        except BlockingIOError:
            await asyncio.sleep(0.001)
            continue
        got += chunk
        if not chunk:
            break
    assert (await waiter).status == 0
    os.close(reader)
    assert bytes(got) == payload


async def test_exit_is_reported_when_a_child_keeps_the_pipe_open(harness: Harness) -> None:
    """The process exits, a child it left behind holds stdout open (so no EOF ever
    comes): its output is still delivered, and the exit reported within seconds."""
    reader = await _container_writing_to_a_fifo(harness)
    assert harness.agent is not None
    harness.agent.stdout[("c1", "")] = [b"last words\n"]
    harness.agent.held_open.add(("c1", ""))
    await harness.pod.start("c1", "")
    await asyncio.sleep(0.2)
    harness.agent.finish("c1", 0)
    started = asyncio.get_running_loop().time()
    exit_ = await asyncio.wait_for(harness.pod.wait("c1", ""), 15)
    assert exit_.status == 0
    assert asyncio.get_running_loop().time() - started < 10
    assert os.read(reader, 100) == b"last words\n"
    os.close(reader)


async def test_output_behind_a_stalled_read_after_the_exit_is_still_delivered(
    harness: Harness,
) -> None:
    """Reads that get no answer at all (a stalled guest or transport) are not taken
    for "nothing pending": the output behind them reaches the FIFO, then the exit."""
    reader = await _container_writing_to_a_fifo(harness)
    assert harness.agent is not None
    harness.agent.stdout[("c1", "")] = [b"late words\n"]
    harness.agent.stalls[("c1", "")] = 6
    await harness.pod.start("c1", "")
    harness.agent.finish("c1", 0)
    exit_ = await asyncio.wait_for(harness.pod.wait("c1", ""), 15)
    assert exit_.status == 0
    assert harness.agent.stalls[("c1", "")] == 0
    assert os.read(reader, 100) == b"late words\n"
    os.close(reader)


async def _container_writing_to_a_fifo(harness: Harness) -> int:
    """Container c1 of a new sandbox, its stdout a FIFO; returns the FIFO's read end."""
    await harness.create_sandbox()
    fifo = harness.tmp / "stdout"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    bundle = harness.bundle("c1", {spec_mod.CONTAINER_TYPE: "container", spec_mod.SANDBOX_ID: POD})
    await harness.pod.create(
        CreateTask("c1", bundle, harness.rootfs("c1"), StdioSpec(stdout=str(fifo)))
    )
    return reader


def _pooled(harness: Harness) -> Any:
    """A sandbox as a pooled VM's daemon makes it (shim/warm.py): its own store and
    identity, the VM started with no pod."""
    from shim.sandbox import Sandbox
    from shim.state import POOL_NAMESPACE, StateStore

    async def exited(status: int) -> None:
        del status

    return Sandbox(
        harness.config,
        PodState(pod_id="warm-1", namespace=POOL_NAMESPACE, pool="ready"),
        StateStore(harness.tmp / "state" / "pool"),
        vmm_factory=harness._vmm,
        agent_connect=harness._connect,
        on_vm_exit=exited,
        on_oom=lambda container_id: None,
        fs_host=harness.fs_host,
    )


async def test_a_pooled_vm_is_rekeyed_to_the_pod_then_joined(harness: Harness) -> None:
    sandbox = _pooled(harness)
    await sandbox.start_vm(sandbox.size({}))
    assert harness.agent is not None and harness.agent.hostname == ""  # no pod yet
    pooled_dir = sandbox.store.pod_dir(sandbox.namespace, "warm-1")
    assert (pooled_dir / "state.json").exists()
    await sandbox.rekey(harness.store, pod_id=POD, namespace="default", socket="/s")
    state = harness.persisted()
    assert (state.pool, state.pool_dir) == ("adopted", str(pooled_dir))
    assert state.vmm is not None and state.vmm == sandbox.state.vmm
    assert [r.kind for r in state.resources] == ["sharedfs"]  # carried over
    assert not (pooled_dir / "state.json").exists()
    await sandbox.join_cgroup("")
    await sandbox.join("web", spec_mod.PodOptions())
    assert harness.agent.hostname == "web"
    await sandbox.close()
    assert harness.vmm.stopped and harness.fs_host.running() == []


async def test_a_failed_join_stops_the_pooled_vm(harness: Harness) -> None:
    sandbox = _pooled(harness)
    await sandbox.start_vm(sandbox.size({}))
    await sandbox.rekey(harness.store, pod_id=POD, namespace="default")
    harness.failures.pending["setup_pod"] = Internal("sethostname: EINVAL")
    with pytest.raises(ShimError) as raised:
        await sandbox.join("web", spec_mod.PodOptions())
    assert "guest setup" in str(raised.value) and POD in str(raised.value)
    assert harness.vmm.stopped and harness.fs_host.running() == []
    state = harness.persisted()
    assert (state.vmm, state.helpers, state.resources) == (None, (), ())
    await sandbox.close()
