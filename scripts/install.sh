#!/usr/bin/env bash
# Installs the cloudhv runtime from this checkout; the clone can be deleted afterwards.
#
#   <prefix>/venv              the shim as a Python package (pip install .), with cloudhvctl
#   <bindir>                   containerd-shim-cloudhv-v1 and cloudhvctl (symlinks into the venv)
#   <datadir>                  the guest: vmlinux and rootfs.ext4
#   <sysconfdir>/config.json   the shim's config: VMM and accelerator chosen by a probe boot
#   <prefix>/manifest          what was installed, for scripts/uninstall.sh
#
# Prints what it installed as shell assignments on stdout (CLOUDHV_SHIM_BIN, CLOUDHV_CTL,
# CLOUDHV_CONFIG, and CLOUDHV_VENV for the build venv); everything else goes to stderr.
#
# Idempotent: a second run finds everything cached and changes nothing. A config.json
# you edited is never overwritten: the new one goes to config.json.new, with a notice.
# Steps that need the network (Debian and PyPI packages) run only when something is missing.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/install.sh [options]
  --prefix DIR             venv, manifest and probe result (default /opt/cloudhv)
  --bindir DIR             where the two commands are linked (default /usr/local/bin)
  --datadir DIR            guest kernel and rootfs (default /usr/share/cloudhv)
  --sysconfdir DIR         config.json (default /etc/cloudhv)
  --state-dir DIR          the config's state_dir (default /run/cloudhv)
  --disk-dir DIR           the config's disk_dir (default /var/lib/cloudhv/disks)
  --cache-dir DIR          the config's cache_dir (default /var/cache/cloudhv/rootfs)
  --configure-containerd   register the cloudhv runtime handler with containerd
  --containerd-config FILE containerd's config (default /etc/containerd/config.toml)
  --reprobe                boot-probe the VMM and accelerator again (cached otherwise)
  --build-only             install build dependencies and build the guest and the shim
                           (cached); print their paths as shell assignments; install nothing
  --no-deps                do not run scripts/setup.sh (everything must be present)
  --from-payload DIR       install from a payload made by scripts/make-payload.sh (wheels
                           and the guest; no build, no network): the Kubernetes installer
  --k3s                    register through k3s' containerd template instead of
                           --containerd-config (with --configure-containerd)
EOF
}

PREFIX=/opt/cloudhv
BINDIR=/usr/local/bin
DATADIR=/usr/share/cloudhv
SYSCONFDIR=/etc/cloudhv
STATE_DIR=/run/cloudhv
DISK_DIR=/var/lib/cloudhv/disks
CACHE_DIR=/var/cache/cloudhv/rootfs
CONFIGURE_CONTAINERD=0
CONTAINERD_CONFIG=/etc/containerd/config.toml
REPROBE=0
BUILD_ONLY=0
DEPS=1
PAYLOAD=""
K3S=0
ARGS=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX=$2; shift ;;
    --bindir) BINDIR=$2; shift ;;
    --datadir) DATADIR=$2; shift ;;
    --sysconfdir) SYSCONFDIR=$2; shift ;;
    --state-dir) STATE_DIR=$2; shift ;;
    --disk-dir) DISK_DIR=$2; shift ;;
    --cache-dir) CACHE_DIR=$2; shift ;;
    --configure-containerd) CONFIGURE_CONTAINERD=1 ;;
    --containerd-config) CONTAINERD_CONFIG=$2; shift ;;
    --reprobe) REPROBE=1 ;;
    --build-only) BUILD_ONLY=1 ;;
    --no-deps) DEPS=0 ;;
    --from-payload) PAYLOAD=$(cd "$2" && pwd); shift ;;
    --k3s) K3S=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null; then
    exec sudo -E bash "$0" "${ARGS[@]}"
  fi
  echo "install.sh: must run as root (QEMU, containerd and /usr/local need it), and sudo" \
       "is not installed: run it as root" >&2
  exit 1
fi

say() { echo "== $*" >&2; }
t0=$(date +%s)
if [ -n "$PAYLOAD" ]; then
  # Everything was built where the payload was made: wheels, guest, config template.
  CLOUDHV_KERNEL="$PAYLOAD/vmlinux"
  CLOUDHV_ROOTFS="$PAYLOAD/rootfs.ext4"
  TEMPLATE="$PAYLOAD/cloudhv.json"
  say "[1-2/6] from the payload in $PAYLOAD (nothing to build)"
else
  REPO=$(cd "$(dirname "$0")/.." && pwd)
  cd "$REPO"
  TEMPLATE="$REPO/config/cloudhv.json"
  if [ "$DEPS" = 1 ]; then
    say "[1/6] build dependencies (Debian packages, a build venv; cached)"
    BUILD_VENV=$(bash scripts/setup.sh)
  else
    BUILD_VENV=${CLOUDHV_VENV:-$(readlink -f /var/cache/cloudhv/venv)}
  fi
  export CLOUDHV_VENV="$BUILD_VENV"
  say "[2/6] guest kernel, rootfs and shim (cached by input hash)"
  artifacts=$(bash scripts/build.sh)  # a failed build stops the script here
  eval "$artifacts"
  if [ "$BUILD_ONLY" = 1 ]; then
    echo "CLOUDHV_VENV=$BUILD_VENV"
    echo "$artifacts"
    exit 0
  fi
fi

# From here on, stdout carries only the final assignments (fd 3); all else is stderr.
exec 3>&1 >&2
t1=$(date +%s)
MANIFEST="$PREFIX/manifest"
VENV="$PREFIX/venv"
install -d -m 0755 "$PREFIX" "$BINDIR" "$DATADIR" "$SYSCONFDIR"
touch "$MANIFEST"
record() {  # remember an installed path for uninstall.sh (once)
  grep -qxF "$1" "$MANIFEST" || echo "$1" >> "$MANIFEST"
}

say "[3/6] the shim package into $VENV"
# What pip would install: the package's sources (the generated protobuf modules too),
# or the payload's wheels.
if [ -n "$PAYLOAD" ]; then
  src_hash=$(sha256sum "$PAYLOAD"/wheels/* | sha256sum | cut -c1-16)
else
  src_hash=$(find shim proto pyproject.toml -type f ! -name '*.pyc' ! -path '*/__pycache__/*' \
               -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
fi
if [ -f "$VENV/.source-hash" ] && [ "$(cat "$VENV/.source-hash")" = "$src_hash" ]; then
  echo "package: cached ($src_hash)" >&2
else
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" || {
    echo "install.sh: cannot create a venv with $(command -v python3 || echo 'no python3'):" \
         "install python3 (3.11 or newer) and python3-venv" >&2; exit 1; }
  if [ -n "$PAYLOAD" ]; then
    pip_args=(--no-index --find-links "$PAYLOAD/wheels" containerd-shim-cloudhv)
  else
    # Build metadata stays out of the checkout (a read-only or shared clone still installs).
    work=$(mktemp -d)
    cp -a pyproject.toml shim proto "$work/"
    find "$work" -name __pycache__ -prune -exec rm -rf {} +
    pip_args=(-c scripts/requirements.txt "$work")
  fi
  set +e
  # (This host's pip config names local mirrors that may be absent: not worth a warning each.)
  "$VENV/bin/pip" install -q --disable-pip-version-check "${pip_args[@]}" \
    2>&1 | grep -v "^WARNING: Location 'file:" >&2
  pip_status=${PIPESTATUS[0]}
  set -e
  [ -z "${work:-}" ] || rm -rf "$work"
  if [ "$pip_status" != 0 ]; then
    echo "install.sh: pip install failed (see above)" >&2
    exit 1
  fi
  "$VENV/bin/python" -I -c "import shim._pb.agent_pb2, shim.cli, shim.ctl.main" \
    || { echo "install.sh: the installed package is incomplete" >&2; exit 1; }
  echo "$src_hash" > "$VENV/.source-hash"
  echo "package: installed ($src_hash)" >&2
fi
record "$VENV"

say "[4/6] guest artifacts into $DATADIR, commands into $BINDIR"
put() {  # src dst: copy unless identical, atomically
  if ! cmp -s "$1" "$2"; then
    install -m 0644 "$1" "$2.tmp.$$" && mv -f "$2.tmp.$$" "$2"
    echo "installed $2" >&2
  fi
  record "$2"
}
put "$CLOUDHV_KERNEL" "$DATADIR/vmlinux"
put "$CLOUDHV_ROOTFS" "$DATADIR/rootfs.ext4"
VSOCK_BACKEND=/usr/bin/vhost-device-vsock
if [ -n "$PAYLOAD" ] && [ ! -x "$VSOCK_BACKEND" ] && [ -x "$PAYLOAD/bin/vhost-device-vsock" ]; then
  install -d -m 0755 "$PREFIX/bin"
  put "$PAYLOAD/bin/vhost-device-vsock" "$PREFIX/bin/vhost-device-vsock"
  chmod 0755 "$PREFIX/bin/vhost-device-vsock"
  record "$PREFIX/bin"
  VSOCK_BACKEND="$PREFIX/bin/vhost-device-vsock"
fi
# containerd runs the shim binary twice per container: it starts the interpreter and
# hands the invocation to the shared parent (shim/entry.py), so it is kept leaner than
# pip's console script (which imports re, and reads the user site).
launcher=$(mktemp)
printf '#!%s -sE\nimport sys\nfrom shim.entry import main\nsys.exit(main())\n' \
  "$VENV/bin/python" > "$launcher"
[ -L "$BINDIR/containerd-shim-cloudhv-v1" ] && rm -f "$BINDIR/containerd-shim-cloudhv-v1"
put "$launcher" "$BINDIR/containerd-shim-cloudhv-v1"
chmod 0755 "$BINDIR/containerd-shim-cloudhv-v1"
rm -f "$launcher"
ln -sfn "$VENV/bin/cloudhvctl" "$BINDIR/cloudhvctl"
record "$BINDIR/cloudhvctl"
record "$DATADIR"
# uninstall.sh must outlive the checkout.
install -m 0755 "$(dirname "$0")/uninstall.sh" "$PREFIX/uninstall.sh"
record "$PREFIX/uninstall.sh"

say "[5/6] $SYSCONFDIR/config.json (VMM and accelerator from a probe boot)"
base=$(mktemp)
trap 'rm -f "$base" "$base.chosen"' EXIT
"$VENV/bin/python" - "$TEMPLATE" "$base" <<PY
import json, sys
data = json.load(open(sys.argv[1]))
data.update(kernel_path="$DATADIR/vmlinux", rootfs_path="$DATADIR/rootfs.ext4",
            state_dir="$STATE_DIR", disk_dir="$DISK_DIR", cache_dir="$CACHE_DIR")
data.setdefault("qemu", {})["vsock_backend"] = "$VSOCK_BACKEND"
open(sys.argv[2], "w").write(json.dumps(data, indent=2) + "\n")
PY
# The answer depends on the guest, the VMMs and the host: keyed by all of them.
probe_key=$( {
  cat "$base"; sha256sum "$DATADIR/vmlinux" "$DATADIR/rootfs.ext4"; uname -r
  ls -l /dev/kvm /dev/mshv 2>/dev/null || true
  command -v cloud-hypervisor && cloud-hypervisor --version 2>/dev/null || true
  /usr/bin/qemu-system-x86_64 --version 2>/dev/null | head -1 || true
} | sha256sum | cut -c1-16)
PROBE="$PREFIX/probe/$probe_key.json"
if [ "$REPROBE" = 1 ] || [ ! -f "$PROBE" ]; then
  "$VENV/bin/cloudhvctl" --config "$base" probe --write "$base.chosen" >&2
  rm -rf "$PREFIX/probe" && mkdir -p "$PREFIX/probe"
  mv "$base.chosen" "$PROBE"
else
  echo "probe: cached ($(grep -o '"accel": "[a-z]*"' "$PROBE" | head -1), key $probe_key)" >&2
fi
record "$PREFIX/probe"
CONFIG="$SYSCONFDIR/config.json"
STAMP="$PREFIX/config.sha256"  # the config as this installer last wrote it
if [ ! -f "$CONFIG" ]; then
  install -m 0644 "$PROBE" "$CONFIG"
  sha256sum < "$CONFIG" > "$STAMP"
  echo "wrote $CONFIG" >&2
elif cmp -s "$PROBE" "$CONFIG"; then
  sha256sum < "$CONFIG" > "$STAMP"
  echo "config: unchanged" >&2
elif [ -f "$STAMP" ] && [ "$(sha256sum < "$CONFIG")" = "$(cat "$STAMP")" ]; then
  install -m 0644 "$PROBE" "$CONFIG.tmp.$$" && mv -f "$CONFIG.tmp.$$" "$CONFIG"
  sha256sum < "$CONFIG" > "$STAMP"
  echo "updated $CONFIG (it had not been edited since the last install)" >&2
else
  install -m 0644 "$PROBE" "$CONFIG.new"
  record "$CONFIG.new"
  echo "NOTICE: $CONFIG was edited since it was installed and is kept as it is." >&2
  echo "NOTICE: this installer's version is $CONFIG.new: compare them with" >&2
  echo "NOTICE:   diff -u $CONFIG $CONFIG.new" >&2
fi
record "$CONFIG"
record "$STAMP"
# Made by the shim as pods run; uninstall.sh removes them once no pod uses them.
for dir in "$STATE_DIR" "$DISK_DIR" "$CACHE_DIR"; do
  record "runtime-dir $dir"
done

say "[6/6] containerd"
if [ "$CONFIGURE_CONTAINERD" = 1 ]; then
  [ "$K3S" = 0 ] || CONTAINERD_CONFIG=/var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl
  "$VENV/bin/cloudhvctl" containerd register --containerd-config "$CONTAINERD_CONFIG" \
    --config-path "$CONFIG" --runtime-path "$BINDIR/containerd-shim-cloudhv-v1" >&2
  grep -qxF "containerd-config $CONTAINERD_CONFIG" "$MANIFEST" \
    || echo "containerd-config $CONTAINERD_CONFIG" >> "$MANIFEST"
else
  echo "not registered with containerd (pass --configure-containerd, or see docs/configuration.md)" >&2
fi
t2=$(date +%s)
echo "install: done in $(( t2 - t0 ))s (dependencies and builds $(( t1 - t0 ))s, installing" \
     "$(( t2 - t1 ))s); check the host with: $BINDIR/cloudhvctl doctor" >&2
{
  echo "CLOUDHV_SHIM_BIN=$BINDIR/containerd-shim-cloudhv-v1"
  echo "CLOUDHV_CTL=$BINDIR/cloudhvctl"
  echo "CLOUDHV_CONFIG=$CONFIG"
  [ -z "${CLOUDHV_VENV:-}" ] || echo "CLOUDHV_VENV=$CLOUDHV_VENV"
} >&3
