# Phi-2 text generation as an AWS Lambda container image (x86_64, CPU).
#
#   docker build -t phi2-lambda .                        # bakes microsoft/phi-2 (int8) at its pinned revision
#   docker run --rm -p 9001:8080 phi2-lambda             # outside Lambda the entry script starts the RIE
#   curl -XPOST http://localhost:9001/2015-03-31/functions/function/invocations -d @events/rest-generate-seed-prompt.json
#
# Build args a deployer or a restricted machine may change:
#   BASE_IMAGE          pinned Python 3.11 slim base (a mirror or a locally made base can stand in)
#   MODEL_ID / MODEL_REVISION / MODEL_DTYPE / MODEL_FORMAT   what infra/prepare_model.py bakes
#   PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS / PIP_TRUSTED_HOST   where pip finds packages
#                       (unset: pip's own defaults; PIP_EXTRA_INDEX_URL defaults to the PyTorch CPU index,
#                       which keeps CUDA out: a build that still gets a CUDA torch stops and says so)
# Plain Dockerfile syntax (no BuildKit-only flags): `docker build`, BuildKit or not, and `sam build`
# (whose default builder is Docker's classic one) all build it. No secret is needed or stored.
#
# Layers go from least to most often changed: RIE, dependencies, weights, code. Editing the handler
# rebuilds only the last small layer; the multi-gigabyte weights layer stays cached (and, in ECR, shared).

ARG BASE_IMAGE=python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1
# The kernels stage's base: the same image, where apt-get installs gcc. A build with no Debian mirror (the
# project's image tests, an air-gapped builder) passes one that has gcc already (make-base-image.sh --compiler).
ARG BUILD_BASE_IMAGE=${BASE_IMAGE}

# ---------------------------------------------------------------------------------------------------
# rie: the Lambda Runtime Interface Emulator, taken from the hash-pinned aws-sam-cli wheel on PyPI.
FROM ${BASE_IMAGE} AS rie
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
COPY infra/get-rie.sh infra/requirements-rie.txt /src/
RUN python3 -m venv /tmp/pip-venv \
    && PIP=/tmp/pip-venv/bin/pip PIP_NO_CACHE_DIR=1 /src/get-rie.sh /aws-lambda-rie \
    && rm -rf /tmp/pip-venv

# ---------------------------------------------------------------------------------------------------
# kernels: our kernel library (function/phi2/engine/kernels), compiled from its C source with Debian's gcc,
# one object per ISA variant (AVX2, AVX-512, AVX-512 VNNI); it picks the variant at load. Only the built
# library leaves this stage: the runtime image has no compiler.
FROM ${BUILD_BASE_IMAGE} AS kernels
RUN command -v gcc >/dev/null || { apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*; }
COPY function/phi2/engine/kernels/build.sh /src/kernels/
COPY function/phi2/engine/kernels/csrc/ /src/kernels/csrc/
RUN sh /src/kernels/build.sh /libphi2kernels.so

# ---------------------------------------------------------------------------------------------------
# deps: the runtime virtualenv, exactly function/requirements.txt under the project's lock file.
FROM ${BASE_IMAGE} AS deps
# CPU-only torch: the PyTorch CPU index serves torch==2.13.0 as 2.13.0+cpu (PyPI's default build drags
# in gigabytes of CUDA libraries that a Lambda function can never use). Leave PIP_INDEX_URL unset to use
# pip's default index, or point it at a mirror.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
# Lambda's file system is read-only, so bytecode is compiled here rather than on every cold start
# (torch's internal test helpers include Python 3.12-only syntax: skipped, nothing imports them).
COPY function/requirements.txt constraints.txt /src/
# torch goes first, alone, and its build is read from torch/version.py (importing torch needs the
# dependencies not installed yet): a CUDA build stops here, before gigabytes of nvidia-* wheels.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --quiet --no-deps -c /src/constraints.txt torch \
    && /opt/venv/bin/python -c 'import importlib.util, pathlib, runpy, sys; \
        v = runpy.run_path(str(pathlib.Path(importlib.util.find_spec("torch").origin).with_name("version.py"))); \
        v["cuda"] and sys.exit("torch " + v["__version__"] + " is a CUDA build (CUDA " + v["cuda"] + "): set" \
        " the build arg PIP_EXTRA_INDEX_URL to a PyTorch CPU wheel index (its default is one), or PIP_FIND_LINKS" \
        " to a CPU torch wheel; CUDA adds gigabytes a Lambda function cannot use")' \
    && /opt/venv/bin/pip install --quiet -c /src/constraints.txt -r /src/requirements.txt \
    && /opt/venv/bin/python -m compileall -q -j 0 -x /torch/testing/_internal/ /opt/venv/lib > /dev/null

# ---------------------------------------------------------------------------------------------------
# build: the runtime venv plus the preparation-only packages; writes MODEL_DIR with the project's own
# script (the one `make serve` runs). Nothing of this stage but /opt/model reaches the image.
FROM deps AS build
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
COPY infra/requirements-prepare.txt infra/requirements-assets.txt /src/
RUN /opt/venv/bin/pip install --quiet -c /src/constraints.txt -r /src/requirements-prepare.txt \
    && /opt/venv/bin/pip install --quiet --no-deps --require-hashes -r /src/requirements-assets.txt
# The weights depend on the preparation script and the modules that write the serving format, and on nothing
# else: editing the handler must neither download and quantize Phi-2 again nor change the weights layer.
COPY infra/prepare_model.py /src/infra/
COPY function/phi2/__init__.py function/phi2/errors.py /src/function/phi2/
COPY function/phi2/engine/__init__.py function/phi2/engine/model_files.py function/phi2/engine/planner.py \
     function/phi2/engine/cpu.py function/phi2/engine/aligned_safetensors.py /src/function/phi2/engine/
COPY function/phi2/engine/formats/__init__.py function/phi2/engine/formats/common.py \
     function/phi2/engine/formats/int8.py function/phi2/engine/formats/int4.py /src/function/phi2/engine/formats/
COPY function/phi2/engine/kernels/__init__.py /src/function/phi2/engine/kernels/
# microsoft/phi-2 (default), smollm2 or tiny-phi (the small models shipped on PyPI), or a .gguf path.
ARG MODEL_ID=microsoft/phi-2
ARG MODEL_REVISION=ef382358ec9e382308935a992d908de099b64c23
# int8 (default): weight-only int8 linears, fp32 compute, ~2.8 GB: the fastest format that passes the quality
# gate (README, Performance). int4 (4-bit groups, int8 head, ~1.6 GB) and int4-mixed (4-bit MLP, int8 attention
# and head): opt-in, for a 3,008 MB function; int4 fails the SmolLM2 gate (docs/performance.md says what is known
# of Phi-2 at 4 bits). safetensors: the weights in MODEL_DTYPE (auto = bf16 for Phi-2; its fp32, ~11 GB, does not
# fit Lambda's 10,240 MB).
ARG MODEL_FORMAT=int8
ARG MODEL_DTYPE=auto
# The hub revision applies to hub ids only; the PyPI-shipped models are pinned by their package version.
# Downloads take the Hub's plain HTTP path (HF_HUB_DISABLE_XET), the one tests/infra/test_prepare_phi2_from_hub.py
# proves against a stand-in of the Hub.
RUN set -- "$MODEL_ID" --dtype "$MODEL_DTYPE" --format "$MODEL_FORMAT" --out /opt/model --no-calibrate; \
    case "$MODEL_ID" in */*) set -- "$@" --revision "$MODEL_REVISION" ;; esac; \
    HF_HOME=/tmp/hf HF_HUB_DISABLE_XET=1 /opt/venv/bin/python /src/infra/prepare_model.py "$@" \
    && /opt/venv/bin/python /src/infra/prepare_model.py --out /opt/model --verify \
    && rm -rf /tmp/hf

# ---------------------------------------------------------------------------------------------------
# calibrate: times the prepared model's forward passes (calibration.json, the planner's starting speeds; the
# function rescales them to its own CPU at warm-up). A measurement, so it differs on every build: it gets a
# small layer of its own above the weights.
FROM build AS calibrate
COPY function/ /src/function/
COPY --from=kernels /libphi2kernels.so /src/function/phi2/engine/kernels/libphi2kernels.so
RUN /opt/venv/bin/python /src/infra/prepare_model.py --out /opt/model --calibrate-only

# ---------------------------------------------------------------------------------------------------
# runtime: what Lambda runs.
FROM ${BASE_IMAGE} AS runtime
ARG MODEL_ID=microsoft/phi-2
LABEL org.opencontainers.image.title="phi2-lambda" \
      org.opencontainers.image.description="Phi-2 text generation on AWS Lambda (CPU)" \
      org.opencontainers.image.licenses="MIT" \
      phi2.model-id="${MODEL_ID}"
# Lambda runs the image as its own non-root user with a read-only file system except /tmp. Elsewhere
# (docker run, sam local) the entry point drops root to this user (infra/docker/drop-root.sh: a USER
# instruction would break `sam local`, whose own layer on top of the image must RUN as root).
# Every file below is root-owned and world-readable: the code cannot change itself or the weights.
RUN groupadd --gid 1000 lambda \
    && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin lambda
ENV PATH=/opt/venv/bin:$PATH \
    LAMBDA_TASK_ROOT=/var/task \
    MODEL_DIR=/opt/model \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=rie /aws-lambda-rie /usr/local/bin/aws-lambda-rie
COPY --from=deps /opt/venv /opt/venv
# Weights outside /tmp (Lambda's /tmp is per-environment scratch, not part of the image).
COPY --from=build /opt/model /opt/model
COPY --from=calibrate /opt/model/calibration.json /opt/model/calibration.json
COPY infra/docker/drop-root.sh /usr/local/bin/drop-root.sh
COPY infra/entrypoint.sh /usr/local/bin/entrypoint.sh
COPY --from=kernels /libphi2kernels.so /var/task/phi2/engine/kernels/libphi2kernels.so
COPY function/ /var/task/
# /opt/model keeps the modes prepare_model.py gave it (a chmod here would copy the weights layer).
RUN python -m compileall -q /var/task > /dev/null && chmod -R a+rX /var/task
WORKDIR /var/task
ENTRYPOINT ["/usr/local/bin/drop-root.sh", "/usr/local/bin/entrypoint.sh"]
CMD ["phi2.runtime.handler.lambda_handler"]
