"""Which VMM and accelerator work on this host, decided by booting our guest.

The presence of /dev/kvm proves nothing: on a host whose KVM only runs
paravirtualised guests (PVM), an ordinary guest hangs right after its setup code.
So each candidate boots the real guest (kernel, rootfs, agent) through the shim's
own VMM backend and must answer the agent's GuestInfo before a timeout; the first
that does wins. Candidates, best first: Cloud Hypervisor (its binary on PATH and
/dev/kvm or /dev/mshv present), QEMU with KVM (/dev/kvm present), QEMU with TCG.

The installer runs it once and caches the answer (see scripts/install.sh).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shim.config import Config

DEFAULT_TIMEOUT_S = 10.0
# TCG boots in 2-3 s here, but on a loaded host it may take several times that: the
# last resort gets more time than an accelerator, which boots in well under a second.
TCG_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Candidate:
    vmm: str  # "cloud-hypervisor" | "qemu"
    accel: str  # "kvm" | "mshv" | "tcg"
    binary: Path

    @property
    def label(self) -> str:
        return f"{self.vmm}/{self.accel}"


@dataclass(frozen=True)
class Outcome:
    candidate: Candidate
    ok: bool
    seconds: float
    detail: str  # the guest kernel on success, what went wrong otherwise


def candidates(
    config: Config,
    *,
    which: Callable[[str], str | None] = shutil.which,
    exists: Callable[[str], bool] = os.path.exists,
) -> list[Candidate]:
    """What to try on this host, best first (pure but for the two lookups)."""
    found: list[Candidate] = []
    ch = which("cloud-hypervisor")
    if ch:
        found += [Candidate("cloud-hypervisor", dev, Path(ch))
                  for dev in ("kvm", "mshv") if exists(f"/dev/{dev}")]
    qemu = config.qemu.binary
    if exists("/dev/kvm"):
        found.append(Candidate("qemu", "kvm", qemu))
    found.append(Candidate("qemu", "tcg", qemu))
    return found


def apply(config: Config, candidate: Candidate) -> Config:
    """`config` set to run `candidate`."""
    if candidate.vmm == "cloud-hypervisor":
        ch = dataclasses.replace(config.cloud_hypervisor, binary=candidate.binary)
        return dataclasses.replace(config, vmm="cloud-hypervisor", cloud_hypervisor=ch)
    accel: Literal["kvm", "tcg"] = "kvm" if candidate.accel == "kvm" else "tcg"
    qemu = dataclasses.replace(config.qemu, binary=candidate.binary, accel=accel)
    return dataclasses.replace(config, vmm="qemu", qemu=qemu)


def apply_json(data: Mapping[str, object], candidate: Candidate) -> dict[str, object]:
    """The same change on a config file's JSON, keeping every other key as written."""
    out = dict(data)
    if candidate.vmm == "cloud-hypervisor":
        section = dict(_section(out, "cloud_hypervisor"))
        section["binary"] = str(candidate.binary)
        out["vmm"], out["cloud_hypervisor"] = "cloud-hypervisor", section
    else:
        section = dict(_section(out, "qemu"))
        section["binary"] = str(candidate.binary)
        section["accel"] = "kvm" if candidate.accel == "kvm" else "tcg"
        out["vmm"], out["qemu"] = "qemu", section
    return out


def _section(data: Mapping[str, object], name: str) -> Mapping[str, object]:
    value = data.get(name)
    return value if isinstance(value, dict) else {}


async def boot(config: Config, candidate: Candidate, timeout: float) -> Outcome:
    """Boot the guest with `candidate` and ask its agent for GuestInfo; always stops it."""
    from shim.agent import AgentClient
    from shim.vmm.base import VmSpec
    from shim.vmm_factory import create_vmm

    started = time.monotonic()
    trial = apply(config, candidate)
    with tempfile.TemporaryDirectory(prefix="cloudhv-probe-", dir=_scratch_root()) as tmp:
        spec = VmSpec(
            state_dir=Path(tmp) / "vm",
            kernel=trial.kernel_path,
            rootfs=trial.rootfs_path,
            kernel_args=trial.kernel_args,
            vcpus=1,
            max_vcpus=1,
            memory_mib=trial.default_memory_mib,
        )
        try:
            vmm = create_vmm(trial, spec)
        except Exception as err:
            return Outcome(candidate, False, 0.0, str(err))
        try:
            async with asyncio.timeout(timeout):
                await vmm.start()
                deadline = asyncio.get_running_loop().time() + timeout
                await vmm.wait_vsock_ready(deadline)
                agent = await AgentClient.connect(
                    vmm.agent_socket, port=trial.agent_port, deadline=deadline
                )
                try:
                    info = await agent.guest_info(timeout=timeout)
                finally:
                    await agent.close()
            return Outcome(candidate, True, time.monotonic() - started,
                           f"guest kernel {info.kernel_release}")
        except TimeoutError:
            return Outcome(candidate, False, time.monotonic() - started,
                           f"the guest did not answer within {timeout:.0f} s")
        except Exception as err:
            return Outcome(candidate, False, time.monotonic() - started, _one_line(err))
        finally:
            await vmm.shutdown(timeout=1.0)


def _scratch_root() -> str:
    # Short: the VM's Unix sockets live in this directory (sun_path is 108 bytes).
    return "/run" if os.access("/run", os.W_OK) else tempfile.gettempdir()


def _one_line(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return text.splitlines()[0][:300]


async def choose(
    config: Config,
    tried: Sequence[Candidate],
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    tcg_timeout: float = TCG_TIMEOUT_S,
    report: Callable[[Outcome], None] = lambda _: None,
) -> list[Outcome]:
    """Boot candidates in order until one works; every outcome, the winner last."""
    outcomes = []
    for candidate in tried:
        limit = tcg_timeout if candidate.accel == "tcg" else timeout
        outcome = await boot(config, candidate, limit)
        report(outcome)
        outcomes.append(outcome)
        if outcome.ok:
            break
    return outcomes

