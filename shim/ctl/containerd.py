"""Registering the `cloudhv` runtime handler with containerd, and finding it again.

containerd's config has two shapes, told apart by its `version` key:

- version 2 (containerd 1.6, 1.7): the CRI plugin is `io.containerd.grpc.v1.cri`.
  An imported file replaces a plugin's whole section there (containerd issue
  5837), so a drop-in holding only our runtime would wipe the node's CRI settings.
  The runtime's tables go into config.toml itself instead, as one marked block
  that unregistering removes again.
- version 3 (containerd 2.x): the runtimes live under
  `io.containerd.cri.v1.runtime`, and imports merge plugin sections key by key, so
  the tables go into a drop-in file that config.toml `imports`.

- k3s writes containerd's config itself, from `config.toml.tmpl` when that exists:
  the template is k3s' own (`{{ template "base" . }}`) followed by our block, in
  the version of the config k3s generated last (k3s 1.31 and later: version 3).

Edits are textual (comments and layout survive), each checked by parsing the
result: the edited file must mean exactly the old one plus our tables. A file
this cannot edit safely is left alone, with an error saying what to add by hand.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import subprocess
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUNTIME_TYPE = "io.containerd.cloudhv.v1"
HANDLER = "cloudhv"
POD_ANNOTATIONS = ("io.cloudhv.*", "io.katacontainers.*")
CONTAINER_ANNOTATIONS = ("io.cloudhv.container.*",)
CRI_V2 = "io.containerd.grpc.v1.cri"
CRI_V3 = "io.containerd.cri.v1.runtime"
BEGIN = "# BEGIN cloudhv runtime (managed: `cloudhvctl containerd unregister` removes it)"
END = "# END cloudhv runtime"
DROP_IN = Path("/etc/containerd/conf.d/cloudhv.toml")
K3S_TEMPLATE = Path("/var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl")
K3S_BASE = '{{ template "base" . }}\n'


class RegistrationError(Exception):
    """containerd's config could not be read or edited safely; the message says why."""


@dataclass(frozen=True)
class Runtime:
    config_path: Path  # our config.json, passed as the CRI option ConfigPath
    runtime_path: Path | None = None  # the shim binary; None: containerd looks on PATH
    handler: str = HANDLER


def runtime_tables(version: int, runtime: Runtime) -> str:
    """The TOML tables registering the handler, for a config of `version`."""
    if version == 2:
        base = f'plugins."{CRI_V2}".containerd.runtimes.{runtime.handler}'
    elif version == 3:
        base = f"plugins.'{CRI_V3}'.containerd.runtimes.{runtime.handler}"
    else:
        raise RegistrationError(f"containerd config version {version} is not supported (2 or 3)")
    lines = [f"[{base}]", f'  runtime_type = "{RUNTIME_TYPE}"']
    if runtime.runtime_path is not None:
        lines.append(f"  runtime_path = {_toml_str(str(runtime.runtime_path))}")
    pod = ", ".join(f'"{a}"' for a in POD_ANNOTATIONS)
    container = ", ".join(f'"{a}"' for a in CONTAINER_ANNOTATIONS)
    lines += [
        f"  pod_annotations = [{pod}]",
        f"  container_annotations = [{container}]",
        f"[{base}.options]",
        f"  ConfigPath = {_toml_str(str(runtime.config_path))}",
    ]
    return "\n".join(lines) + "\n"


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_version(text: str, source: str, binary_major: int | None = None) -> int:
    """The version of a containerd config; a file without `version` is what the binary
    defaults to (1 before containerd 2, which we refuse)."""
    data = _parse(text, source)
    version = data.get("version")
    if version is None:
        if binary_major is not None and binary_major >= 2:
            return 3
        raise RegistrationError(
            f"{source}: has no `version` key, so containerd 1.x reads it as version 1, which "
            "cloudhv does not support: add `version = 2` at its top (see `containerd config "
            "migrate`) and run again"
        )
    if version not in (2, 3):
        raise RegistrationError(f"{source}: config version {version!r} is not supported (2 or 3)")
    return int(version)


def binary_major(containerd: str = "containerd") -> int | None:
    """The major version of the containerd binary, or None if it is not installed."""
    try:
        out = subprocess.run(
            [containerd, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\s v?(\d+)\.(\d+)", out)
    return int(match.group(1)) if match else None


def _parse(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise RegistrationError(f"{source}: not valid TOML: {err}") from None


# -- registering -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    path: Path
    before: str | None  # None: the file did not exist
    after: str | None  # None: the file is removed

    @property
    def changed(self) -> bool:
        return self.before != self.after


def plan_register(
    main: Path, runtime: Runtime, *, drop_in: Path = DROP_IN, major: int | None = None
) -> list[Change]:
    """The file changes that register `runtime` in the containerd config at `main` (pure
    but for reading the files). Already registered the same way: no change."""
    if main.name.endswith(".tmpl"):
        return [_k3s_register(main, runtime)]
    before = _read(main)
    if before is None:
        version = 3 if (major or 1) >= 2 else 2
        if version == 2:
            text = f"version = 2\n\n{_block(runtime_tables(2, runtime))}"
            return [Change(main, None, text)]
        text = f"version = 3\nimports = [{_toml_str(str(drop_in))}]\n"
        return [Change(main, None, text), _drop_in_change(drop_in, runtime)]
    version = config_version(before, str(main), major)
    if version == 2:
        stripped = strip_block(before)
        after = stripped.rstrip("\n") + "\n\n" + _block(runtime_tables(2, runtime))
        _check_adds_only(stripped, after, main, runtime)
        return [Change(main, before, after)]
    after = add_import(before, drop_in, str(main))
    changes = [Change(main, before, after), _drop_in_change(drop_in, runtime)]
    return changes


def _k3s_register(template: Path, runtime: Runtime) -> Change:
    generated = template.with_name(template.name.removesuffix(".tmpl"))
    text = _read(generated)
    if text is None:
        raise RegistrationError(
            f"{generated}: missing; start k3s once so that it writes containerd's config, "
            "then run this again"
        )
    version = config_version(text, str(generated), 2)
    before = _read(template)
    kept = strip_block(before) if before is not None else K3S_BASE
    if "{{ template \"base\"" not in kept and "{{template \"base\"" not in kept:
        raise RegistrationError(
            f"{template}: a custom template without k3s' base template; add this to it by "
            f"hand:\n{runtime_tables(version, runtime)}"
        )
    after = kept.rstrip("\n") + "\n\n" + _block(runtime_tables(version, runtime))
    return Change(template, before, after)


def _drop_in_change(drop_in: Path, runtime: Runtime) -> Change:
    text = (
        "# Registers the cloudhv runtime handler; imported by containerd's config.toml.\n"
        "version = 3\n\n" + runtime_tables(3, runtime)
    )
    return Change(drop_in, _read(drop_in), text)


def plan_unregister(main: Path, *, drop_in: Path = DROP_IN) -> list[Change]:
    """The changes undoing `plan_register`; nothing for a config we never touched."""
    if main.name.endswith(".tmpl"):
        text = _read(main)
        if text is None:
            return []
        kept = strip_block(text)
        # The template was ours alone: without our block k3s' default is the same thing.
        return [Change(main, text, None if kept.strip() == K3S_BASE.strip() else kept)]
    changes = []
    before = _read(main)
    if before is not None:
        after = remove_import(strip_block(before), drop_in, str(main))
        if after != before:
            changes.append(Change(main, before, after))
    if drop_in.exists():
        changes.append(Change(drop_in, _read(drop_in), None))
    return changes


def apply(changes: list[Change]) -> list[Path]:
    """Write the changes (each atomically, keeping the mode); returns the files changed."""
    done = []
    for change in changes:
        if not change.changed:
            continue
        if change.after is None:
            change.path.unlink(missing_ok=True)
        else:
            change.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = change.path.with_name(f".{change.path.name}.cloudhv-tmp")
            tmp.write_text(change.after)
            if change.before is not None:
                os.chmod(tmp, change.path.stat().st_mode & 0o7777)
            else:
                os.chmod(tmp, 0o644)
            os.replace(tmp, change.path)
        done.append(change.path)
    return done


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise RegistrationError(f"{path}: cannot read: {err.strerror}") from None


def _block(tables: str) -> str:
    return f"{BEGIN}\n{tables}{END}\n"


def strip_block(text: str) -> str:
    """`text` without our marked block (and the blank line we put before it)."""
    pattern = re.compile(r"\n*" + re.escape(BEGIN) + r"\n.*?" + re.escape(END) + r"\n?", re.S)
    stripped = pattern.sub("\n", text)
    return stripped if stripped != "\n" else ""


def _check_adds_only(stripped: str, after: str, main: Path, runtime: Runtime) -> None:
    old = _parse(stripped, str(main))
    handler = runtime.handler
    runtimes = old.get("plugins", {}).get(CRI_V2, {}).get("containerd", {}).get("runtimes", {})
    if handler in runtimes:
        raise RegistrationError(
            f"{main}: already defines the runtime {handler!r} outside cloudhv's block; remove "
            "it or register under another handler name"
        )
    try:
        new = tomllib.loads(after)
    except tomllib.TOMLDecodeError as err:
        raise RegistrationError(
            f"{main}: adding the runtime's tables would make it invalid TOML ({err}); add this "
            f"by hand:\n{runtime_tables(2, runtime)}"
        ) from None
    new["plugins"][CRI_V2]["containerd"]["runtimes"].pop(handler)
    if _without_empty(new) != _without_empty(old):
        raise RegistrationError(f"{main}: adding the runtime's tables would change other keys")


def _without_empty(table: Mapping[str, Any]) -> dict[str, Any]:
    """`table` without empty sub-tables (our block may create empty parents)."""
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            value = _without_empty(value)
            if not value:
                continue
        out[key] = value
    return out


_IMPORTS = re.compile(r"^imports\s*=\s*\[(?P<body>[^\]]*)\]", re.M)


def add_import(text: str, drop_in: Path, source: str) -> str:
    """config.toml with `drop_in` in its top-level `imports` (unchanged if an entry,
    glob or not, already covers it)."""
    data = _parse(text, source)
    imports = data.get("imports", [])
    if not isinstance(imports, list):
        raise RegistrationError(f"{source}: `imports` is not a list")
    base = Path(source).parent
    if any(_covers(str(entry), drop_in, base) for entry in imports):
        return text
    entry = _toml_str(str(drop_in))
    match = _top_level_imports(text)
    if match is None:
        if "imports" in data:
            raise RegistrationError(
                f"{source}: cannot edit its `imports`; add {entry} to it by hand"
            )
        lines = text.splitlines(keepends=True)
        at = next((i + 1 for i, line in enumerate(lines) if line.startswith("version")), 0)
        lines.insert(at, f"imports = [{entry}]\n")
        after = "".join(lines)
    else:
        body = match.group("body").strip()
        joined = f"{body.rstrip(',')}, {entry}" if body else entry
        after = text[: match.start("body")] + joined + text[match.end("body") :]
    if _parse(after, source) != {**data, "imports": [*imports, str(drop_in)]}:
        raise RegistrationError(f"{source}: cannot edit its `imports`; add {entry} to it by hand")
    return after


def remove_import(text: str, drop_in: Path, source: str) -> str:
    data = _parse(text, source) if text.strip() else {}
    imports = data.get("imports", [])
    if not isinstance(imports, list) or str(drop_in) not in imports:
        return text
    match = _top_level_imports(text)
    if match is None:
        raise RegistrationError(f"{source}: cannot edit its `imports`; remove {drop_in} by hand")
    kept = [e for e in imports if e != str(drop_in)]
    if kept:
        body = ", ".join(map(_toml_str, kept))
        after = text[: match.start("body")] + body + text[match.end("body") :]
    else:
        line_end = text.find("\n", match.end())
        after = text[: match.start()] + text[(line_end + 1) if line_end >= 0 else match.end() :]
    expected = {k: v for k, v in data.items() if k != "imports"}
    if kept:
        expected["imports"] = kept
    if _parse(after, source) != expected:
        raise RegistrationError(f"{source}: cannot edit its `imports`; remove {drop_in} by hand")
    return after


def _top_level_imports(text: str) -> re.Match[str] | None:
    first_table = re.search(r"^\s*\[", text, re.M)
    match = _IMPORTS.search(text)
    if match is None or (first_table is not None and match.start() > first_table.start()):
        return None
    return match


def _covers(entry: str, drop_in: Path, base: Path) -> bool:
    path = entry if os.path.isabs(entry) else str(base / entry)
    if "*" in path:
        return fnmatch.fnmatch(str(drop_in), path)
    return os.path.normpath(path) == os.path.normpath(str(drop_in))


# -- finding a registration ------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    file: Path
    version: int
    handler: str
    options: Mapping[str, Any]
    runtime_path: str


def find_registrations(main: Path) -> list[Found]:
    """Every runtime of type io.containerd.cloudhv.v1 in `main` and the files it imports."""
    found: list[Found] = []
    pending, seen = [main], set()
    root_version = 0
    while pending:
        path = pending.pop(0)
        if path in seen:
            continue
        seen.add(path)
        text = _read(path)
        if text is None:
            continue
        data = _parse(text, str(path))
        version = int(data.get("version", root_version or 1))
        root_version = root_version or version
        plugin = CRI_V2 if version == 2 else CRI_V3
        runtimes = data.get("plugins", {}).get(plugin, {}).get("containerd", {}).get("runtimes", {})
        for name, table in runtimes.items():
            if isinstance(table, dict) and table.get("runtime_type") == RUNTIME_TYPE:
                found.append(Found(path, version, name, table.get("options", {}),
                                   str(table.get("runtime_path", ""))))
        for entry in data.get("imports", []) or []:
            full = entry if os.path.isabs(entry) else str(path.parent / entry)
            pending += [Path(p) for p in sorted(glob.glob(full))] if "*" in full else [Path(full)]
    return found
