#!/usr/bin/env bash
# Build (once) an aarch64 Python 3.11 + TVM runtime sysroot under .cache/arm_rpc/ and register qemu-user
# with binfmt_misc, so `scripts/arm_rpc_sysroot.sh serve PORT` runs a real aarch64 TVM RPC server on
# 127.0.0.1 under emulation. Idempotent: every step is skipped when its output already exists.
#   scripts/arm_rpc_sysroot.sh setup        # fetch + unpack + binfmt (needs root and the package registries);
#                                           # with the sysroot cached it only re-registers binfmt (after a boot)
#   scripts/arm_rpc_sysroot.sh check        # exit 0 when the sysroot and binfmt are ready
#   scripts/arm_rpc_sysroot.sh serve PORT   # run the aarch64 RPC server in the foreground
# A functional check of an exported model without a board: serve 9090, then
#   hwmpq export --target tvm:arm-a76-dotprod --rpc 127.0.0.1:9090 ...  (runs model.so, checks it against torch)
# Timings from this server are emulated: never latencies.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${HWMPQ_ARM_CACHE:-$ROOT/.cache/arm_rpc}"
SYSROOT="$CACHE/sysroot"
SITE="$CACHE/site"
DEBS="$CACHE/debs"
QEMU="$(command -v qemu-aarch64-static || true)"
PYTHON="${HWMPQ_ARM_PYTHON:-python3}"   # any Python with pip: it only downloads the aarch64 wheels
TVM_VERSION="${TVM_VERSION:-0.27.0.post1}"
TVM_FFI_VERSION="${TVM_FFI_VERSION:-0.1.14.post1}"
PKGS="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libexpat1 zlib1g libssl3 libffi8
 libbz2-1.0 liblzma5 libsqlite3-0 libncursesw6 libtinfo6 libreadline8 libuuid1  libdb5.3 
 libstdc++6 libgcc-s1 libcrypt1 libnsl2 libtirpc3 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0
 libcom-err2 libkeyutils1"

die() { echo "arm_rpc_sysroot: $*" >&2; exit 1; }

binfmt_ready() { [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] && grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64; }
sysroot_ready() { [ -x "$SYSROOT/usr/bin/python3.11" ] && [ -f "$SITE/.complete" ]; }

fetch_debs() {
  [ -f "$DEBS/.complete" ] && return 0
  [ -n "$QEMU" ] || die "qemu-aarch64-static missing: apt-get install -y qemu-user-static"
  mkdir -p "$DEBS"
  [ -f "$CACHE/.gitignore" ] || echo "*" > "$CACHE/.gitignore"
  apt-get -o APT::Architectures::=amd64 -o APT::Architectures::=arm64 update -qq \
    || die "apt-get update with arm64 failed (needs root and the Debian mirror)"
  local p
  for p in $PKGS; do
    (cd "$DEBS" && apt-get -o APT::Architectures::=amd64 -o APT::Architectures::=arm64 \
      -o APT::Sandbox::User=root download -qq "$p:arm64") \
      || die "apt-get download $p:arm64 failed"
  done
  touch "$DEBS/.complete"
}

unpack_debs() {
  [ -x "$SYSROOT/usr/bin/python3.11" ] && return 0
  mkdir -p "$SYSROOT"
  local d
  for d in "$DEBS"/*.deb; do dpkg -x "$d" "$SYSROOT"; done
  # dpkg -x leaves the dynamic loader where the arm64 multiarch layout puts it; make /lib point there
  [ -e "$SYSROOT/lib" ] || ln -s usr/lib "$SYSROOT/lib"
}

fetch_wheels() {
  [ -f "$SITE/.complete" ] && return 0
  mkdir -p "$SITE"
  "$PYTHON" -m pip install -q --target "$SITE" --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
    --platform manylinux_2_17_aarch64 --python-version 3.11 --implementation cp --only-binary=:all: \
    "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$TVM_FFI_VERSION" numpy cloudpickle psutil ml_dtypes \
    || die "pip could not fetch the aarch64 TVM wheels"
  touch "$SITE/.complete"
}

register_binfmt() {
  binfmt_ready && return 0
  [ "$(id -u)" = 0 ] || die "binfmt_misc registration needs root"
  [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
    || die "cannot mount binfmt_misc (container without the privilege?)"
  local magic='\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00'
  local mask='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'
  echo ":qemu-aarch64:M::${magic}:${mask}:${QEMU}:F" > /proc/sys/fs/binfmt_misc/register \
    || die "writing /proc/sys/fs/binfmt_misc/register failed"
}

serve() {
  local port="${1:?serve needs a PORT}"
  sysroot_ready || die "sysroot not built: run scripts/arm_rpc_sysroot.sh setup"
  binfmt_ready || die "qemu-aarch64 is not registered with binfmt_misc: run scripts/arm_rpc_sysroot.sh setup as root"
  export QEMU_LD_PREFIX="$SYSROOT" PYTHONHOME="$SYSROOT/usr" PYTHONPATH="$SITE" PYTHONNOUSERSITE=1
  exec "$QEMU" -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11" -m tvm.exec.rpc_server \
    --host 127.0.0.1 --port "$port" --port-end "$((port + 1))"
}

case "${1:-setup}" in
  setup) fetch_debs; unpack_debs; fetch_wheels; register_binfmt; echo "arm_rpc_sysroot: ready at $CACHE" ;;
  check) sysroot_ready && binfmt_ready ;;
  serve) shift; serve "$@" ;;
  *) die "usage: $0 setup|check|serve PORT" ;;
esac
