#!/usr/bin/env bash
# Installs everything the build and the tests need on a Debian 12 host, as root.
# Idempotent: a second run only checks. Caches live outside the clone.
set -euo pipefail

CACHE_DIR=${CLOUDHV_CACHE:-/var/cache/cloudhv}
APT=(apt-get -o DPkg::Lock::Timeout=600 -y --no-install-recommends)
export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null && exec sudo -E bash "$0" "$@"
  echo "setup.sh: must run as root, and sudo is not installed: run it as root" >&2
  exit 1
fi
mkdir -p "$CACHE_DIR"

# Debian packages of bookworm.
PACKAGES=(
  qemu-system-x86 containerd runc containernetworking-plugins crun
  musl-tools linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev
  busybox-static e2fsprogs erofs-utils iproute2 util-linux kmod procps xz-utils ca-certificates
  iptables
)

# sid and trixie are added with a pin below every bookworm package, so they are
# used only for what we name explicitly: vhost-device-vsock (sid), and from trixie
# the CRI api .proto and the guest's crun with its libraries (downloaded and
# extracted, never installed).
ensure_extra_suites() {
  local changed=0
  if [ ! -f /etc/apt/sources.list.d/cloudhv-extra.sources ]; then
    cat > /etc/apt/sources.list.d/cloudhv-extra.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: sid trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

# nanopb's C runtime (pb_encode.c, ...) ships only in the source package.
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    changed=1
  fi
  if [ ! -f /etc/apt/preferences.d/cloudhv-extra ]; then
    cat > /etc/apt/preferences.d/cloudhv-extra <<'PIN'
Package: *
Pin: release n=sid
Pin-Priority: 50

Package: *
Pin: release n=trixie
Pin-Priority: 60
PIN
    changed=1
  fi
  return $changed
}

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
command -v vhost-device-vsock >/dev/null || missing+=("vhost-device-vsock/sid")

if ! ensure_extra_suites || [ ${#missing[@]} -gt 0 ]; then
  echo "setup: apt-get update" >&2
  # Unrelated third-party sources may be unreachable; bookworm itself must work.
  apt-get -o DPkg::Lock::Timeout=600 update -qq 2>&1 | grep -v '^W:' >&2 || true
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  "${APT[@]}" install "${missing[@]}" >&2
fi

# CRI api proto for the integration tests' client (trixie; extracted, not installed).
CRI_DIR="$CACHE_DIR/cri-api"
if [ ! -f "$CRI_DIR/.done" ]; then
  rm -rf "$CRI_DIR" && mkdir -p "$CRI_DIR/debs"
  (cd "$CRI_DIR/debs" && apt-get download \
     golang-github-kubernetes-cri-api-dev/trixie golang-github-gogo-protobuf-dev/trixie >&2)
  for d in "$CRI_DIR"/debs/*.deb; do dpkg-deb -x "$d" "$CRI_DIR/root"; done
  touch "$CRI_DIR/.done"
fi

# containerd 1.7 (trixie) and 2.x (sid) for the smoke tests: extracted, never installed,
# into $CACHE_DIR/containerd-<suite>-<version>, with containerd-<suite> naming the current one.
exec 9>"$CACHE_DIR/containerd-extract.lock"  # two checkouts set up at once
flock 9
for suite in trixie sid; do
  link="$CACHE_DIR/containerd-$suite"
  [ -x "$link/usr/bin/containerd" ] && continue
  version=$(apt-cache show "containerd/$suite" 2>/dev/null | sed -n 's/^Version: //p' | head -1)
  if [ -z "$version" ]; then
    apt-get -o DPkg::Lock::Timeout=600 update -qq 2>&1 | grep -v '^W:' >&2 || true
    version=$(apt-cache show "containerd/$suite" 2>/dev/null | sed -n 's/^Version: //p' | head -1)
  fi
  [ -n "$version" ] || { echo "setup: no containerd package in $suite" >&2; exit 1; }
  dir="$CACHE_DIR/containerd-$suite-${version//[^A-Za-z0-9.+-]/_}"
  if [ ! -x "$dir/usr/bin/containerd" ]; then
    echo "setup: extracting containerd $version ($suite)" >&2
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download "containerd=$version" >&2)
    rm -rf "$dir.tmp" && dpkg-deb -x "$tmp"/containerd_*.deb "$dir.tmp"
    rm -rf "$tmp" "$dir" && mv "$dir.tmp" "$dir"
  fi
  ln -sfn "$dir" "$link"
done
exec 9>&-

# nanopb C runtime, the version that matches the pinned PyPI generator (0.4.7).
NANOPB_DIR="$CACHE_DIR/nanopb-0.4.7"
if [ ! -f "$NANOPB_DIR/pb_encode.c" ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get source --download-only nanopb=0.4.7-2 >&2)
  rm -rf "$NANOPB_DIR" && mkdir -p "$NANOPB_DIR"
  tar -xzf "$tmp"/nanopb_0.4.7.orig.tar.gz -C "$NANOPB_DIR" --strip-components=1
  rm -rf "$tmp"
fi

# Python virtualenv with the project's dependencies, keyed by the dependency list.
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
deps_hash=$(sha256sum "$REPO/scripts/requirements.txt" | cut -c1-16)
# Under venvs/, not venv-*: older checkouts of this project prune every venv-* but
# their own, and would delete this one under a running test.
VENV="$CACHE_DIR/venvs/$deps_hash"
mkdir -p "$CACHE_DIR/venvs"
exec 8>"$VENV.lock"  # two checkouts setting up at once build one venv
flock 8
if [ ! -f "$VENV/.complete" ]; then
  echo "setup: creating $VENV" >&2
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  if ! { "$VENV/bin/pip" install -q --upgrade pip >&2 &&
         "$VENV/bin/pip" install -q -r "$REPO/scripts/requirements.txt" >&2; }; then
    rm -rf "$VENV"; exit 1
  fi
fi
ln -sfn "$VENV" "$CACHE_DIR/venv"  # the default for build-shim.sh and the agent build
touch "$VENV/.complete"  # marks it used: pruning keeps the most recently used
# Other checkouts (branches) may still use the venv of their own dependency list:
# keep the three most recently used, remove older ones.
ls -1dt "$CACHE_DIR"/venvs/*/.complete 2>/dev/null | tail -n +4 | while read -r mark; do
  rm -rf "$(dirname "$mark")" "$(dirname "$mark").lock"
done
echo "$VENV"
