#!/usr/bin/env bash
# Stop the dockerd that start-engine.sh started, found by its pid file, and
# nothing else: no pid file, or a pid that is not dockerd, means no-op.
set -euo pipefail

STATE_DIR="${DOCKER_STATE_DIR:-/tmp/phi2-docker}"
PID_FILE="$STATE_DIR/dockerd.pid"

[[ -s "$PID_FILE" ]] || { echo "no $PID_FILE: nothing to stop"; exit 0; }
pid="$(cat "$PID_FILE")"
# Guard against pid reuse: only signal a dockerd whose command line names
# our pid file.
if [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" != dockerd ]] ||
   ! tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "--pidfile=$PID_FILE"; then
  echo "pid $pid is not our dockerd: removing stale $PID_FILE"
  rm -f "$PID_FILE"
  exit 0
fi

kill -TERM "$pid"
# dockerd stops its containers and its own containerd first: give it time.
for ((i = 0; i < 30; i++)); do
  kill -0 "$pid" 2>/dev/null || break
  sleep 1
done
if kill -0 "$pid" 2>/dev/null; then
  echo "dockerd $pid ignored SIGTERM for 30s: SIGKILL" >&2
  kill -KILL "$pid"
fi
rm -f "$PID_FILE"
echo "stopped dockerd $pid"
