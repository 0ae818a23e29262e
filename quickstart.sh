#!/usr/bin/env bash
# One command from a fresh Debian 12 machine:
#   ./quickstart.sh demo   install dependencies, build, run the demo
#   ./quickstart.sh test   install dependencies, build (with ASan/UBSan), run
#                          every test, including the kernel interop tests
set -euo pipefail
cd "$(dirname "$0")"
top=$PWD

# Build and test dependencies, by Debian package.
PACKAGES=(
  g++ make autoconf automake libtool pkg-config perl xz-utils python3
  nbdkit nbdkit-plugin-dev libnbd-bin python3-libnbd
  libabsl-dev libglib2.0-dev check
  qemu-utils fio strace
)
# The kernel oracle (../shared/tools/kdm) boots a real kernel under qemu.
KDM_PACKAGES=(qemu-system-x86 busybox-static dmsetup kmod cpio zstd)

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

install_deps() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
      missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "quickstart: installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

build() {
  autoreconf -fi >/dev/null
  ./configure --enable-werror "$@" >/dev/null
  make -j"$(nproc)" >/dev/null
}

case "${1:-}" in
demo)
  install_deps "${PACKAGES[@]}"
  build
  exec bash "$top/examples/demo.sh"
  ;;
test)
  install_deps "${PACKAGES[@]}"
  kdm=$top/../shared/tools/kdm/kdm.sh
  if [ -x "$kdm" ]; then
    install_deps "${KDM_PACKAGES[@]}"
    "$kdm" setup >/dev/null || echo "quickstart: kdm setup failed; kernel interop tests will skip"
  fi
  build --enable-sanitizers=address,undefined
  make check -j"$(nproc)" || { cat test-suite.log 2>/dev/null | tail -300; exit 1; }
  ;;
*)
  echo "usage: $0 demo|test" >&2
  exit 2
  ;;
esac
