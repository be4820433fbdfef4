"""cloudhvctl without VMs: ps and console from persisted state, the cache, the doctor's
checks, the probe's choices, and the rule that the shim itself never loads any of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shim.config import parse
from shim.ctl import cache, doctor, probe
from shim.ctl.main import main
from shim.state import POOL_NAMESPACE, PodState, ProcRef, StateStore, pool_store
from shim.vmm.procs import process_start_time
from tests.unit.test_structure import import_graph

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, **extra: object) -> Path:
    data = {
        "vmm": "qemu",
        "kernel_path": str(tmp_path / "vmlinux"),
        "rootfs_path": str(tmp_path / "rootfs.ext4"),
        "kernel_args": "root=/dev/vda",
        "state_dir": str(tmp_path / "state"),
        "cache_dir": str(tmp_path / "cache"),
        **extra,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


def _me() -> ProcRef:
    start = process_start_time(os.getpid())
    assert start is not None
    return ProcRef(os.getpid(), start)


def _pod(tmp_path: Path, pod_id: str, *, running: bool = True) -> PodState:
    store = StateStore(tmp_path / "state")
    state = PodState(
        pod_id=pod_id,
        namespace="k8s.io",
        daemon=_me(),
        vmm=_me() if running else None,
        vm_dir=str(tmp_path / "state" / pod_id / "vm"),
        containers=(pod_id, "app-1", "app-2"),
        vcpus=2,
        memory_mib=384,
        booted_at=time.time() - 125,
    )
    store.save(state)
    return state


def test_ps_shows_pooled_vms_and_their_memory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path)
    pool = pool_store(tmp_path / "state")
    pool.save(
        PodState(pod_id="warm-1", namespace=POOL_NAMESPACE, daemon=_me(), vmm=_me(),
                 vcpus=1, memory_mib=256, booted_at=time.time(), pool="ready")
    )
    StateStore(tmp_path / "state").save(
        PodState(pod_id="p" * 64, namespace="k8s.io", daemon=_me(), vmm=_me(), pool="adopted")
    )
    assert main(["--config", str(config), "ps"]) == 0
    out = capsys.readouterr().out
    pooled = next(line for line in out.splitlines() if line.strip().startswith("warm-1"))
    assert pooled.split()[1] == "(pool)" and pooled.split()[-1] == "ready"
    adopted = next(line for line in out.splitlines() if line.strip().startswith("p" * 12))
    assert adopted.split()[-1] == "adopted"
    summary = out.splitlines()[-1]
    assert summary.startswith("pool: 1 VM(s) not taken, ")
    assert summary.endswith("MiB host memory (PSS)")
    assert float(summary.split(", ")[1].split()[0]) > 1


def test_ps_shows_each_pod(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)
    _pod(tmp_path, "a" * 64)
    _pod(tmp_path, "b" * 64, running=False)
    assert main(["--config", str(config), "ps"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["POD", "NAMESPACE", "VMM", "PID", "VCPUS", "MEMORY",
                                "CONTAINERS", "UPTIME", "HOST", "MEMORY", "POOL"]
    row_a = next(line for line in lines if line.strip().startswith("a" * 12)).split()
    assert row_a[:7] == ["a" * 12, "k8s.io", str(os.getpid()), "2", "384", "MiB", "2"]
    assert row_a[7].startswith("2m0")  # uptime from booted_at
    assert float(row_a[8]) > 1  # this process' PSS, counted once for the VMM, once for the daemon
    row_b = next(line for line in lines if line.strip().startswith("b" * 12)).split()
    assert row_b[2] == "-" and "not running" in " ".join(row_b)
    assert main(["--config", str(config), "ps", "--json"]) == 0
    views = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {v["pod_id"][:1]: v["running"] for v in views} == {"a": True, "b": False}


def test_console_prints_the_log_and_names_pods(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path)
    state = _pod(tmp_path, "abc123")
    _pod(tmp_path, "abd456")
    vm_dir = Path(state.vm_dir)
    vm_dir.mkdir(parents=True)
    (vm_dir / "console.log").write_bytes(b"[    0.000000] Linux version 6.1\nagent: ready\n")
    assert main(["--config", str(config), "console", "abc"]) == 0
    assert capsys.readouterr().out.endswith("agent: ready\n")
    assert main(["--config", str(config), "console", "ab"]) == 1
    assert "matches several pods" in capsys.readouterr().err
    assert main(["--config", str(config), "console", "zz"]) == 1
    assert "no pod 'zz'" in capsys.readouterr().err
    assert main(["--config", str(config), "console", "abd"]) == 1
    assert "no console log" in capsys.readouterr().err


def test_cache_ls_and_prune_keep_what_pods_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path)
    root = tmp_path / "cache"
    (root / "images").mkdir(parents=True)
    for index, key in enumerate(("old", "used", "new")):
        image = root / "images" / f"{key}.ext4"
        image.write_bytes(b"x" * (1 << 20))
        os.utime(image, (1000 + index, 1000 + index))
    (root / "refs" / "used").mkdir(parents=True)
    (root / "refs" / "used" / "pod-1").write_text("{}")
    assert main(["--config", str(config), "cache", "ls"]) == 0
    out = capsys.readouterr().out
    assert "3 image(s), 3.0 MiB" in out
    assert [line.split()[0] for line in out.splitlines()[1:4]] == ["new", "old", "used"]
    assert main(["--config", str(config), "cache", "prune", "--keep-mib", "2"]) == 0
    assert "removed 1 image(s), 1.0 MiB freed" in capsys.readouterr().out
    assert sorted(e.key for e in cache.entries(root)) == ["new", "used"]  # the oldest went
    assert [e.key for e in cache.prune(root)] == ["new"]
    assert [(e.key, e.refs) for e in cache.entries(root)] == [("used", 1)]


def test_doctor_checks(tmp_path: Path) -> None:
    config = parse(json.loads(_config(tmp_path).read_text()))
    assert doctor.check_kernel(config).status == doctor.FAIL
    (tmp_path / "vmlinux").write_bytes(b"MZ not elf")
    assert "not an ELF" in doctor.check_kernel(config).detail
    (tmp_path / "vmlinux").write_bytes(doctor.ELF_MAGIC + b"\0" * 100)
    assert doctor.check_kernel(config).status == doctor.OK
    (tmp_path / "rootfs.ext4").write_bytes(b"\0" * 2048)
    assert doctor.check_rootfs(config).status == doctor.FAIL
    image = bytearray(2048)
    image[1080:1082] = doctor.EXT4_MAGIC
    (tmp_path / "rootfs.ext4").write_bytes(bytes(image))
    assert doctor.check_rootfs(config).status == doctor.OK
    kvm = parse({**json.loads(_config(tmp_path).read_text()), "qemu": {"accel": "kvm"}})
    missing = doctor.check_accel(kvm, exists=lambda _: False)
    assert missing.status == doctor.FAIL and "tcg" in missing.fix
    assert doctor.check_accel(config, exists=lambda p: p == "/dev/kvm").status == doctor.WARN
    assert doctor.check_accel(config, exists=lambda _: False).status == doctor.OK
    unified = doctor.check_cgroups([("/sys/fs/cgroup", "cgroup2")])
    hybrid = doctor.check_cgroups([("/sys/fs/cgroup/cpu", "cgroup"),
                                   ("/sys/fs/cgroup/unified", "cgroup2")])
    assert (unified.status, hybrid.status) == (doctor.OK, doctor.WARN)
    assert doctor.check_cgroups([]).status == doctor.FAIL
    none = doctor.check_containerd([tmp_path / "nope.toml"], tmp_path / "config.json")
    assert none.status == doctor.WARN and "--configure-containerd" in none.fix


def test_doctor_reports_a_broken_config_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "config.json"
    bad.write_text('{"vmm": "xen"}')
    argv = ["--config", str(bad), "doctor", "--containerd-config", str(tmp_path / "c.toml")]
    assert main(argv) == 1
    assert "config" in capsys.readouterr().out.splitlines()[1]
    assert main([*argv, "--json"]) == 1
    checks = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert checks[0]["status"] == "fail"
    assert "vmm: must be one of 'qemu' or 'cloud-hypervisor'" in checks[0]["detail"]


def test_probe_candidates_best_first(tmp_path: Path) -> None:
    config = parse(json.loads(_config(tmp_path).read_text()))
    everything = probe.candidates(config, which=lambda _: "/usr/bin/cloud-hypervisor",
                                  exists=lambda _: True)
    assert [c.label for c in everything] == [
        "cloud-hypervisor/kvm", "cloud-hypervisor/mshv", "qemu/kvm", "qemu/tcg"]
    bare = probe.candidates(config, which=lambda _: None, exists=lambda _: False)
    assert [c.label for c in bare] == ["qemu/tcg"]
    # A CH binary without /dev/kvm or /dev/mshv is not a candidate.
    no_dev = probe.candidates(config, which=lambda _: "/x/ch", exists=lambda _: False)
    assert [c.label for c in no_dev] == ["qemu/tcg"]


def test_probe_result_keeps_the_rest_of_the_file(tmp_path: Path) -> None:
    data = json.loads(_config(tmp_path, debug=True).read_text())
    tcg = probe.apply_json(data, probe.Candidate("qemu", "tcg", Path("/usr/bin/qemu")))
    assert tcg["qemu"] == {"binary": "/usr/bin/qemu", "accel": "tcg"}
    assert {k: v for k, v in tcg.items() if k != "qemu"} == data
    ch = probe.apply_json(tcg, probe.Candidate("cloud-hypervisor", "kvm", Path("/ch")))
    assert ch["vmm"] == "cloud-hypervisor" and ch["cloud_hypervisor"] == {"binary": "/ch"}
    parse(ch)  # still a valid config


async def test_probe_failure_is_an_outcome_not_an_exception(tmp_path: Path) -> None:
    config = parse(json.loads(_config(tmp_path).read_text()))
    missing = probe.Candidate("qemu", "tcg", tmp_path / "no-qemu")
    outcome = await probe.boot(config, missing, timeout=5)
    assert not outcome.ok and "no-qemu" in outcome.detail


def test_the_shim_never_reaches_the_operator_tool() -> None:
    """start, the daemon and the forker (every import counted, lazy ones too) reach no
    module of shim.ctl, and so never import rich."""
    graph = import_graph()
    seen: set[str] = set()
    pending = ["shim.cli", "shim.daemon", "shim.forker", "shim.delete"]
    while pending:
        name = pending.pop()
        if name not in seen:
            seen.add(name)
            pending += sorted(graph[name])
    assert not [m for m in seen if m.startswith("shim.ctl")]
    importers = [
        str(p.relative_to(REPO)) for p in (REPO / "shim").rglob("*.py")
        if "_pb" not in p.parts and "ctl" not in p.parts
        and ("import rich" in p.read_text() or "from rich" in p.read_text())
    ]
    assert importers == []


def test_daemon_and_start_import_no_rich() -> None:
    """Measured: what importing the daemon's and start's modules loads."""
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, shim.cli, shim.daemon, shim.forker, shim.vmm.qemu; "
         "print(' '.join(sorted(sys.modules)))"],
        capture_output=True, text=True, cwd=REPO, check=True,
    )
    loaded = proc.stdout.split()
    assert "shim.daemon" in loaded
    assert [m for m in loaded if m == "rich" or m.startswith(("rich.", "shim.ctl"))] == []
