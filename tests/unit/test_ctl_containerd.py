"""Registering the runtime in containerd's config: version 2 in place, version 3 through
imports; idempotent; undone exactly; never a change to anything else."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from shim.ctl import containerd as reg

DEBIAN_1_6 = """\
version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"""

V3 = """\
# a comment that must survive
version = 3
root = "/var/lib/containerd"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
"""

RUNTIME = reg.Runtime(
    Path("/etc/cloudhv/config.json"), Path("/usr/local/bin/containerd-shim-cloudhv-v1")
)


def _register(main: Path, drop_in: Path, major: int | None = None) -> list[Path]:
    return reg.apply(reg.plan_register(main, RUNTIME, drop_in=drop_in, major=major))


def test_version_2_gets_the_tables_in_place(tmp_path: Path) -> None:
    main = tmp_path / "config.toml"
    main.write_text(DEBIAN_1_6)
    assert _register(main, tmp_path / "conf.d" / "cloudhv.toml") == [main]
    data = tomllib.loads(main.read_text())
    cri = data["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["cni"]["bin_dir"] == "/usr/lib/cni"  # the node's settings are kept
    runtime = cri["containerd"]["runtimes"]["cloudhv"]
    assert runtime == {
        "runtime_type": "io.containerd.cloudhv.v1",
        "runtime_path": "/usr/local/bin/containerd-shim-cloudhv-v1",
        "pod_annotations": ["io.cloudhv.*", "io.katacontainers.*"],
        "container_annotations": ["io.cloudhv.container.*"],
        "options": {"ConfigPath": "/etc/cloudhv/config.json"},
    }
    assert main.read_text().startswith(DEBIAN_1_6)
    # Idempotent: the same registration again changes nothing.
    assert _register(main, tmp_path / "conf.d" / "cloudhv.toml") == []
    found = reg.find_registrations(main)
    assert [(f.handler, f.version) for f in found] == [("cloudhv", 2)]
    # Undone byte for byte.
    reg.apply(reg.plan_unregister(main, drop_in=tmp_path / "conf.d" / "cloudhv.toml"))
    assert main.read_text() == DEBIAN_1_6
    assert reg.find_registrations(main) == []


def test_version_3_goes_through_imports(tmp_path: Path) -> None:
    main = tmp_path / "config.toml"
    drop_in = tmp_path / "conf.d" / "cloudhv.toml"
    main.write_text(V3)
    assert _register(main, drop_in) == [main, drop_in]
    data = tomllib.loads(main.read_text())
    assert data["imports"] == [str(drop_in)]
    assert "# a comment that must survive" in main.read_text()
    added = tomllib.loads(drop_in.read_text())
    assert added["version"] == 3
    runtime = added["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["cloudhv"]
    assert runtime["runtime_type"] == "io.containerd.cloudhv.v1"
    assert runtime["options"] == {"ConfigPath": "/etc/cloudhv/config.json"}
    assert [(f.file, f.version) for f in reg.find_registrations(main)] == [(drop_in, 3)]
    assert _register(main, drop_in) == []
    reg.apply(reg.plan_unregister(main, drop_in=drop_in))
    assert main.read_text() == V3 and not drop_in.exists()


def test_version_3_import_glob_already_covers_the_drop_in(tmp_path: Path) -> None:
    main = tmp_path / "config.toml"
    drop_in = tmp_path / "conf.d" / "cloudhv.toml"
    text = f"version = 3\nimports = ['{tmp_path}/conf.d/*.toml']\n"
    main.write_text(text)
    assert _register(main, drop_in) == [drop_in]
    assert main.read_text() == text


def test_existing_imports_list_is_extended(tmp_path: Path) -> None:
    main = tmp_path / "config.toml"
    drop_in = tmp_path / "cloudhv.toml"
    main.write_text('version = 3\nimports = ["/etc/other.toml"]\n[plugins]\n')
    _register(main, drop_in)
    assert tomllib.loads(main.read_text())["imports"] == ["/etc/other.toml", str(drop_in)]
    reg.apply(reg.plan_unregister(main, drop_in=drop_in))
    assert main.read_text() == 'version = 3\nimports = ["/etc/other.toml"]\n[plugins]\n'


def test_no_config_yet(tmp_path: Path) -> None:
    main = tmp_path / "etc" / "config.toml"
    drop_in = tmp_path / "etc" / "conf.d" / "cloudhv.toml"
    assert _register(main, drop_in, major=1) == [main]
    assert tomllib.loads(main.read_text())["version"] == 2
    main.unlink()
    assert _register(main, drop_in, major=2) == [main, drop_in]
    assert tomllib.loads(main.read_text())["imports"] == [str(drop_in)]


def test_refusals_name_the_problem(tmp_path: Path) -> None:
    main = tmp_path / "config.toml"
    main.write_text("[plugins]\n")
    with pytest.raises(reg.RegistrationError, match="no `version` key.*version 1"):
        reg.plan_register(main, RUNTIME, drop_in=tmp_path / "d.toml", major=1)
    main.write_text("version = 2\n[plugins.'io.containerd.grpc.v1.cri'.containerd.runtimes."
                    "cloudhv]\nruntime_type = 'io.containerd.runc.v2'\n")
    with pytest.raises(reg.RegistrationError, match="already defines the runtime 'cloudhv'"):
        reg.plan_register(main, RUNTIME, drop_in=tmp_path / "d.toml")
    main.write_text("version = 2\nthis is not toml\n")
    with pytest.raises(reg.RegistrationError, match="not valid TOML"):
        reg.plan_register(main, RUNTIME, drop_in=tmp_path / "d.toml")
    main.write_text("version = 7\n")
    with pytest.raises(reg.RegistrationError, match="version 7 is not supported"):
        reg.plan_register(main, RUNTIME, drop_in=tmp_path / "d.toml")


def test_shown_tables_parse() -> None:
    for version, plugin in ((2, reg.CRI_V2), (3, reg.CRI_V3)):
        tables = tomllib.loads(reg.runtime_tables(version, reg.Runtime(Path('/a "b"/c.json'))))
        runtime = tables["plugins"][plugin]["containerd"]["runtimes"]["cloudhv"]
        assert runtime["options"]["ConfigPath"] == '/a "b"/c.json'
        assert "runtime_path" not in runtime


def test_k3s_template(tmp_path: Path) -> None:
    template = tmp_path / "config.toml.tmpl"
    with pytest.raises(reg.RegistrationError, match="start k3s once"):
        reg.plan_register(template, RUNTIME)
    (tmp_path / "config.toml").write_text('version = 3\n[plugins."io.containerd.cri.v1.images"]\n')
    assert reg.apply(reg.plan_register(template, RUNTIME)) == [template]
    text = template.read_text()
    assert text.startswith(reg.K3S_BASE)
    tables = tomllib.loads(text.split(reg.BEGIN + "\n")[1].split(reg.END)[0])
    assert tables["plugins"][reg.CRI_V3]["containerd"]["runtimes"]["cloudhv"]["runtime_type"] == (
        "io.containerd.cloudhv.v1")
    assert reg.apply(reg.plan_register(template, RUNTIME)) == []  # idempotent
    reg.apply(reg.plan_unregister(template))
    assert not template.exists()  # it was ours alone
    # A template of the user's own keeps everything but our block.
    own = reg.K3S_BASE + "\n[plugins.'io.containerd.cri.v1.runtime'.cni]\n  bin_dir = '/x'\n"
    template.write_text(own)
    reg.apply(reg.plan_register(template, RUNTIME))
    reg.apply(reg.plan_unregister(template))
    assert template.read_text().rstrip("\n") == own.rstrip("\n")
    # k3s before 1.31 generates version 2.
    (tmp_path / "config.toml").write_text('version = 2\n')
    template.unlink()
    reg.apply(reg.plan_register(template, RUNTIME))
    assert f'plugins."{reg.CRI_V2}".containerd.runtimes.cloudhv' in template.read_text()
