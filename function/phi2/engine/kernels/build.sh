#!/bin/sh
# build.sh OUT: compile csrc/ into the kernel library OUT (make kernels and the image's build stage run this).
# One object per ISA variant, each with its own -m flags; dispatch.c is built for the baseline ISA and calls a
# variant only on a CPU that has it. Linked without an OpenMP runtime: it binds to torch's at load (__init__.py).
set -eu
OUT="${1:?usage: build.sh OUT}"
CC="${CC:-cc}"
SRC="$(cd "$(dirname "$0")/csrc" && pwd)"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
CFLAGS="-O3 -fPIC -fvisibility=hidden -fopenmp -std=gnu11 -Wall -Wextra"
AVX2="-mavx2 -mfma -mf16c"
AVX512="$AVX2 -mavx512f -mavx512bw -mavx512vl -mavx512dq"
$CC $CFLAGS -DPHI2K_VARIANT=0 $AVX2 -c "$SRC/impl.c" -o "$TMP/impl_avx2.o"
$CC $CFLAGS -DPHI2K_VARIANT=1 $AVX512 -c "$SRC/impl.c" -o "$TMP/impl_avx512.o"
$CC $CFLAGS -DPHI2K_VARIANT=2 $AVX512 -mavx512vnni -c "$SRC/impl.c" -o "$TMP/impl_avx512_vnni.o"
$CC $CFLAGS -c "$SRC/dispatch.c" -o "$TMP/dispatch.o"
$CC -shared -o "$TMP/lib.so" "$TMP"/*.o
mv "$TMP/lib.so" "$OUT"
