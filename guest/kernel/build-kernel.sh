#!/usr/bin/env bash
# Builds the guest vmlinux from Debian's linux-source-6.1: tinyconfig + cloudhv.config.
# The result is cached under $CLOUDHV_CACHE/kernel-<hash of fragment, source, script>,
# so an unchanged fragment rebuilds instantly. Prints the vmlinux path on stdout.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${CLOUDHV_CACHE:-/var/cache/cloudhv}
FRAGMENT="$HERE/cloudhv.config"
TARBALL=/usr/src/linux-source-6.1.tar.xz
JOBS=${JOBS:-$(nproc)}

[ -f "$TARBALL" ] || {
  apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends \
    linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev >&2
}
src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( { echo "$src_version"; cat "$FRAGMENT" "$HERE/build-kernel.sh"; } | sha256sum | cut -c1-16)
OUT="$CACHE/kernel-$key"
mkdir -p "$CACHE"
# One build per key at a time: a second checkout building the same inputs waits for
# the first instead of deleting its work dir.
exec 9>"$OUT.lock"
flock 9
if [ -f "$OUT/vmlinux" ]; then
  echo "kernel: cached $OUT/vmlinux" >&2
  echo "$OUT/vmlinux"
  exit 0
fi

SRC="$CACHE/linux-src-$src_version"
if [ ! -f "$SRC/.extracted" ]; then
  echo "kernel: extracting $TARBALL" >&2
  rm -rf "$SRC" && mkdir -p "$SRC"
  tar -xf "$TARBALL" -C "$SRC" --strip-components=1
  touch "$SRC/.extracted"
fi

WORK="$OUT.tmp"
rm -rf "$WORK" && mkdir -p "$WORK"
make -s -C "$SRC" O="$WORK" ARCH=x86_64 tinyconfig >/dev/null
"$SRC/scripts/kconfig/merge_config.sh" -m -O "$WORK" "$WORK/.config" "$FRAGMENT" >/dev/null
make -s -C "$SRC" O="$WORK" ARCH=x86_64 olddefconfig >/dev/null

# Every fragment line must have survived: a dropped option is a broken guest.
missing=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*) grep -qxF "$line" "$WORK/.config" || { echo "kernel: not honoured: $line" >&2; missing=1; } ;;
    "# CONFIG_"*" is not set") grep -qxF "$line" "$WORK/.config" || { echo "kernel: not honoured: $line" >&2; missing=1; } ;;
  esac
done < "$FRAGMENT"
[ "$missing" = 0 ] || { echo "kernel: fragment not honoured, see above" >&2; exit 1; }

echo "kernel: building vmlinux with $JOBS jobs (about 7 minutes on 2 cores)" >&2
start=$(date +%s)
make -C "$SRC" O="$WORK" ARCH=x86_64 -j"$JOBS" vmlinux > "$WORK/build.log" 2>&1 &
pid=$!
while kill -0 "$pid" 2>/dev/null; do
  sleep 20
  kill -0 "$pid" 2>/dev/null || break
  echo "kernel: $(( $(date +%s) - start ))s, $(grep -c ' CC ' "$WORK/build.log" || true) files compiled" >&2
done
if ! wait "$pid"; then
  tail -n 30 "$WORK/build.log" >&2
  echo "kernel: build failed; log in $WORK/build.log" >&2
  exit 1
fi
grep -q 'Xen' <(readelf -n "$WORK/vmlinux") || { echo "kernel: vmlinux has no PVH note" >&2; exit 1; }
mkdir -p "$OUT"
cp "$WORK/vmlinux" "$WORK/.config" "$OUT/"
rm -rf "$WORK"
echo "kernel: built in $(( $(date +%s) - start ))s" >&2
echo "$OUT/vmlinux"
