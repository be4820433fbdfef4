#!/usr/bin/env bash
# Makes build/bin/containerd-shim-cloudhv-v1: the shim entry point bound to this checkout
# and the project venv (containerd finds it on PATH or through runtime_path).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=$(readlink -f "${CLOUDHV_VENV:-/var/cache/cloudhv/venv}")
bash "$REPO/scripts/gen-proto.sh"
mkdir -p "$REPO/build/bin"
tmp="$REPO/build/bin/.containerd-shim-cloudhv-v1.tmp"
cat > "$tmp" <<WRAPPER
#!$VENV/bin/python -sE
import sys
sys.path.insert(0, "$REPO")
from shim.entry import main
sys.exit(main())
WRAPPER
chmod 0755 "$tmp"
mv "$tmp" "$REPO/build/bin/containerd-shim-cloudhv-v1"
