#!/usr/bin/env bash
# Removes what scripts/install.sh installed, as listed in <prefix>/manifest: the venv,
# the command links, the guest artifacts, the config (kept if you edited it, unless
# --purge), the containerd registration, and the shim's runtime directories. Refuses
# while pods still run (their VMs would be orphaned), unless --force.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: scripts/uninstall.sh [--prefix DIR] [--purge] [--force]
  --prefix DIR   what install.sh was given (default /opt/cloudhv)
  --purge        also remove a config.json you edited after it was installed
  --force        uninstall even while pods run (they keep running, unmanaged)
USAGE
}
PREFIX=/opt/cloudhv
PURGE=0
FORCE=0
ARGS=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX=$2; shift ;;
    --purge) PURGE=1 ;;
    --force) FORCE=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "uninstall.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null; then
    exec sudo -E bash "$0" "${ARGS[@]}"
  fi
  echo "uninstall.sh: must run as root, and sudo is not installed: run it as root" >&2
  exit 1
fi

MANIFEST="$PREFIX/manifest"
# The installed copy of this script lives in the prefix it removes: run from elsewhere.
case "$(readlink -f "$0")" in
  "$(readlink -f "$PREFIX")"/*)
    copy=$(mktemp)
    cp "$0" "$copy"
    CLOUDHV_UNINSTALL_COPY=$copy exec bash "$copy" "${ARGS[@]}"
    ;;
esac
[ -z "${CLOUDHV_UNINSTALL_COPY:-}" ] || trap 'rm -f "$CLOUDHV_UNINSTALL_COPY"' EXIT
if [ ! -f "$MANIFEST" ]; then
  echo "uninstall.sh: nothing installed under $PREFIX (no $MANIFEST)" >&2
  exit 0
fi
VENV="$PREFIX/venv"
CTL="$VENV/bin/cloudhvctl"
CONFIG=$(grep -m1 '/config.json$' "$MANIFEST" || true)

if [ -x "$CTL" ] && [ -n "$CONFIG" ] && [ -f "$CONFIG" ]; then
  running=$("$CTL" --config "$CONFIG" ps --json 2>/dev/null | grep -c '"running": true' || true)
  if [ "${running:-0}" -gt 0 ] && [ "$FORCE" = 0 ]; then
    echo "uninstall.sh: $running pod VM(s) still run (cloudhvctl --config $CONFIG ps);" \
         "remove the pods first, or pass --force" >&2
    exit 1
  fi
fi

# containerd registration first: containerd must not be left pointing at a removed shim.
while read -r kind path; do
  [ "$kind" = containerd-config ] || continue
  if [ -x "$CTL" ]; then
    "$CTL" containerd unregister --containerd-config "$path" || {
      echo "uninstall.sh: could not unregister from $path (see above)" >&2; exit 1; }
  fi
done < "$MANIFEST"

# The shared parents (shim/forker.py) this install's Python started: found by the
# interpreter in their command line, each stopped by its pid, its socket removed.
for proc in /proc/[0-9]*; do
  cmd=$(tr '\0' ' ' 2>/dev/null < "$proc/cmdline") || continue
  case "$cmd" in
    "$VENV/bin/python"*"shim.forker"*)
      sock=$(sed -n 's/.*--socket \([^ ]*\).*/\1/p' <<< "$cmd")
      kill "${proc#/proc/}" 2>/dev/null || true
      [ -n "$sock" ] && rm -f "$sock"
      ;;
  esac
done

STAMP="$PREFIX/config.sha256"
remove_path() {
  local p=$1
  if [ "$p" = "$CONFIG" ] && [ -f "$p" ] && [ "$PURGE" = 0 ] && [ -f "$STAMP" ] \
     && [ "$(sha256sum < "$p")" != "$(cat "$STAMP")" ]; then
    echo "kept $p: it was edited after install (pass --purge to remove it)" >&2
    return
  fi
  if [ -L "$p" ] || [ -f "$p" ]; then
    rm -f "$p"
  elif [ -d "$p" ]; then
    case "$p" in "$PREFIX"/*) rm -rf "$p" ;; *) rmdir "$p" 2>/dev/null || true ;; esac
  fi
}
# Files first, then directories (they go only once empty, unless inside the prefix).
mapfile -t entries < <(grep -v '^containerd-config \|^runtime-dir ' "$MANIFEST")
for p in "${entries[@]}"; do [ -d "$p" ] && [ ! -L "$p" ] || remove_path "$p"; done
for p in "${entries[@]}"; do [ -d "$p" ] && [ ! -L "$p" ] && remove_path "$p"; done
# Runtime dirs: with no pod left they hold nothing of ours but the image cache (the
# state dir may also hold other installs' sockets: it goes only once empty).
while read -r kind path; do
  [ "$kind" = runtime-dir ] || continue
  [ -d "$path" ] || continue
  if grep -q " $path/" /proc/self/mounts; then
    echo "kept $path: something is still mounted under it" >&2
    continue
  fi
  [ -d "$path/images" ] && rm -rf "$path/images" "$path/refs" "$path/building" "$path/locks" "$path/journal" \
    "$path/lock"
  rmdir "$path" 2>/dev/null || echo "kept $path: not empty ($(ls -A "$path" | head -3 | tr '\n' ' '))" >&2
  rmdir "$(dirname "$path")" 2>/dev/null || true
done < "$MANIFEST"
for p in "${entries[@]}"; do
  parent=$(dirname "$p")
  [ "$parent" = / ] || rmdir "$parent" 2>/dev/null || true
done
rm -rf "$PREFIX"
echo "uninstall: removed the cloudhv runtime installed under $PREFIX" >&2
