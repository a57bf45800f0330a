#!/usr/bin/env bash
# Ensure a Docker engine answers `docker info`. Idempotent: if one already
# answers (ours or anyone's) nothing is done. Otherwise install Debian's
# docker.io if dockerd is missing and start dockerd in the background, owned
# by this script: its pid file is the only handle stop-engine.sh acts on.
# Prints the pid file path on stdout (empty line if the engine was not ours).
set -euo pipefail

STATE_DIR="${DOCKER_STATE_DIR:-/tmp/phi2-docker}"
PID_FILE="$STATE_DIR/dockerd.pid"
LOG_FILE="$STATE_DIR/dockerd.log"
# Unset DOCKER_STORAGE_DRIVER: try overlay2 (works on this VM's ext4; builds
# ~5x faster, layers shared instead of copied), fall back to vfs, which works
# on any filesystem (e.g. when /tmp is itself an overlay, as in a container).
if [[ -n "${DOCKER_STORAGE_DRIVER:-}" ]]; then DRIVERS=("$DOCKER_STORAGE_DRIVER"); else DRIVERS=(overlay2 vfs); fi
# Images live with the state dir so everything we create is in one place.
DATA_ROOT="${DOCKER_DATA_ROOT:-$STATE_DIR/data}"
WAIT_SECS="${DOCKER_START_TIMEOUT:-60}"
# DOCKER_DEFAULT_BRIDGE=1 keeps dockerd's default `bridge` network (docker0), still without any
# iptables rule (so without NAT: containers on it have no route out). SAM CLI needs it: it creates
# its containers on the default network and publishes their port there before joining any other.
BRIDGE_ARGS=(--bridge=none)
[[ "${DOCKER_DEFAULT_BRIDGE:-0}" == 1 ]] && BRIDGE_ARGS=()

if docker info >/dev/null 2>&1; then
  if [[ -s "$PID_FILE" ]]; then echo "$PID_FILE"; else echo; fi
  exit 0
fi

mkdir -p "$STATE_DIR"
# Serialise concurrent starts (the lock fd is closed for dockerd below).
exec 9>"$STATE_DIR/.lock"
flock 9
docker info >/dev/null 2>&1 && { echo "$PID_FILE"; exit 0; }

if ! command -v dockerd >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  # Refresh the package lists only when they do not know docker.io yet.
  if ! apt-cache show docker.io >/dev/null 2>&1; then apt-get update -q >&2; fi
  # No recommends: apparmor/needrestart/cgroupfs-mount are useless here.
  apt-get install -y -q --no-install-recommends docker.io >&2
fi
# Debian's docker.io also ships a client in /usr/bin; any client works.
command -v docker >/dev/null 2>&1 || { echo "no docker client" >&2; exit 1; }

# A stale pid file (crash, reboot) would make dockerd refuse to start.
if [[ -s "$PID_FILE" ]]; then
  old="$(cat "$PID_FILE")"
  if [[ "$(cat "/proc/$old/comm" 2>/dev/null)" == dockerd ]]; then
    echo "dockerd $old from $PID_FILE runs but docker info fails; see $LOG_FILE" >&2
    exit 1
  fi
  rm -f "$PID_FILE"
fi

# --bridge=none/--iptables=false/--ip6tables=false/--ip-masq=false/--ip-forward=false:
# leave the shared host's network alone (no docker0, no NAT rules and no
# net.ipv4.ip_forward=1 that outlive dockerd) and give containers no way out:
# a bridge without NAT or forwarding reaches the host and nothing beyond
# (tests/image checks it by inspection). Containers and builds use --network
# none or --network host (DOCKER_DEFAULT_BRIDGE: see above).
# setsid: outlive the caller's process group (a job runner may kill it when
# this script returns).
for driver in "${DRIVERS[@]}"; do
  setsid dockerd \
    --storage-driver="$driver" \
    --data-root="$DATA_ROOT" \
    "${BRIDGE_ARGS[@]}" --iptables=false --ip6tables=false --ip-masq=false --ip-forward=false \
    --pidfile="$PID_FILE" \
    </dev/null >>"$LOG_FILE" 2>&1 9>&- &
  launched=$!
  for ((i = 0; i < WAIT_SECS; i++)); do
    if docker info >/dev/null 2>&1; then echo "$PID_FILE"; exit 0; fi
    kill -0 "$launched" 2>/dev/null || break
    sleep 1
  done
  echo "dockerd --storage-driver=$driver died or hung (${WAIT_SECS}s); log tail:" >&2
  tail -n 5 "$LOG_FILE" >&2
  kill "$launched" 2>/dev/null || true
  wait "$launched" 2>/dev/null || true
done
exit 1
