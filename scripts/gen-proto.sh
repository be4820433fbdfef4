#!/usr/bin/env bash
# Generates the Python protobuf modules for every .proto under proto/ into shim/_pb/
# (not committed). Imports between our own protos are rewritten to live under shim._pb.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-${CLOUDHV_VENV:-/var/cache/cloudhv/venv}/bin/python}
OUT="$REPO/shim/_pb"
stamp=$(cat $(find "$REPO/proto" -name '*.proto' | sort) "$0" | sha256sum | cut -c1-16)
[ -f "$OUT/.stamp" ] && [ "$(cat "$OUT/.stamp")" = "$stamp" ] && exit 0
rm -rf "$OUT.tmp" && mkdir -p "$OUT.tmp"
cd "$REPO/proto"
mapfile -t protos < <(find . -name '*.proto' | sed 's|^\./||' | sort)
"$PY" -m grpc_tools.protoc -I . --python_out="$OUT.tmp" "${protos[@]}"
# Top-level names of our proto packages (first path component of each file).
tops=$(printf '%s\n' "${protos[@]}" | awk -F/ 'NF>1{print $1}' | sort -u)
for top in $tops; do
  find "$OUT.tmp" -name '*_pb2.py' -exec sed -i -E "s/^from ${top}(\.| )/from shim._pb.${top}\1/" {} +
done
find "$OUT.tmp" -type d -exec touch {}/__init__.py \;
echo "$stamp" > "$OUT.tmp/.stamp"
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
