#!/usr/bin/env bash
# Mesa >= 25's software Vulkan driver (lavapipe) unpacked into a folder of the checkout, so LiteRT's
# GPU accelerator runs on machines without a GPU (docs/methods/mobile_sd.md). Nothing system-wide
# changes: a private apt configuration downloads the .debs the system lacks, dpkg-deb unpacks them,
# and squeezegen.mobile.vulkan points the process at the folder's ICD manifest.
#   tools/software_vulkan.sh [FOLDER]   (default .gpu-sw; does nothing once FOLDER/icd.json exists)
# Where apt is missing (not Debian/Ubuntu) it says so and exits 0: the GPU-path tests then skip with
# that reason, unless SQUEEZEGEN_REQUIRE_VULKAN=1 (CI) makes them fail.
set -euo pipefail
DEST=${1:-.gpu-sw}
SUITE=bookworm-backports  # Mesa 25.0 for Debian 12; Debian 13's own Mesa is 25 already
if [ -f "$DEST/icd.json" ]; then exit 0; fi
if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
  echo "software Vulkan: apt-get/dpkg-deb not found; install Mesa >= 25 lavapipe (mesa-vulkan-drivers) with your package manager" >&2
  exit 0
fi
DEST=$(mkdir -p "$DEST" && cd "$DEST" && pwd)
APT="$DEST/apt"
rm -rf "$APT" "$DEST/root" && mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/debs" "$DEST/root"
echo "deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian $SUITE main" >"$APT/sources.list"
OPTS=(-o "Dir::Etc::SourceList=$APT/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache" -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
apt-get "${OPTS[@]}" -qq update
# what installing the driver would add or upgrade, given what this system has: fetch exactly those
mapfile -t WANT < <(apt-get "${OPTS[@]}" -s install "mesa-vulkan-drivers/$SUITE" 2>/dev/null |
  sed -n 's/^Inst \([^ ]*\) .*(\([^ ]*\) .*/\1=\2/p')
if [ ${#WANT[@]} -eq 0 ]; then
  echo "software Vulkan: apt found no mesa-vulkan-drivers in $SUITE for this system" >&2
  exit 1
fi
(cd "$APT/debs" && apt-get "${OPTS[@]}" -qq download "${WANT[@]}")
for deb in "$APT/debs"/*.deb; do dpkg-deb -x "$deb" "$DEST/root"; done
LIB="$DEST/root/usr/lib/x86_64-linux-gnu"
test -f "$LIB/libvulkan_lvp.so"
VERSION=$(sed -n 's/.*"api_version": *"\([^"]*\)".*/\1/p' "$DEST/root/usr/share/vulkan/icd.d/lvp_icd.json")
printf '{"file_format_version": "1.0.0", "ICD": {"library_path": "%s", "api_version": "%s"}}\n' \
  "$LIB/libvulkan_lvp.so" "$VERSION" >"$DEST/icd.json.tmp"
mv "$DEST/icd.json.tmp" "$DEST/icd.json"
rm -rf "$APT"
echo "software Vulkan: lavapipe from ${WANT[*]} in $DEST" >&2
