#!/usr/bin/env bash
# Builds the guest's read-only root filesystem: the agent as /init, Debian's crun and
# exactly the shared libraries it loads, and the empty directories the agent mounts on.
# No shell, no busybox. Cached under $CLOUDHV_CACHE/rootfs-<hash of inputs>.
# Prints the image path on stdout.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${CLOUDHV_CACHE:-/var/cache/cloudhv}
CRUN=${CRUN:-/usr/bin/crun}
LIMIT_BYTES=$((8 * 1024 * 1024))

command -v "$CRUN" >/dev/null || apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends crun >&2

mapfile -t libs < <(ldd "$CRUN" | awk '/=>/ {print $3} /^[ \t]*\/.*ld-linux/ {print $1}' | sort -u)
key=$( {
  cat "$0"
  find "$REPO/agent" "$REPO/proto" -type f \( -name '*.c' -o -name '*.h' -o -name '*.proto' \
       -o -name '*.options' -o -name Makefile \) -not -path '*/out/*' | sort | xargs cat
  sha256sum "$CRUN" "${libs[@]}"
} | sha256sum | cut -c1-16)
OUT="$CACHE/rootfs-$key"
mkdir -p "$CACHE"
exec 9>"$OUT.lock"  # one build per key at a time (see build-kernel.sh)
flock 9
if [ -f "$OUT/rootfs.ext4" ]; then
  touch "$OUT"  # marks it used: pruning below goes by last use
  echo "rootfs: cached $OUT/rootfs.ext4" >&2
  echo "$OUT/rootfs.ext4"
  exit 0
fi

WORK="$OUT.tmp"
rm -rf "$WORK" && mkdir -p "$WORK/agent" "$WORK/tree"
make -s -C "$REPO/agent" OUT="$WORK/agent" >&2
T="$WORK/tree"
mkdir -p "$T"/{proc,sys,dev,run,tmp,mnt,etc,usr/bin,lib/x86_64-linux-gnu,lib64}
install -m 0755 "$WORK/agent/cloudhv-agent" "$T/init"
install -m 0755 "$CRUN" "$T/usr/bin/crun"
for lib in "${libs[@]}"; do
  # Keep the name the loader asks for (the soname), with the real file's contents.
  install -m 0755 "$(readlink -f "$lib")" "$T/lib/x86_64-linux-gnu/$(basename "$lib")"
done
ln -s ../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$T/lib64/ld-linux-x86-64.so.2"
chmod 0755 "$T"/{proc,sys,dev,run,mnt,etc}
chmod 1777 "$T/tmp"

# Size: the tree plus room for ext4 metadata; no journal (the guest mounts it read-only).
tree_kib=$(du -sk --apparent-size "$T" | cut -f1)
size_kib=$(( tree_kib + tree_kib / 10 + 512 ))
truncate -s "${size_kib}K" "$WORK/rootfs.ext4"
mkfs.ext4 -q -F -b 1024 -m 0 -N 64 -O ^has_journal,^resize_inode -L cloudhv-root \
  -E root_owner=0:0 -d "$T" "$WORK/rootfs.ext4"
bytes=$(stat -c %s "$WORK/rootfs.ext4")
echo "rootfs: $(( bytes / 1024 )) KiB ($(( tree_kib )) KiB of files: agent $(( $(stat -c %s "$T/init") / 1024 )) KiB, crun + ${#libs[@]} libraries)" >&2
[ "$bytes" -le "$LIMIT_BYTES" ] || { echo "rootfs: ${bytes} bytes is over the 8 MiB target" >&2; exit 1; }
mkdir -p "$OUT"
mv "$WORK/rootfs.ext4" "$OUT/rootfs.ext4"
cp "$WORK/agent/cloudhv-agent" "$OUT/cloudhv-agent"
rm -rf "$WORK"
# Keep the 8 most recently used builds, and any used in the last two hours: several
# checkouts (branches) build and test at once, each with its own inputs, and a test
# run must not lose its rootfs under it.
ls -1dt "$CACHE"/rootfs-*/ 2>/dev/null | tail -n +9 | while read -r old; do
  [ -z "$(find "$old" -maxdepth 0 -mmin -120)" ] || continue
  rm -rf "$old" "${old%/}.lock"
done
echo "$OUT/rootfs.ext4"
