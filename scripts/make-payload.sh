#!/usr/bin/env bash
# Makes the payload the Kubernetes installer (deploy/) puts on each node: wheels of the
# shim and all its dependencies, the guest kernel and rootfs, the config template and
# the install scripts. `install.sh --from-payload DIR` installs from it with no build
# and no network. Usage: scripts/make-payload.sh OUT_DIR
set -euo pipefail
OUT=${1:?usage: scripts/make-payload.sh OUT_DIR}
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null && exec sudo -E bash "$0" "$@"
  echo "$(basename "$0"): must run as root, and sudo is not installed: run it as root" >&2
  exit 1
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
eval "$(bash scripts/install.sh --build-only)"
rm -rf "$OUT.tmp" && mkdir -p "$OUT.tmp/wheels"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -a pyproject.toml shim proto "$work/"
find "$work" -name __pycache__ -prune -exec rm -rf {} +
"$CLOUDHV_VENV/bin/pip" wheel -q --disable-pip-version-check -c scripts/requirements.txt \
  --wheel-dir "$OUT.tmp/wheels" "$work" 2>&1 | grep -v "^WARNING: Location 'file:" >&2 || true
ls "$OUT.tmp"/wheels/containerd_shim_cloudhv-*.whl >/dev/null
# Nodes run other Pythons than this host's: add the compiled wheels for those too.
for wheel in "$OUT.tmp"/wheels/*-cp311-*.whl; do
  name_version=$(basename "$wheel" | cut -d- -f1-2)
  for py in 3.12 3.13; do
    "$CLOUDHV_VENV/bin/pip" download -q --disable-pip-version-check --no-deps \
      --only-binary=:all: --python-version "$py" --platform manylinux2014_x86_64 \
      --dest "$OUT.tmp/wheels" "${name_version%-*}==${name_version#*-}" \
      2>&1 | grep -v "^WARNING: Location 'file:" >&2 || true
  done
done
install -m 0644 "$CLOUDHV_KERNEL" "$OUT.tmp/vmlinux"
install -m 0644 "$CLOUDHV_ROOTFS" "$OUT.tmp/rootfs.ext4"
install -m 0644 config/cloudhv.json "$OUT.tmp/cloudhv.json"
install -m 0755 scripts/install.sh scripts/uninstall.sh "$OUT.tmp/"
# QEMU's vsock backend is packaged in few distributions: the node gets Debian's.
install -D -m 0755 "$(command -v vhost-device-vsock)" "$OUT.tmp/bin/vhost-device-vsock"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
echo "$version-$(cat "$OUT.tmp"/wheels/* "$OUT.tmp/vmlinux" "$OUT.tmp/rootfs.ext4" | sha256sum | cut -c1-12)" \
  > "$OUT.tmp/VERSION"
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
echo "payload: $OUT ($(du -sh "$OUT" | cut -f1))" >&2
