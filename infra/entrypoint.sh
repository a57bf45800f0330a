#!/bin/sh
# Starts the function exactly as Lambda does: `python -m awslambdaric <handler>`.
# Under Lambda (AWS_LAMBDA_RUNTIME_API is set) that is all. Anywhere else (`docker run`, `make serve`)
# the same command runs under the Lambda Runtime Interface Emulator, which serves
#   POST http://<RIE_ADDRESS>/2015-03-31/functions/function/invocations
# The streaming surface's Command is the module phi2.runtime.stream_runtime, a Runtime API loop of its own that
# streams responses (awslambdaric cannot): it runs as `python -m phi2.runtime.stream_runtime`, the same two ways.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
handler="${1:-${HANDLER:-phi2.runtime.handler.lambda_handler}}"
python="${PYTHON:-python}"
# `python -m` imports the handler from the working directory, as Lambda does from its task root.
cd "${LAMBDA_TASK_ROOT:-$here/../function}"

case "$handler" in
    phi2.runtime.stream_runtime) set -- "$python" -m phi2.runtime.stream_runtime ;;
    *) set -- "$python" -m awslambdaric "$handler" ;;
esac

if [ -n "${AWS_LAMBDA_RUNTIME_API:-}" ]; then
    exec "$@"
fi

rie="${RIE_BIN:-/usr/local/bin/aws-lambda-rie}"
listen="${RIE_ADDRESS:-0.0.0.0:8080}"
# The RIE's internal Runtime API defaults to 127.0.0.1:9001, which collides with listening on 9001:
# put it 1000 ports above the listening one unless told otherwise.
runtime_api="${RUNTIME_API_ADDRESS:-127.0.0.1:$((${listen##*:} + 1000))}"
if [ ! -x "$rie" ]; then
    echo "entrypoint: the Lambda RIE is not at $rie (set RIE_BIN, or run 'make rie')" >&2
    exit 1
fi
exec "$rie" --runtime-interface-emulator-address "$listen" --runtime-api-address "$runtime_api" "$@"
