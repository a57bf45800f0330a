"""The real container image, end to end (`make image-test`: needs root for dockerd, takes minutes).

These tests run only when asked for by path (`pytest tests/image`, as `make image-test` does): `make test`
and a bare `pytest` deselect them. Progress is logged live (`make image-test` turns on log_cli).

Fixtures to build on (all session-scoped unless said otherwise):

- `engine`: the Docker engine (`engine.client` is a `docker.DockerClient`); started with
  infra/docker/start-engine.sh (default bridge, no NAT) when none answers, and then stopped at the end.
- `image`: the project's Dockerfile built with BuildKit and a small model (IMAGE_TEST_MODEL, smollm2),
  from the pinned base or a local Debian base, from a wheelhouse the host's pip filled (`image.tag`,
  `image.build_args`, `image.size_bytes`, `image.seconds`).
- `run_function(role, command=None, entrypoint=None, network="none", publish_port=None, read_only=False,
  environment=None, **docker_run_options)`: another container of the same image, removed at the end.
  `command` replaces the image's CMD as template.yaml's ImageConfig.Command does (e.g. a streaming
  runtime: `run_function("streaming", command=["phi2.runtime.stream_runtime"])`), `entrypoint` its ENTRYPOINT.
  It returns a `FunctionContainer`: `.invoke(event)`, `.exec_python(code)`, `.logs()`, `.attrs`.
- `offline_function`: the image run as Lambda runs it, `--network none` with a read-only root and a /tmp;
  `.cold` is its cold start: events/rest-generate-greedy.json sent until the model is loaded
  (`.cold.answer`, the 503 model_loading answers before it in `.cold.loading`, `.cold.seconds`); the model is
  loaded when tests get it. `invoke_until_loaded(function, event)` does the same for any container.
- `invoke(event)`: invoke the offline container's RIE from inside it (docker exec). `event` is the name of a
  file in events/ or the event itself; returns an `Invocation` (`.status_code`, `.body`, `.seconds`).
- `function_network`: the bridge network (no NAT) that published containers and SAM CLI's containers use.
- `published_function` (module-scoped): `docker run -p 127.0.0.1:PORT:8080` of the image; its `.invoke`
  goes from the host through the published port.
- `start_api_url`: the base URL of a running `sam local start-api` (after `sam build` of template.yaml
  with the small model), e.g. `post(f"{start_api_url}/generate", ...)`. It is given 30 s after SAM CLI
  answers (SAM CLI 1.170 stamps every REST event with its own start time, aws/aws-sam-cli#9279), and its
  function's model may still be loading: GET /health answers 503 "loading" until it is ready.
- `sam_local_invoke(event_name)`: `sam local invoke -e events/<event_name>.json`, as an `Invocation`.
- `report`: a dict written to .cache/image-test/report.json at the end (image size, build time, first and
  warm invoke times...) and printed in the summary.

What it proves: every check of the former infra/image-test.sh, and where it now lives.

 1. a Docker engine answers, or one is started and later stopped             fixture `engine`
 2. the pinned base image, or a local Debian bookworm + Python 3.11 base      fixture `base_image` (pulling the
    (infra/docker/make-base-image.sh) when it cannot be had                  pinned base is now opt-in,
                                                                              IMAGE_TEST_PULL_BASE=1: a registry)
 3. the Dockerfile builds with BuildKit, a small model, from a wheelhouse     fixtures `wheelhouse`, `image`;
    the host's pip filled (its index configuration, its CPU torch); size,     test_image_build.py (+ entry point,
    layers and build time reported                                            command, label, size limit)
 4. offline run (--network none, read-only root, /tmp), invoked from inside   test_image_offline.py:
    a. /opt/model is not writable by the function's user                      ...weights_and_the_code_belong_to_root
                                                                              (+ every file root-owned, world-
                                                                              readable, writable by no one else)
    b. HF_HUB_OFFLINE=1                                                       ...never_reaches_for_the_model_hub
                                                                              (+ torch is a CPU build)
    c. first (cold) greedy generate: 200, the prompt continued, Paris        ...the_cold_start_answers (sent again
                                                                              while the function answers 503
                                                                              model_loading with Retry-After)
    d. warm greedy generate: 200, Paris                                       ...a_warm_invoke_answers
    e. the seed's prompt: 200, the prompt continued                           ...the_seeds_prompt_is_answered
    f. missing prompt: 422 validation_error with a request id                 ...a_missing_prompt_is_a_422
    g. malformed JSON: 400 invalid_json                                       ...malformed_json_is_a_400
    h. health after bad inputs: loaded, not a cold start, model revision      ...health_after_bad_inputs
    i. direct invocation: plain JSON with generated_text                      ...a_direct_invocation
    j. the RIE and the runtime run, none of the image's processes as root     ...every_process_of_the_image
    k. (new) no interface but loopback and no route, by inspection            ...has_no_network_but_its_loopback
 5. `docker run -p 127.0.0.1:PORT:8080`, called from the host                 test_image_published.py:
    a. the seed event: 200 with generated_text (cold, as in 4c)              ...the_seed_event_is_answered
    b. an oversized body: 413 payload_too_large                               ...an_oversized_body
    c. "no route out", formerly connections to 1.1.1.1:443 and PyPI's         ...on_the_bridge_has_no_way_out: by
       address: no outside address is contacted any more                     inspection (routes, bridge options,
                                                                              the host's NAT rules); + the port
                                                                              is bound to loopback only
 6. SAM CLI in its own virtualenv: `sam build` (classic builder), `sam local  test_image_sam.py (+ SAM's containers
    start-api` with the seed's request twice (now once GET /health says the  sit on the bridge without NAT)
    model is loaded: its cold start is reported), `sam local invoke -e` (200,
    or, every invoke being a cold start, the documented 503 model_loading)
 7. image size, build time, first and warm invoke, model load seconds        fixture `report` ->
                                                                              .cache/image-test/report.json
 8. everything started is removed by id                                      the fixtures' teardowns

Knobs (environment): IMAGE_TEST_MODEL (smollm2; or tiny-phi), PORT (9001), IMAGE_TEST_SAM=0 (no SAM CLI),
IMAGE_TEST_PULL_BASE=1 (try pulling the pinned base), IMAGE_TEST_LOCAL_BASE (phi2-base:local), IMAGE_TEST_TAG,
IMAGE_TEST_TEMPLATE (the SAM template to build, template.yaml), SAM_VENV (.cache/sam-venv), DOCKER_BUILD_CLI,
IMAGE_TEST_WHEELS_PORT (38765), IMAGE_TEST_KEEP_CACHE_GB (6: build cache kept when this run stops its engine).
`make image-test IMAGE_TEST_ARGS="-k offline"` passes pytest arguments.

On any failure (a test, or a fixture's setup or teardown) the report shows the last 100 lines of every
container's log (the RIE's and the runtime's output is the container's log) and of SAM CLI's output, taken
before anything is cleaned up (.cache/image-test/run/failure-logs.txt keeps them); a failed step (pip, the
build, `sam build`) shows the end of its output in its message, and its whole log is in .cache/image-test/run/.
Everything started is removed by id at the end: containers, the network, the wheelhouse server, SAM CLI's
processes and containers, and the engine if this run started it.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from image.image_harness import (
    EVIDENCE,
    LABEL,
    LOG_TAIL_LINES,
    REPORT,
    REPORT_DIR,
    Engine,
    FunctionContainer,
    FunctionRunner,
    Settings,
    Wheelhouse,
    build_image,
    choose_base_image,
    compiler_base,
    cpu_description,
    ensure_sam_cli,
    free_port,
    gateway_of,
    invoke_until_loaded,
    remove_containers_of,
    run_logged,
    run_sam_local_invoke,
    sam_template,
    start_api,
)

IMAGE_TESTS = Path(__file__).resolve().parent
log = logging.getLogger("image-test")


# ---------------------------------------------------------------------------------------------------
# Hooks


def _asked_for(config: pytest.Config) -> bool:
    """True when the command line names tests/image or something inside it."""
    for arg in config.args:
        path = Path(config.invocation_params.dir, arg.split("::")[0]).resolve()
        if path == IMAGE_TESTS or IMAGE_TESTS in path.parents:
            return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _asked_for(config):
        return
    ours = [item for item in items if IMAGE_TESTS in Path(item.path).parents]
    if ours:
        items[:] = [item for item in items if item not in ours]
        config.hook.pytest_deselected(items=ours)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.failed:
        # Taken now, while every container still exists: fixtures clean up after this report.
        logs = EVIDENCE.snapshot()
        report.sections.append((f"logs, last {LOG_TAIL_LINES} lines of each ({report.when})", logs))
        saved = REPORT_DIR / "run" / "failure-logs.txt"
        saved.parent.mkdir(parents=True, exist_ok=True)
        with saved.open("a") as out:
            out.write(f"######## {item.nodeid} ({report.when})\n{logs}\n")
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if REPORT:
        REPORT["passed"] = exitstatus == 0
        REPORT_DIR.mkdir(parents=True, exist_ok=True)
        (REPORT_DIR / "report.json").write_text(json_text(REPORT) + "\n")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if REPORT:
        terminalreporter.section("image test report (.cache/image-test/report.json)")
        for line in json_text(REPORT).splitlines():
            terminalreporter.write_line(line)


def json_text(value: object) -> str:
    import json

    return json.dumps(value, indent=2)


# ---------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings.from_environment()


@pytest.fixture(scope="session")
def report(settings: Settings) -> dict:
    REPORT.update(image=settings.tag, model=settings.model, cpu=cpu_description())
    return REPORT


@pytest.fixture(scope="session")
def work_dir(report: dict) -> Path:
    """Logs and SAM CLI's files of this run (kept after it for a look; replaced by the next run)."""
    work = REPORT_DIR / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def _interrupt_on_sigterm() -> None:
    """`kill <pid>` (a CI job's timeout, say) then cleans up as Ctrl-C does: pytest tears the fixtures down."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)


@pytest.fixture(scope="session")
def engine(settings: Settings, work_dir: Path):
    _interrupt_on_sigterm()
    engine = Engine.connect_or_start(work_dir / "engine.log")
    EVIDENCE.client = engine.client
    yield engine
    engine.close(settings.keep_build_cache_gb)


@pytest.fixture(scope="session")
def base_image(engine: Engine, settings: Settings, work_dir: Path, report: dict) -> str:
    base = choose_base_image(engine, settings, work_dir / "base-image.log")
    report["base_image"] = base
    return base


@pytest.fixture(scope="session")
def wheelhouse(engine: Engine, settings: Settings, work_dir: Path):
    directory = REPORT_DIR / "wheels"
    log.info("downloading wheels with the host's pip into %s", directory)
    Wheelhouse.download(directory, work_dir / "pip-download.log")
    # Builds reach the wheelhouse on the default bridge's gateway (the host, no NAT involved); an engine
    # without that bridge gets --network host and the loopback address.
    bridge = engine.bridge()
    host, network = (gateway_of(bridge), None) if bridge is not None else ("127.0.0.1", "host")
    # A fixed port keeps the build args, and so the builders' layer caches, the same from run to run.
    served = Wheelhouse(directory, host, free_port(settings.wheels_port, host), network)
    served.serve(work_dir / "wheelhouse-http.log")
    yield served
    served.close()


@pytest.fixture(scope="session")
def image(engine: Engine, settings: Settings, base_image: str, wheelhouse: Wheelhouse, work_dir: Path, report: dict):
    built = build_image(engine, settings, base_image, wheelhouse, work_dir / "build.log")
    EVIDENCE.watch_image(built.tag)
    report.update(
        image_bytes=built.size_bytes,
        image_mib=round(built.size_bytes / 2**20),
        build_seconds=round(built.seconds, 1),
    )
    log.info(
        "built %s in %.0f s: %d MiB; layers:\n%s",
        built.tag,
        built.seconds,
        built.size_bytes >> 20,
        "\n".join(built.layers),
    )
    return built


@pytest.fixture(scope="session")
def run_function(engine: Engine, image):
    runner = FunctionRunner(engine, image)
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def offline_function(run_function: FunctionRunner, report: dict) -> FunctionContainer:
    function = run_function("offline", network="none", read_only=True)
    # The first request, made here so that it is the cold start whatever test asks first, and sent again
    # while the function answers that its model is still loading.
    function.cold = invoke_until_loaded(function, "rest-generate-greedy")
    report["first_invoke_seconds"] = round(function.cold.seconds, 2)
    report["first_invoke_loading_answers"] = len(function.cold.loading)
    loaded = re.search(r'"ModelLoadSeconds":\s*\[?([0-9.]+)', function.logs())
    report["model_load_seconds"] = float(loaded.group(1)) if loaded else None
    return function


@pytest.fixture(scope="session")
def invoke(offline_function: FunctionContainer):
    return offline_function.invoke


@pytest.fixture(scope="session")
def function_network(engine: Engine):
    if engine.bridge() is not None:
        yield "bridge"
        return
    # An engine started with --bridge=none (not by this run): a bridge of our own, without NAT.
    network = engine.client.networks.create(
        f"phi2-image-test-{os.getpid()}",
        driver="bridge",
        options={"com.docker.network.bridge.enable_ip_masquerade": "false"},
        labels={LABEL: "network"},
    )
    yield network.name
    network.remove()


@pytest.fixture(scope="module")
def published_function(run_function: FunctionRunner, function_network: str, settings: Settings):
    port = free_port(settings.port)
    if port != settings.port:
        log.info("port %d is busy: publishing on %d", settings.port, port)
    function = run_function("published", network=function_network, publish_port=port)
    yield function
    run_function.remove(function)


@pytest.fixture(scope="session", autouse=True)
def sam_cli_install(request: pytest.FixtureRequest, settings: Settings, work_dir: Path):
    """SAM CLI installs in the background from the start (the image builds meanwhile), when a test needs it."""
    wanted = any("sam_cli" in getattr(item, "fixturenames", ()) for item in request.session.items)
    if not (settings.sam and wanted):
        yield None
        return
    with ThreadPoolExecutor(1, thread_name_prefix="sam-cli-install") as pool:
        yield pool.submit(ensure_sam_cli, settings.sam_venv, work_dir / "sam-install.log")


@pytest.fixture(scope="session")
def sam_cli(settings: Settings, engine: Engine, sam_cli_install) -> Path:
    if not settings.sam:
        pytest.skip("SAM CLI skipped (IMAGE_TEST_SAM=0)")
    if engine.bridge() is None:
        pytest.fail(
            "SAM CLI cannot work with this engine: it creates its containers on the engine's default bridge network "
            "and publishes the RIE's port there before joining any --docker-network, and this engine was started "
            "with --bridge=none (not by this run). Stop it (infra/docker/stop-engine.sh) so that this test starts "
            "one with DOCKER_DEFAULT_BRIDGE=1, or skip SAM with IMAGE_TEST_SAM=0."
        )
    return sam_cli_install.result()


@pytest.fixture(scope="session")
def sam_build(sam_cli: Path, engine: Engine, settings: Settings, base_image: str, wheelhouse, work_dir: Path, report):
    """`sam build` of template.yaml with the small model: plain `sam build`, Docker's classic builder through
    the Engine API, as most users get it. Returns the images it tagged."""
    build_args = {
        "BASE_IMAGE": base_image,
        "BUILD_BASE_IMAGE": compiler_base(settings, base_image),
        "MODEL_ID": settings.model,
        "MODEL_DTYPE": "auto",
        **wheelhouse.build_args(),
    }
    images = sam_template(settings.template, build_args, work_dir / "template.json")
    for tag in images:
        EVIDENCE.watch_image(tag)
    log.info("sam build (%s)", ", ".join(images))
    started = time.monotonic()
    run_logged(
        "sam build",
        [str(sam_cli), "build", "--template-file", "template.json", "--build-dir", str(work_dir / "build")],
        work_dir / "sam-build.log",
        timeout=3600,
        cwd=work_dir,
        env={**os.environ, "SAM_CLI_TELEMETRY": "0"},
    )
    report["sam_build_seconds"] = round(time.monotonic() - started, 1)
    yield images
    remove_containers_of(engine.client, images)


@pytest.fixture(scope="session")
def start_api_url(sam_cli: Path, sam_build: list[str], engine: Engine, settings: Settings, work_dir: Path):
    """A running `sam local start-api`, at least 30 s old (SAM CLI's request time is frozen at its start:
    image_harness.start_api), its function's container started by one GET /health (its model may be loading)."""
    port = free_port(settings.port)
    log.info("sam local start-api --port %d", port)
    api = start_api(sam_cli, work_dir, port)
    yield api.url
    api.stop()
    remove_containers_of(engine.client, sam_build)


@pytest.fixture(scope="session")
def sam_local_invoke(sam_cli: Path, sam_build: list[str], work_dir: Path):
    return functools.partial(run_sam_local_invoke, sam_cli, work_dir)
