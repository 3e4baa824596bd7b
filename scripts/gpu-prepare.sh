#!/usr/bin/env bash
# Packs the libraries a GPU machine may lack, for a machine without network access.
# Run on a Debian 12 machine with apt (the build machine), from anywhere in the tree:
#   scripts/gpu-prepare.sh
# It makes .devdeps/ (ignored by git) holding the Debian packages of oneDNN, libyaml,
# CUnit, cJSON, PCRE2, utf8proc and libmicrohttpd (runtime and headers), and
# .devdeps/prelude.sh. Copy .devdeps/ beside the tree on the GPU machine;
# scripts/gpu-check.sh sources the prelude when it finds it (by hand:
# `source .devdeps/prelude.sh`). The prelude unpacks the packages into /opt/deps and
# points the compiler, linker, pkg-config, cmake and the loader at them; programs built
# on Debian 12 run on newer glibc (e.g. Ubuntu 24.04).
# Safe to run again: the packages are downloaded afresh.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

# The PCRE2 runtimes come with libpcre2-dev: its development links (libpcre2-8.so, ...)
# point into them.
pkgs=(libdnnl2 libdnnl-dev libyaml-0-2 libyaml-dev libcunit1 libcunit1-dev
      libcjson1 libcjson-dev libutf8proc2 libutf8proc-dev libmicrohttpd12 libmicrohttpd-dev
      libpcre2-dev libpcre2-8-0 libpcre2-16-0 libpcre2-32-0 libpcre2-posix3)

mkdir -p .devdeps
rm -f .devdeps/*.deb
(cd .devdeps && apt-get download "${pkgs[@]}")
for p in "${pkgs[@]}"; do
    ls .devdeps/"${p}"_*.deb >/dev/null 2>&1 || { echo "gpu-prepare.sh: $p was not downloaded" >&2; exit 1; }
done

cat >.devdeps/prelude.sh <<'PRELUDE'
# Source from the tree's root: unpacks .devdeps/*.deb into /opt/deps and points the
# toolchain at them (safe to source again).
mkdir -p /opt/deps
for deb in .devdeps/*.deb; do dpkg -x "$deb" /opt/deps; done
# pkg-config files name /usr as their prefix (some name libdir and includedir directly).
sed -i -E 's#^(prefix|exec_prefix|libdir|includedir)=/usr#\1=/opt/deps/usr#' \
    /opt/deps/usr/lib/x86_64-linux-gnu/pkgconfig/*.pc
# libmicrohttpd's .pc names gnutls as a private requirement (static linking only); a machine
# with the gnutls runtime but not its .pc would fail pkg-config for nothing.
sed -i '/^Requires.private:/d' /opt/deps/usr/lib/x86_64-linux-gnu/pkgconfig/libmicrohttpd.pc
export CMAKE_PREFIX_PATH=/opt/deps/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}
export PKG_CONFIG_PATH=/opt/deps/usr/lib/x86_64-linux-gnu/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
export LD_LIBRARY_PATH=/opt/deps/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export LIBRARY_PATH=/opt/deps/usr/lib/x86_64-linux-gnu${LIBRARY_PATH:+:$LIBRARY_PATH}
export CPATH=/opt/deps/usr/include${CPATH:+:$CPATH}
# Containers run as root; OpenMPI refuses that unless told.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
PRELUDE

ls -l .devdeps
echo "gpu-prepare.sh: copy .devdeps/ beside the tree on the GPU machine, then run scripts/gpu-check.sh there"
