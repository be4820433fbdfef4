#!/usr/bin/env bash
# Builds every artifact (cached by input hash under /var/cache/cloudhv) and prints
# shell assignments for them: CLOUDHV_KERNEL, CLOUDHV_ROOTFS, CLOUDHV_SHIM.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
kernel=$(bash "$REPO/guest/kernel/build-kernel.sh")
rootfs=$(bash "$REPO/guest/rootfs/build-rootfs.sh")
bash "$REPO/scripts/build-shim.sh"
echo "CLOUDHV_KERNEL=$kernel"
echo "CLOUDHV_ROOTFS=$rootfs"
echo "CLOUDHV_SHIM=$REPO/build/bin/containerd-shim-cloudhv-v1"
