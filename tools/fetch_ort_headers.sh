#!/usr/bin/env bash
# Fetch ONNX Runtime's C/C++ headers (API 21, Debian trixie's libonnxruntime-dev) into DEST.
# Only the headers are used: the ONNX Runtime library itself comes from the `onnxruntime` wheel at run
# time, so Debian's library is never installed. The machine's own apt state is left untouched.
# Usage: fetch_ort_headers.sh DEST   (headers end up in DEST/onnxruntime/onnxruntime_c_api.h)
set -euo pipefail
dest=${1:?usage: fetch_ort_headers.sh DEST}
if [ -f "$dest/onnxruntime/onnxruntime_c_api.h" ]; then exit 0; fi
sources=/etc/apt/sources.list.d/debian.sources
if [ ! -f "$sources" ] || ! command -v apt-get >/dev/null; then
  echo "fetch_ort_headers: no Debian deb822 sources here; pass -DORT_INCLUDE_DIR=<dir with onnxruntime_c_api.h> to CMake instead" >&2
  exit 1
fi
st=$(mktemp -d)
trap 'rm -rf "$st"' EXIT
mkdir -p "$st/lists/partial" "$st/cache/archives/partial" "$st/parts" "$st/x"
awk 'BEGIN{RS="";ORS="\n\n"} NR==1' "$sources" | sed 's/^Suites:.*/Suites: trixie/' > "$st/parts/trixie.sources"
O="-o Dir::State::Lists=$st/lists -o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts=$st/parts -o Dir::Cache=$st/cache"
# shellcheck disable=SC2086
apt-get $O update -qq 2>/dev/null
# shellcheck disable=SC2086
(cd "$st" && apt-get $O download -qq libonnxruntime-dev 2>/dev/null)
dpkg-deb -x "$st"/libonnxruntime-dev_*.deb "$st/x"
mkdir -p "$dest.tmp.$$"
cp -r "$st/x/usr/include/onnxruntime" "$dest.tmp.$$/"
mkdir -p "$(dirname "$dest")"
rm -rf "$dest" && mv "$dest.tmp.$$" "$dest"
echo "fetch_ort_headers: ONNX Runtime headers in $dest/onnxruntime"
