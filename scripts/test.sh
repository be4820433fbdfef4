#!/usr/bin/env bash
# Installs what is missing, builds the guest and the shim (cached), and runs every test:
# lint and types, unit tests, then the root-only integration tests on real QEMU VMs and
# a real containerd. Extra arguments go to pytest.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null && exec sudo -E bash "$0" "$@"
  echo "$(basename "$0"): must run as root, and sudo is not installed: run it as root" >&2
  exit 1
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"

echo "== setup and build (scripts/install.sh --build-only: installs nothing, tests this checkout)"
# Not `eval "$(...)"` alone: a failed build must stop the run, not go on without artifacts.
artifacts=$(bash scripts/install.sh --build-only)
eval "$artifacts"
# The build and the tests use this venv, whatever /var/cache/cloudhv/venv points at.
export CLOUDHV_VENV CLOUDHV_KERNEL CLOUDHV_ROOTFS CLOUDHV_SHIM
export PATH="$CLOUDHV_VENV/bin:$PATH"

echo "== lint"
ruff check shim tests bench
mypy shim

echo "== tests"
python -m pytest -p no:cacheprovider -ra "${@:-tests}"
