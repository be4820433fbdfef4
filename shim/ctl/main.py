"""`cloudhvctl`: the command line. Parses, calls one module, renders with rich."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from shim import config as config_mod
from shim.ctl import cache, doctor, pods

CONTAINERD_CONFIGS = (
    Path("/etc/containerd/config.toml"),
    Path("/var/lib/rancher/k3s/agent/etc/containerd/config.toml"),
)
STATUS_STYLE = {doctor.OK: "green", doctor.WARN: "yellow", doctor.FAIL: "red"}


class CtlError(Exception):
    """A one-line error for the user; exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cloudhvctl", description="Inspect and check the cloudhv runtime on this host."
    )
    parser.add_argument("--config", type=Path,
                        help="the shim's config (default: $CLOUDHV_CONFIG or "
                        f"{config_mod.DEFAULT_PATH})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ps = sub.add_parser(
        "ps", help="pod VMs and pooled VMs: VMM pid, vCPUs, memory, containers, uptime"
    )
    ps.add_argument("--json", action="store_true", help="one JSON object per pod")
    ps.add_argument("--no-trunc", action="store_true", help="show whole pod ids")

    console = sub.add_parser("console", help="a pod's guest console log")
    console.add_argument("pod", help="pod id (or a unique prefix of it)")
    console.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")

    cache_p = sub.add_parser("cache", help="the rootfs image cache")
    cache_sub = cache_p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    ls = cache_sub.add_parser("ls", help="list cached images")
    ls.add_argument("--json", action="store_true")
    prune = cache_sub.add_parser("prune", help="remove images no pod uses")
    prune.add_argument("--keep-mib", type=int, default=0,
                       help="keep the most recently used unused images up to this size")

    doc = sub.add_parser("doctor", help="check this host: VMM, accelerator, guest, containerd")
    doc.add_argument("--containerd-config", type=Path, action="append",
                     help="containerd config to check (repeatable; default: "
                     + ", ".join(map(str, CONTAINERD_CONFIGS)) + ")")
    doc.add_argument("--boot", action="store_true",
                     help="also boot a VM with the configured VMM")
    doc.add_argument("--json", action="store_true")

    probe = sub.add_parser("probe", help="find the VMM and accelerator that boot the guest here")
    probe.add_argument("--timeout", type=float, default=10.0,
                       help="seconds an accelerated candidate may take (TCG gets 60)")
    probe.add_argument("--tcg-timeout", type=float, default=60.0)
    probe.add_argument("--write", type=Path,
                       help="write the --config file with the winner set to this path")
    probe.add_argument("--json", action="store_true")

    ctrd = sub.add_parser("containerd", help="register the runtime with containerd")
    ctrd_sub = ctrd.add_subparsers(dest="containerd_command", required=True, metavar="ACTION")
    reg = ctrd_sub.add_parser("register", help="add the cloudhv runtime handler")
    unreg = ctrd_sub.add_parser("unregister", help="remove what register added")
    show = ctrd_sub.add_parser("show", help="print the runtime's TOML tables")
    for action in (reg, unreg):
        action.add_argument("--containerd-config", type=Path, default=CONTAINERD_CONFIGS[0])
        action.add_argument("--drop-in", type=Path, default=None,
                            help="version 3 drop-in (default: conf.d/cloudhv.toml beside it)")
        action.add_argument("--dry-run", action="store_true", help="print the new files only")
    for action in (reg, show):
        action.add_argument("--config-path", type=Path, default=config_mod.DEFAULT_PATH,
                            help="the shim config containerd passes as ConfigPath")
        action.add_argument("--runtime-path", type=Path,
                            help="the shim binary (default: containerd-shim-cloudhv-v1 on PATH)")
    show.add_argument("--version", type=int, choices=(2, 3), required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 200)
    err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
    try:
        return _dispatch(args, out)
    except (CtlError, config_mod.ConfigError, pods.PodNotFound) as error:
        err.print(f"cloudhvctl: {error}", markup=False, highlight=False)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, out: Console) -> int:
    if args.command == "containerd":
        return _containerd(args, out)
    config_path = config_mod.resolve_path(str(args.config) if args.config else None)
    if args.command == "doctor":
        return _doctor(args, config_path, out)
    config = config_mod.load(config_path)
    if args.command == "ps":
        return _ps(config, args, out)
    if args.command == "console":
        return _console(config, args.pod, args.follow)
    if args.command == "cache":
        return _cache(config, args, out)
    if args.command == "probe":
        return _probe(config_path, config, args, out)
    raise CtlError(f"unknown command {args.command}")


def _ps(config: config_mod.Config, args: argparse.Namespace, out: Console) -> int:
    found = pods.list_pods(config.state_dir)
    if args.json:
        for pod in found:
            print(json.dumps(asdict(pod), default=str))
        return 0
    table = Table("POD", "NAMESPACE", "VMM PID", "VCPUS", "MEMORY", "CONTAINERS", "UPTIME",
                  "HOST MEMORY", "POOL", box=None, header_style="bold")
    for pod in found:
        table.add_row(
            pod.pod_id if args.no_trunc else pod.pod_id[:12],
            pod.namespace,
            str(pod.vmm_pid) if pod.running else "-",
            str(pod.vcpus or "-"),
            f"{pod.memory_mib} MiB" if pod.memory_mib else "-",
            str(pod.containers),
            _duration(pod.uptime_s) if pod.running else "not running",
            f"{pod.host_memory_kib / 1024:.1f} MiB",
            pod.pool or "-",
        )
    out.print(table)
    if not found:
        out.print(f"(no pods in {config.state_dir})", highlight=False)
    pooled = [pod for pod in found if pod.pool in ("ready", "booting")]
    if pooled:
        idle = sum(pod.host_memory_kib for pod in pooled) / 1024
        out.print(f"pool: {len(pooled)} VM(s) not taken, {idle:.1f} MiB host memory (PSS)",
                  highlight=False)
    return 0


def _duration(seconds: float) -> str:
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _console(config: config_mod.Config, query: str, follow: bool) -> int:
    pod = pods.find_pod(pods.list_pods(config.state_dir), query)
    path = pods.console_log(pod)
    try:
        handle = open(path, "rb")  # noqa: SIM115 - kept open while following
    except FileNotFoundError:
        raise CtlError(f"pod {pod.pod_id}: no console log at {path} (its VM never booted, "
                       "or was stopped)") from None
    with handle:
        sys.stdout.buffer.write(handle.read())
        sys.stdout.buffer.flush()
        while follow:
            chunk = handle.read()
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
                continue
            if not pod.vm_dir.exists():
                break  # the VM is gone: nothing more will come
            if handle.tell() > path.stat().st_size:
                handle.seek(0)  # cut back to its newer half (shim/vmm/console.py)
            time.sleep(0.2)
    return 0


def _cache(config: config_mod.Config, args: argparse.Namespace, out: Console) -> int:
    if args.cache_command == "prune":
        removed = cache.prune(config.cache_dir, max(0, args.keep_mib) << 20)
        freed = sum(e.size for e in removed)
        out.print(f"removed {len(removed)} image(s), {freed / (1 << 20):.1f} MiB freed",
                  highlight=False)
        return 0
    found = cache.entries(config.cache_dir)
    if args.json:
        for entry in found:
            print(json.dumps(asdict(entry), default=str))
        return 0
    table = Table("IMAGE", "SIZE", "LAST USED", "PODS", box=None, header_style="bold")
    now = time.time()
    for entry in found:
        table.add_row(entry.key[:16], f"{entry.size / (1 << 20):.1f} MiB",
                      f"{_duration(now - entry.last_used)} ago", str(entry.refs))
    out.print(table)
    total = sum(e.size for e in found)
    out.print(f"{len(found)} image(s), {total / (1 << 20):.1f} MiB in {config.cache_dir}",
              highlight=False)
    return 0


def _doctor(args: argparse.Namespace, config_path: Path, out: Console) -> int:
    configs = args.containerd_config or list(CONTAINERD_CONFIGS)
    checks = doctor.run_checks(config_path, configs)
    if args.boot and checks[0].status != doctor.FAIL:
        checks.append(_boot_check(config_mod.load(config_path)))
    if args.json:
        for check in checks:
            print(json.dumps(asdict(check)))
    else:
        table = Table("CHECK", "STATUS", "DETAIL", "FIX", box=None, header_style="bold")
        for check in checks:
            style = STATUS_STYLE[check.status]
            table.add_row(check.name, f"[{style}]{check.status}[/]", check.detail, check.fix)
        out.print(table)
    return 1 if any(c.status == doctor.FAIL for c in checks) else 0


def _boot_check(config: config_mod.Config) -> doctor.Check:
    from shim.ctl import probe

    accel = "kvm" if config.vmm == "cloud-hypervisor" else config.qemu.accel
    binary = config.cloud_hypervisor.binary if config.vmm == "cloud-hypervisor" else (
        config.qemu.binary
    )
    candidate = probe.Candidate(config.vmm, accel, binary)
    limit = probe.TCG_TIMEOUT_S if accel == "tcg" else probe.DEFAULT_TIMEOUT_S
    outcome = asyncio.run(probe.boot(config, candidate, limit))
    if outcome.ok:
        return doctor.Check("boot", doctor.OK, f"{candidate.label}: agent answered in "
                            f"{outcome.seconds:.1f} s ({outcome.detail})")
    return doctor.Check("boot", doctor.FAIL, f"{candidate.label}: {outcome.detail}",
                        "run `cloudhvctl probe --write CONFIG` to find a VMM/accelerator that "
                        "boots here")


def _probe(config_path: Path, config: config_mod.Config, args: argparse.Namespace,
           out: Console) -> int:
    from shim.ctl import probe

    def report(outcome: probe.Outcome) -> None:
        if args.json:
            print(json.dumps({"vmm": outcome.candidate.vmm, "accel": outcome.candidate.accel,
                              "ok": outcome.ok, "seconds": round(outcome.seconds, 2),
                              "detail": outcome.detail}), flush=True)
        else:
            mark = "[green]boots[/]" if outcome.ok else "[red]no[/]"
            out.print(f"probe {outcome.candidate.label}: {mark} ({outcome.seconds:.1f} s: "
                      f"{outcome.detail})", highlight=False)

    tried = probe.candidates(config)
    outcomes = asyncio.run(probe.choose(config, tried, timeout=args.timeout,
                                        tcg_timeout=args.tcg_timeout, report=report))
    winner = outcomes[-1] if outcomes and outcomes[-1].ok else None
    if winner is None:
        raise CtlError("no VMM and accelerator booted the guest: " + "; ".join(
            f"{o.candidate.label}: {o.detail}" for o in outcomes))
    if args.write:
        data: Any = json.loads(config_path.read_text())
        text = json.dumps(probe.apply_json(data, winner.candidate), indent=2) + "\n"
        args.write.write_text(text)
    return 0


def _containerd(args: argparse.Namespace, out: Console) -> int:
    from shim.ctl import containerd as reg

    if args.containerd_command == "show":
        runtime = reg.Runtime(args.config_path, args.runtime_path)
        sys.stdout.write(reg.runtime_tables(args.version, runtime))
        return 0
    main_config: Path = args.containerd_config
    drop_in = args.drop_in or main_config.parent / "conf.d" / "cloudhv.toml"
    try:
        if args.containerd_command == "register":
            runtime = reg.Runtime(args.config_path, args.runtime_path)
            changes = reg.plan_register(main_config, runtime, drop_in=drop_in,
                                        major=reg.binary_major())
        else:
            changes = reg.plan_unregister(main_config, drop_in=drop_in)
        if args.dry_run:
            for change in changes:
                if change.changed:
                    print(f"# {change.path}" + (" (removed)" if change.after is None else ""))
                    sys.stdout.write(change.after or "")
            return 0
        done = reg.apply(changes)
    except reg.RegistrationError as error:
        raise CtlError(str(error)) from None
    verb = "registered" if args.containerd_command == "register" else "unregistered"
    if done:
        out.print(f"{verb} the cloudhv runtime: changed {', '.join(map(str, done))}; restart "
                  "containerd to apply", highlight=False)
    else:
        out.print(f"nothing to change: already {verb}", highlight=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
