#!/usr/bin/env bash
# make-base-image.sh TAG [--compiler]: build a local Debian bookworm + Python 3.11 image
# (a base for a Python 3.11 Lambda container image) with no registry pull:
# registries are unreachable here, the Debian mirror this host's apt uses is
# not (or DEBIAN_MIRROR: no mirror is built in). Idempotent: an
# existing TAG is left alone; the rootfs is cached so a rebuild only re-imports
# (delete $BASE_ROOTFS_CACHE to rebuild it, e.g. after changing PACKAGES).
set -euo pipefail

TAG="${1:?usage: $0 TAG [--compiler]}"
CACHE_DIR="${BASE_ROOTFS_CACHE:-/var/cache/phi2-base-rootfs}"
ROOTFS="$CACHE_DIR/bookworm-py311"
PACKAGES=(python3 python3-venv python3-pip ca-certificates)
# --compiler: the same base plus gcc, for the Dockerfile's kernels stage (BUILD_BASE_IMAGE), whose build has
# no Debian mirror to apt-get from here. Only the built library leaves that stage.
if [[ "${2:-}" == "--compiler" ]]; then
  ROOTFS="$CACHE_DIR/bookworm-py311-gcc"
  PACKAGES+=(gcc libc6-dev)
fi

docker info >/dev/null 2>&1 || { echo "no Docker engine: run start-engine.sh first" >&2; exit 1; }
mkdir -p "$CACHE_DIR"
# Serialise concurrent runs: they would share $ROOTFS.tmp.
exec 9>"$CACHE_DIR/.lock"
flock 9
if docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "$TAG already exists"
  exit 0
fi

# Print "URI SUITE" for every enabled binary source, from both one-line
# (.list) and deb822 (.sources) files: we reuse the mirror this host uses.
apt_sources() {
  local f files=()
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" ]] && files+=("$f")
  done
  ((${#files[@]})) || return 0
  awk '
    function flush(   i, n, a) {
      if (u != "" && en) { n = split(s, a, " "); for (i = 1; i <= n; i++) print u, a[i] }
      u = ""; s = ""; en = 1
    }
    FNR == 1 { flush() }
    /^[ \t]*$/ { flush(); next }
    /^deb[ \t]/ { sub(/\[[^]]*\][ \t]*/, ""); print $2, $3; next }
    /^Types:/ { en = ($0 ~ /[ \t]deb([ \t]|$)/) }
    /^Enabled:[ \t]*no/ { en = 0 }
    /^URIs:/ { u = $2 }
    /^Suites:/ { s = $0; sub(/^Suites:[ \t]*/, "", s) }
    END { flush() }
  ' "${files[@]}"
}

if [[ ! -x "$ROOTFS/usr/bin/python3.11" ]]; then
  MIRROR="${DEBIAN_MIRROR:-$(apt_sources | awk '$2 == "bookworm" { print $1; exit }')}"
  if [[ -z "$MIRROR" ]]; then
    echo "make-base-image: this host's apt sources (/etc/apt/sources.list, /etc/apt/sources.list.d/) enable" \
      "no 'bookworm' suite to bootstrap from: set DEBIAN_MIRROR to a Debian mirror URI this machine may use" >&2
    exit 1
  fi
  if ! command -v debootstrap >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-cache show debootstrap >/dev/null 2>&1 || apt-get update -q >&2
    apt-get install -y -q --no-install-recommends debootstrap >&2
  fi

  # Build beside the cache and rename at the end: a half-built rootfs from an
  # interrupted run is never mistaken for a finished one.
  tmp="$ROOTFS.tmp"
  rm -rf "$tmp"
  echo "debootstrap bookworm from $MIRROR" >&2
  debootstrap --variant=minbase bookworm "$tmp" "$MIRROR" >&2

  # Same suites as the host (bookworm, -updates, -security), so the image gets
  # the security fixes the host sees.
  apt_sources | awk '$2 ~ /^bookworm(-updates|-security)?$/ && !seen[$0]++ { print "deb", $1, $2, "main" }' \
    >"$tmp/etc/apt/sources.list"
  grep -q " bookworm main" "$tmp/etc/apt/sources.list" ||
    echo "deb $MIRROR bookworm main" >>"$tmp/etc/apt/sources.list"
  # Keep docs/man pages/translations out, now and in images built FROM this
  # one (as Debian's -slim images do); no recommends (pip would pull gcc).
  cat >"$tmp/etc/dpkg/dpkg.cfg.d/01-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
CFG
  echo 'APT::Install-Recommends "false";' >"$tmp/etc/apt/apt.conf.d/01-no-recommends"

  # Use-Pty=0: the chroot has no /dev/pts (apt would complain on every run).
  chroot_apt() { chroot "$tmp" env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o Dpkg::Use-Pty=0 "$@" >&2; }
  chroot_apt update
  chroot_apt dist-upgrade
  chroot_apt install "${PACKAGES[@]}"
  chroot_apt clean
  # `python` is what Lambda handlers and many scripts call.
  ln -sf /usr/bin/python3.11 "$tmp/usr/local/bin/python"

  # Trim: files excluded above that debootstrap put in before the rule,
  # package lists, logs, and the host's resolv.conf (docker mounts its own).
  find "$tmp/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
  find "$tmp/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$tmp"/usr/share/{man,info,locale,lintian}/* "$tmp"/var/lib/apt/lists/* \
    "$tmp"/var/cache/apt/*.bin "$tmp"/var/cache/debconf/*-old "$tmp"/var/log/*.log \
    "$tmp"/var/log/apt/* "$tmp"/tmp/* "$tmp"/var/tmp/*
  : >"$tmp/etc/resolv.conf"
  mv "$tmp" "$ROOTFS"
fi

# docker import leaves ENV/CMD empty: set what a Python base image needs.
tar -C "$ROOTFS" --numeric-owner -c . |
  docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$TAG" >/dev/null
echo "built $TAG"
