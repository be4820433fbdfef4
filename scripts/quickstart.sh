#!/usr/bin/env bash
# From a fresh Debian 12 machine (as root): install the runtime (scripts/install.sh:
# packages, the guest build, the shim package, the config), then run a container in its
# own microVM through a private containerd with `ctr run --runtime
# io.containerd.cloudhv.v1`, and print what it printed. Options go to install.sh; the
# rest after `--` is the command to run in the container.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null && exec sudo -E bash "$0" "$@"
  echo "$(basename "$0"): must run as root, and sudo is not installed: run it as root" >&2
  exit 1
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
install_args=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do install_args+=("$1"); shift; done
[ "${1:-}" != -- ] || shift

echo "== installing the cloudhv runtime (scripts/install.sh; cached after the first run)"
installed=$(bash scripts/install.sh "${install_args[@]}")
eval "$installed"
"$CLOUDHV_CTL" --config "$CLOUDHV_CONFIG" doctor || true

echo "== running a container in a microVM (the installed runtime, a private containerd)"
CLOUDHV_CONFIG="$CLOUDHV_CONFIG" CLOUDHV_SHIM_BIN="$CLOUDHV_SHIM_BIN" PYTHONPATH="$REPO" \
  "$CLOUDHV_VENV/bin/python" scripts/demo.py "$@"

echo "== a cold and a warm start through CRI: pool.size 0, then 2 (pre-booted VMs, docs/pool.md)"
CLOUDHV_CONFIG="$CLOUDHV_CONFIG" CLOUDHV_SHIM_BIN="$CLOUDHV_SHIM_BIN" PYTHONPATH="$REPO" \
  "$CLOUDHV_VENV/bin/python" scripts/demo.py --warm
