#!/usr/bin/env bash
# From a fresh Debian 12 machine (as root): install what is missing, build the guest
# kernel, rootfs and shim, install them, then run a container in its own microVM
# with `ctr run --runtime io.containerd.cloudhv.v1` and print what it printed.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"

echo "== installing dependencies (idempotent)"
VENV=$(bash scripts/setup.sh)
# The build and the tests use this venv, whatever /var/cache/cloudhv/venv points at.
export CLOUDHV_VENV="$VENV"
echo "== building the guest and the shim (cached by input hash)"
artifacts=$(bash scripts/build.sh)  # fails the script if a build fails
eval "$artifacts"

echo "== installing into /usr/share/cloudhv, /etc/cloudhv and /usr/local/bin"
install -d -m 0755 /usr/share/cloudhv /etc/cloudhv
install -m 0644 "$CLOUDHV_KERNEL" /usr/share/cloudhv/vmlinux
install -m 0644 "$CLOUDHV_ROOTFS" /usr/share/cloudhv/rootfs.ext4
if [ ! -f /etc/cloudhv/config.json ]; then
  install -m 0644 config/cloudhv.json /etc/cloudhv/config.json
fi
ln -sfn "$CLOUDHV_SHIM" /usr/local/bin/containerd-shim-cloudhv-v1

echo "== running a container in a microVM"
PYTHONPATH="$REPO" "$VENV/bin/python" scripts/demo.py "$@"
