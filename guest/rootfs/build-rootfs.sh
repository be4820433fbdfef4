#!/usr/bin/env bash
# Builds the guest's read-only root filesystem: the agent as /init, crun from Debian
# trixie with trixie's own loader and exactly the shared libraries it loads, and the
# empty directories the agent mounts on. No shell, no busybox.
# Cached under $CLOUDHV_CACHE/rootfs-<hash of inputs>. Prints the image path on stdout.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${CLOUDHV_CACHE:-/var/cache/cloudhv}
LIMIT_BYTES=$((8 * 1024 * 1024))
# Bookworm's crun 1.8.1 refuses specs whose ociVersion is not 1.0.x ("unknown version
# specified"), and containerd 1.7/2.x write 1.2.x. crun understands those from 1.14.3.
SUITE=${CRUN_SUITE:-trixie}
# crun and the packages of every library it loads (readelf NEEDED, transitively).
PACKAGES=(crun libc6 libcap2 libseccomp2 libsystemd0 libyajl2)

# The debs are extracted (never installed) into a directory keyed by their versions.
# One apt-cache call for all of them: each call loads apt's whole cache (seconds).
declare -A version_of=()
while read -r name version; do
  [ -n "${version_of[$name]:-}" ] || version_of[$name]=$version
done < <(apt-cache show "${PACKAGES[@]/%//$SUITE}" 2>/dev/null \
           | awk '/^Package:/ {p=$2} /^Version:/ {print p, $2}')
pinned=()
for p in "${PACKAGES[@]}"; do
  v=${version_of[$p]:-}
  [ -n "$v" ] || {
    echo "rootfs: apt has no $p in $SUITE; scripts/setup.sh adds that source" >&2
    exit 1
  }
  pinned+=("$p=$v")
done
DEBS="$CACHE/crun-$SUITE-$(printf '%s\n' "${pinned[@]}" | sha256sum | cut -c1-16)"
if [ ! -f "$DEBS/.done" ]; then
  mkdir -p "$CACHE"
  exec 8>"$CACHE/.crun-debs.lock"
  flock 8
  if [ ! -f "$DEBS/.done" ]; then
    echo "rootfs: extracting ${pinned[*]}" >&2
    rm -rf "$DEBS" && mkdir -p "$DEBS/debs"
    # apt's sandbox user cannot write into root's cache directory.
    (cd "$DEBS/debs" && apt-get -q -o APT::Sandbox::User=root download "${pinned[@]}" >&2)
    for deb in "$DEBS"/debs/*.deb; do dpkg-deb -x "$deb" "$DEBS/root"; done
    touch "$DEBS/.done"
  fi
  exec 8>&-
fi
ROOT="$DEBS/root"
CRUN="$ROOT/usr/bin/crun"
LIBDIRS=("$ROOT/usr/lib/x86_64-linux-gnu" "$ROOT/lib/x86_64-linux-gnu")

# The ELF loader wants what crun names, and what those name in turn. Only the
# extracted packages are searched: a host library must never slip in.
interp=$(readelf -l "$CRUN" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
[ "$interp" = /lib64/ld-linux-x86-64.so.2 ] || { echo "rootfs: crun wants loader $interp" >&2; exit 1; }
declare -A seen=()
libs=()
queue=("$CRUN")
while [ ${#queue[@]} -gt 0 ]; do
  elf=${queue[0]}
  queue=("${queue[@]:1}")
  for name in $(readelf -d "$elf" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p') ld-linux-x86-64.so.2; do
    [ -z "${seen[$name]:-}" ] || continue
    seen[$name]=1
    found=
    for dir in "${LIBDIRS[@]}"; do
      [ -e "$dir/$name" ] && { found="$dir/$name"; break; }
    done
    [ -n "$found" ] || { echo "rootfs: $name (needed by $elf) is in none of: ${PACKAGES[*]}" >&2; exit 1; }
    libs+=("$found")
    queue+=("$found")
  done
done

key=$( {
  cat "$0"
  find "$REPO/agent" "$REPO/proto" -type f \( -name '*.c' -o -name '*.h' -o -name '*.proto' \
       -o -name '*.options' -o -name Makefile \) -not -path '*/out/*' | sort | xargs cat
  printf '%s\n' "${pinned[@]}"
  sha256sum "$CRUN" "${libs[@]}"
} | sha256sum | cut -c1-16)
OUT="$CACHE/rootfs-$key"
mkdir -p "$CACHE"
exec 9>"$OUT.lock"  # one build per key at a time (see build-kernel.sh)
flock 9
if [ -f "$OUT/rootfs.ext4" ]; then
  touch "$OUT"  # used now: pruning spares what was used lately
  echo "rootfs: cached $OUT/rootfs.ext4" >&2
  echo "$OUT/rootfs.ext4"
  exit 0
fi

WORK="$OUT.tmp"
rm -rf "$WORK" && mkdir -p "$WORK/agent" "$WORK/tree"
trap 'rm -rf "$WORK"' EXIT
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
# The tree alone must run crun: nothing of the host's is reachable in a chroot. crun
# re-executes itself through /proc/self/exe, so it gets a proc in a private mount
# namespace that goes away with the command.
crun_version=$(unshare --mount --propagation private \
  sh -c 'mount -t proc proc "$1/proc" && chroot "$1" /usr/bin/crun --version' sh "$T") || {
  echo "rootfs: crun does not run from the image tree" >&2
  exit 1
}
crun_version=${crun_version%%$'\n'*}
chmod 0755 "$T"/{proc,sys,dev,run,mnt,etc}
chmod 1777 "$T/tmp"

# Size: the tree plus room for ext4 metadata; no journal (the guest mounts it read-only).
tree_kib=$(du -sk --apparent-size "$T" | cut -f1)
size_kib=$(( tree_kib + tree_kib / 10 + 512 ))
truncate -s "${size_kib}K" "$WORK/rootfs.ext4"
mkfs.ext4 -q -F -b 1024 -m 0 -N 64 -O ^has_journal,^resize_inode -L cloudhv-root \
  -E root_owner=0:0 -d "$T" "$WORK/rootfs.ext4"
bytes=$(stat -c %s "$WORK/rootfs.ext4")
echo "rootfs: $(( bytes / 1024 )) KiB ($(( tree_kib )) KiB of files: agent $(( $(stat -c %s "$T/init") / 1024 )) KiB, $crun_version + ${#libs[@]} libraries)" >&2
[ "$bytes" -le "$LIMIT_BYTES" ] || { echo "rootfs: ${bytes} bytes is over the 8 MiB target" >&2; exit 1; }
mkdir -p "$OUT"
mv "$WORK/rootfs.ext4" "$OUT/rootfs.ext4"
cp "$WORK/agent/cloudhv-agent" "$OUT/cloudhv-agent"
rm -rf "$WORK"
# Keep the 4 most recently used builds, and any used in the last day: another
# checkout (or a running test) may be booting it.
ls -1dt "$CACHE"/rootfs-*/ 2>/dev/null | tail -n +5 | while read -r old; do
  [ -n "$(find "$old" -maxdepth 0 -mtime +0)" ] || continue
  rm -rf "$old" "${old%/}.lock"
done
ls -1dt "$CACHE"/crun-*/ 2>/dev/null | tail -n +3 | xargs -r rm -rf
echo "$OUT/rootfs.ext4"
