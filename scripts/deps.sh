#!/usr/bin/env bash
# Installs the Debian packages the build and tests need (idempotent; needs root or sudo).
set -euo pipefail
pkgs=(build-essential cmake pkg-config libdnnl-dev libopenmpi-dev openmpi-bin libhdf5-dev libyaml-dev
      libcunit1-dev python3-matplotlib
      libcjson-dev libpcre2-dev libutf8proc-dev
      libmicrohttpd-dev chromium)
# npm (the serve test's OpenAI client): Debian's package, unless a Node.js build that carries
# its own npm (NodeSource's nodejs) is installed already.
command -v npm > /dev/null 2>&1 || pkgs+=(npm)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
