"""The machinery of the container image test (tests/image/): the Docker engine, the wheelhouse the build
installs from, the image build, the function's containers, SAM CLI, and what a failing test shows.

Everything here is driven through the Docker SDK for Python, except two things the SDK cannot do: a
BuildKit build (the SDK speaks the classic builder's API only; `docker build` with BuildKit is what most
users run, `sam build` below is the classic builder, so the Dockerfile is checked with both) and SAM CLI.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import ipaddress
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container

ROOT = Path(__file__).resolve().parents[2]
EVENTS = ROOT / "events"
REPORT_DIR = ROOT / ".cache" / "image-test"
INVOKE_PATH = "/2015-03-31/functions/function/invocations"
# Where the image's entry script makes the RIE listen inside the container (infra/entrypoint.sh).
RIE_CONTAINER_PORT = 8080
LOG_TAIL_LINES = 100
# Marks every container and network this suite creates (cleanup still goes by id).
LABEL = "phi2.image-test"

log = logging.getLogger("image-test")


# ---------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Settings:
    """What a run may change, from the environment (`make image-test` passes PORT)."""

    model: str = "smollm2"
    tag: str = "phi2-lambda:image-test"
    port: int = 9001
    local_base: str = "phi2-base:local"
    pull_base: bool = False
    sam: bool = True
    sam_venv: Path = ROOT / ".cache" / "sam-venv"
    wheels_port: int = 38765
    keep_build_cache_gb: float = 6.0
    build_cli: str = ""
    template: Path = ROOT / "template.yaml"

    @classmethod
    def from_environment(cls) -> Settings:
        env = os.environ
        return cls(
            model=env.get("IMAGE_TEST_MODEL", cls.model),
            tag=env.get("IMAGE_TEST_TAG", cls.tag),
            port=int(env.get("PORT", cls.port)),
            local_base=env.get("IMAGE_TEST_LOCAL_BASE", cls.local_base),
            pull_base=env.get("IMAGE_TEST_PULL_BASE", "0") == "1",
            sam=env.get("IMAGE_TEST_SAM", "1") != "0",
            sam_venv=Path(env.get("SAM_VENV", cls.sam_venv)),
            wheels_port=int(env.get("IMAGE_TEST_WHEELS_PORT", cls.wheels_port)),
            keep_build_cache_gb=float(env.get("IMAGE_TEST_KEEP_CACHE_GB", cls.keep_build_cache_gb)),
            build_cli=env.get("DOCKER_BUILD_CLI", ""),
            template=Path(env.get("IMAGE_TEST_TEMPLATE", cls.template)).resolve(),
        )


def load_event(name: str) -> dict:
    """A sample event from events/ (the same files `sam local invoke -e` uses)."""
    return json.loads((EVENTS / f"{name}.json").read_text())


def cpu_description() -> dict[str, Any]:
    """The CPU the numbers were measured on, and the ISA extensions that change the kernels used."""
    model, flags = platform.processor(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    isa = [name for name in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if name in flags]
    return {"model": model, "cpus": os.cpu_count(), "isa": isa}


# ---------------------------------------------------------------------------------------------------
# What a failing test shows


def tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def tail_file(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return tail(path.read_text(errors="replace"), lines)
    except OSError as exc:
        return f"({exc})"


class Evidence:
    """The logs a failing test prints: every container this suite ran (and those SAM CLI ran from the images
    it built), and the output of every process the suite started (the build, the wheelhouse, SAM CLI)."""

    def __init__(self) -> None:
        self.client: docker.DockerClient | None = None
        self.containers: dict[str, str] = {}  # id -> what it is
        self.removed: dict[str, str] = {}  # what it was -> its last lines, taken when it was removed
        self.images: set[str] = set()  # containers of these images, or of images built on them, count too
        self.files: dict[Path, str] = {}  # output file -> what wrote it
        self._shown: dict[str, str] = {}  # source -> digest of the text last shown

    def watch_container(self, container: Container, what: str) -> None:
        self.containers[container.id] = what

    def watch_image(self, tag: str) -> None:
        self.images.add(tag)

    def watch_file(self, path: Path, what: str) -> None:
        self.files[path] = what

    def forget_container(self, container: Container) -> None:
        """Keep a removed container's last lines: a later failure may come from what it did."""
        what = self.containers.pop(container.id, f"container {container.name}")
        with contextlib.suppress(docker.errors.DockerException):
            self.removed[f"{what} {container.short_id} (removed)"] = tail(_container_logs(container))

    def _all_containers(self) -> dict[str, tuple[str, Container | None]]:
        found: dict[str, tuple[str, Container | None]] = {}
        if self.client is None:
            return found
        for container_id, what in self.containers.items():
            try:
                found[container_id] = (what, self.client.containers.get(container_id))
            except docker.errors.NotFound:
                found[container_id] = (what, None)
            except docker.errors.DockerException as exc:
                log.warning("cannot read container %s: %s", container_id[:12], exc)
        for image in sorted(self.images):
            try:
                others = self.client.containers.list(all=True, filters={"ancestor": image})
            except docker.errors.DockerException:
                continue  # the image does not exist (yet)
            for container in others:
                found.setdefault(container.id, (f"container of {image} ({container.name})", container))
        return found

    def snapshot(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last `lines` lines of every source; a source unchanged since it was last shown is named only."""
        parts: list[str] = []

        def add(source: str, text: str) -> None:
            digest = hashlib.sha256(text.encode()).hexdigest()
            if self._shown.get(source) == digest:
                parts.append(f"===== {source}: unchanged since shown above")
                return
            self._shown[source] = digest
            parts.append(f"===== {source} (last {lines} lines)\n{text or '(empty)'}")

        for container_id, (what, container) in self._all_containers().items():
            if container is None:
                add(f"{what} {container_id[:12]}", "(gone)")
                continue
            state = container.attrs.get("State", {})
            status = f"{state.get('Status')}, exit code {state.get('ExitCode')}, OOM killed {state.get('OOMKilled')}"
            try:
                text = tail(_container_logs(container), lines)
            except docker.errors.DockerException as exc:
                text = f"(cannot read its log: {exc})"
            add(f"{what} {container.short_id} [{status}]", text)
        for source, text in self.removed.items():
            add(source, text)
        for path, what in self.files.items():
            add(f"{what} ({path})", tail_file(path, lines))
        return "\n".join(parts) if parts else "(no container or process output yet)"


def _container_logs(container: Container) -> str:
    return container.logs(stdout=True, stderr=True).decode(errors="replace")


EVIDENCE = Evidence()
REPORT: dict[str, Any] = {}


# ---------------------------------------------------------------------------------------------------
# Processes


def run_logged(what: str, command: list[str], output: Path, *, timeout: float, **popen: Any) -> None:
    """Run a command with its output appended to `output`; a failure names the exit code or the signal and
    shows the output's last lines."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("ab") as out:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **popen
        )
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process_group(process)
            raise AssertionError(f"{what} did not finish in {timeout:.0f} s ({output}):\n{tail_file(output)}") from None
        except BaseException:
            stop_process_group(process)
            raise
    if code < 0:
        raise AssertionError(f"{what} was killed by {signal.Signals(-code).name} ({output}):\n{tail_file(output)}")
    if code:
        raise AssertionError(f"{what} failed (exit code {code}, {output}):\n{tail_file(output)}")


def stop_process_group(process: subprocess.Popen, first: signal.Signals = signal.SIGTERM, grace: float = 10) -> None:
    """Signal the process group a process leads (it was started in its own session), then SIGKILL it."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, first)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def free_port(preferred: int, address: str = "127.0.0.1") -> int:
    """`preferred` if it is free on `address`, else any free port."""
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind((address, port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise OSError(f"no free port on {address}")


def wait_for_http(url: str, timeout: float, alive: Any = None) -> None:
    """Wait until something answers HTTP at `url` (any status); `alive()` false means give up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing answered at {url} within {timeout:.0f} s") from None
            if alive is not None and not alive():
                raise AssertionError(f"the server for {url} exited before it answered") from None
            time.sleep(0.2)


# ---------------------------------------------------------------------------------------------------
# The engine


@dataclass
class Engine:
    """A Docker engine: the one that answers, or one this run started (infra/docker/start-engine.sh),
    which it then also stops."""

    client: docker.DockerClient
    started_here: bool = False
    docker0_is_ours: bool = False

    @classmethod
    def connect_or_start(cls, logs: Path) -> Engine:
        with contextlib.suppress(docker.errors.DockerException):
            return cls(_client())
        log.info("no Docker engine answers: starting one (default bridge, no NAT, no forwarding)")
        docker0_existed = Path("/sys/class/net/docker0").exists()
        logs.parent.mkdir(parents=True, exist_ok=True)
        with logs.open("ab") as err:
            started = subprocess.run(
                [str(ROOT / "infra" / "docker" / "start-engine.sh")],
                env={**os.environ, "DOCKER_DEFAULT_BRIDGE": "1"},
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                timeout=900,
                check=False,
            )
        assert started.returncode == 0, f"start-engine.sh failed ({started.returncode}):\n{tail_file(logs, 40)}"
        return cls(_client(), started_here=bool(started.stdout.strip()), docker0_is_ours=not docker0_existed)

    def bridge(self) -> docker.models.networks.Network | None:
        """The engine's default `bridge` network (SAM CLI needs it); None when the engine runs without one."""
        try:
            return self.client.networks.get("bridge")
        except docker.errors.NotFound:
            return None

    def close(self, keep_build_cache_gb: float) -> None:
        """Stop the engine if this run started it, keeping its data root (the next run's cache) bounded."""
        if self.started_here:
            # Untagged images are also the classic builder's cache (the stages of `sam build`): only old ones go.
            with contextlib.suppress(docker.errors.DockerException):
                self.client.images.prune(filters={"dangling": True, "until": "72h"})
            with contextlib.suppress(docker.errors.DockerException):
                self.client.api.prune_builds(keep_storage=int(keep_build_cache_gb * 2**30))
            log.info("stopping the Docker engine this run started")
            subprocess.run([str(ROOT / "infra" / "docker" / "stop-engine.sh")], check=False, timeout=120)
            # dockerd leaves its docker0 interface behind: remove it when this run made it.
            if self.docker0_is_ours:
                subprocess.run(["ip", "link", "delete", "docker0"], check=False, capture_output=True)
        self.client.close()


def _client() -> docker.DockerClient:
    # Long enough for an exec that waits on a generation.
    client = docker.from_env(timeout=900)
    client.ping()
    return client


def gateway_of(network: docker.models.networks.Network) -> str:
    """The address of the host on a bridge network (a fresh engine may leave it out of the IPAM config)."""
    network.reload()
    for config in network.attrs["IPAM"]["Config"] or []:
        if config.get("Gateway"):
            return config["Gateway"]
    interface = network.attrs["Options"].get("com.docker.network.bridge.name", "docker0")
    shown = json.loads(
        subprocess.run(
            ["ip", "-j", "-4", "addr", "show", "dev", interface], capture_output=True, text=True, check=True
        ).stdout
    )
    addresses = [a["local"] for entry in shown for a in entry.get("addr_info", [])]
    assert addresses, f"the bridge {interface} has no IPv4 address"
    return addresses[0]


def subnet_of(network: docker.models.networks.Network) -> ipaddress.IPv4Network:
    network.reload()
    (config,) = [c for c in network.attrs["IPAM"]["Config"] if ":" not in c["Subnet"]]
    return ipaddress.ip_network(config["Subnet"])


def source_nat_rules(subnet: ipaddress.IPv4Network) -> tuple[list[str], list[str]]:
    """The host's source-NAT rules (MASQUERADE/SNAT) that could apply to packets from `subnet`, and which
    tables were read. A rule that names no source, or a source overlapping the subnet, counts."""
    rules, read = [], []
    if shutil.which("iptables"):
        listed = subprocess.run(["iptables", "-t", "nat", "-S"], capture_output=True, text=True, check=False)
        assert listed.returncode == 0, f"iptables -t nat -S failed: {listed.stderr.strip()}"
        read.append("iptables nat table")
        for rule in listed.stdout.splitlines():
            if not re.search(r"-j (MASQUERADE|SNAT)\b", rule):
                continue
            source = re.search(r"(?<!! )-s (\S+)", rule)
            if source is None or ipaddress.ip_network(source.group(1), strict=False).overlaps(subnet):
                rules.append(rule)
    if shutil.which("nft"):
        listed = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=False)
        if listed.returncode == 0:
            read.append("nftables ruleset")
            rules += [
                f"nft: {line.strip()}"
                for line in listed.stdout.splitlines()
                if re.search(r"\b(masquerade|snat)\b", line)
            ]
    return rules, read


# ---------------------------------------------------------------------------------------------------
# The base image, the wheelhouse and the build


def pinned_base_image() -> str:
    match = re.search(r"^ARG BASE_IMAGE=(\S+)", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE)
    assert match, "the Dockerfile has no ARG BASE_IMAGE default"
    return match.group(1)


def image_exists(client: docker.DockerClient, reference: str) -> bool:
    try:
        client.images.get(reference)
    except docker.errors.ImageNotFound:
        return False
    return True


def choose_base_image(engine: Engine, settings: Settings, logs: Path) -> str:
    """The pinned base when the engine has it (or, with IMAGE_TEST_PULL_BASE=1, can pull it); otherwise a
    local Debian bookworm + Python 3.11 base made from this host's apt sources (no registry involved)."""
    pinned = pinned_base_image()
    if image_exists(engine.client, pinned):
        return pinned
    if settings.pull_base:
        try:
            with contextlib.closing(docker.from_env(timeout=120)) as puller:
                puller.images.pull(pinned)
            return pinned
        except (docker.errors.DockerException, OSError) as exc:  # OSError: the pull timed out
            log.info("cannot pull %s: %s", pinned, exc)
    log.info("the engine has no %s: using a local Debian bookworm + Python 3.11 base (%s)", pinned, settings.local_base)
    run_logged(
        "infra/docker/make-base-image.sh",
        [str(ROOT / "infra" / "docker" / "make-base-image.sh"), settings.local_base],
        logs,
        timeout=1800,
    )
    # The kernels stage's base: the same plus gcc, since the build has no Debian mirror to apt-get from.
    run_logged(
        "infra/docker/make-base-image.sh --compiler",
        [
            str(ROOT / "infra" / "docker" / "make-base-image.sh"),
            compiler_base(settings, settings.local_base),
            "--compiler",
        ],
        logs,
        timeout=1800,
    )
    return settings.local_base


def compiler_base(settings: Settings, base: str) -> str:
    """BUILD_BASE_IMAGE for a build on `base`: the local base's gcc twin, or the pinned base itself (whose
    kernels stage installs gcc with apt-get)."""
    return f"{settings.local_base}-gcc" if base == settings.local_base else base


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    log_file: Path

    def log_message(self, format: str, *args: Any) -> None:
        with self.log_file.open("a") as out:
            out.write(f"{self.address_string()} {format % args}\n")


@dataclass
class Wheelhouse:
    """Every wheel the image needs, downloaded by the host's pip (its index configuration, its CPU torch)
    and served read-only over HTTP to the builds: the only package source they get. So the builds need
    neither internet access nor the host's proxy and its CA."""

    directory: Path
    host: str
    port: int
    build_network: str | None  # "host" when the engine has no bridge to reach the host through
    server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def build_args(self) -> dict[str, str]:
        # The wheelhouse is both the index (it has no per-project pages: every lookup is a 404) and the
        # find-links page; the PyTorch CPU index default is replaced (the wheelhouse's torch is the CPU one).
        return {
            "PIP_INDEX_URL": self.url,
            "PIP_EXTRA_INDEX_URL": "",
            "PIP_FIND_LINKS": self.url,
            "PIP_TRUSTED_HOST": self.host,
        }

    @classmethod
    def download(cls, directory: Path, logs: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "-d", str(directory)]
        run_logged(
            "pip download (image requirements)",
            [*pip, "-c", "constraints.txt", "-r", "function/requirements.txt", "-r", "infra/requirements-prepare.txt"],
            logs,
            timeout=1800,
            cwd=ROOT,
        )
        for hashed in ("infra/requirements-assets.txt", "infra/requirements-rie.txt"):
            run_logged(
                f"pip download ({hashed})",
                [*pip, "--no-deps", "--require-hashes", "-r", hashed],
                logs,
                timeout=900,
                cwd=ROOT,
            )

    def serve(self, logs: Path) -> None:
        handler = type("Handler", (_QuietHandler,), {"log_file": logs})
        self.server = http.server.ThreadingHTTPServer(
            (self.host, self.port), functools.partial(handler, directory=str(self.directory))
        )
        threading.Thread(target=self.server.serve_forever, name="wheelhouse", daemon=True).start()

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@dataclass
class BuiltImage:
    tag: str
    model: str
    base: str
    build_args: dict[str, str]
    seconds: float
    size_bytes: int
    layers: list[str] = field(default_factory=list)


def build_cli(settings: Settings) -> str:
    """The docker CLI to build with BuildKit: Debian's docker.io 20.10 CLI does it with DOCKER_BUILDKIT=1,
    while a newer CLI without its buildx plugin cannot (DOCKER_BUILD_CLI overrides)."""
    if settings.build_cli:
        return settings.build_cli
    if Path("/usr/bin/docker").exists():
        return "/usr/bin/docker"
    found = shutil.which("docker")
    assert found, "no docker CLI to build with"
    return found


def build_image(engine: Engine, settings: Settings, base: str, wheelhouse: Wheelhouse, logs: Path) -> BuiltImage:
    """`docker build` of the project's Dockerfile with BuildKit, a small model and the wheelhouse."""
    build_args = {
        "BASE_IMAGE": base,
        "BUILD_BASE_IMAGE": compiler_base(settings, base),
        "MODEL_ID": settings.model,
        "MODEL_DTYPE": "auto",
        **wheelhouse.build_args(),
    }
    command = [build_cli(settings), "build", "--progress", "plain"]
    if wheelhouse.build_network:
        command += ["--network", wheelhouse.build_network]
    command += [f"--build-arg={name}={value}" for name, value in build_args.items()]
    command += ["-t", settings.tag, str(ROOT)]
    log.info("building %s (MODEL_ID=%s, BASE_IMAGE=%s) with BuildKit", settings.tag, settings.model, base)
    started = time.monotonic()
    run_logged("docker build (BuildKit)", command, logs, timeout=3600, env={**os.environ, "DOCKER_BUILDKIT": "1"})
    seconds = time.monotonic() - started
    image = engine.client.images.get(settings.tag)
    layers = [
        f"{layer['Size'] / 2**20:9.1f} MiB  {layer['CreatedBy'][:100]}" for layer in image.history() if layer["Size"]
    ]
    return BuiltImage(settings.tag, settings.model, base, build_args, seconds, image.attrs["Size"], layers)


# ---------------------------------------------------------------------------------------------------
# The function's containers

# Runs inside the container (its own Python): waits for the RIE, then sends one invoke and prints the
# answer with its time. The event comes as argv chunks: the SDK's exec has no stdin, and one argument
# may not exceed 128 KiB (some events are bigger on purpose).
_CLIENT = r"""
import json, sys, time, urllib.error, urllib.request
url, timeout, data = sys.argv[1], float(sys.argv[2]), "".join(sys.argv[3:]).encode()
deadline = time.monotonic() + 60
while True:
    started = time.monotonic()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=timeout) as response:
            status, body = response.status, response.read()
        break
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
        break
    except urllib.error.URLError as exc:
        if not isinstance(exc.reason, ConnectionRefusedError) or time.monotonic() > deadline:
            raise
        time.sleep(0.2)
print(json.dumps({"seconds": time.monotonic() - started, "status": status, "body": body.decode(errors="replace")}))
"""
_ARG_CHUNK = 64 * 1024


@dataclass
class Invocation:
    """One answer: the HTTP status of whoever answered (the RIE, or SAM's API), the Lambda response (its
    JSON, or the text when it is not JSON) and the seconds it took."""

    seconds: float
    http_status: int
    response: Any

    @classmethod
    def of(cls, seconds: float, http_status: int, text: str) -> Invocation:
        try:
            response = json.loads(text)
        except ValueError:
            response = text
        return cls(seconds, http_status, response)

    @property
    def status_code(self) -> int:
        """The API Gateway status (statusCode of a proxy response), else the HTTP status."""
        if isinstance(self.response, dict) and "statusCode" in self.response:
            return int(self.response["statusCode"])
        return self.http_status

    @property
    def body(self) -> Any:
        """The decoded JSON body of a proxy response; the response itself for a direct invocation."""
        if isinstance(self.response, dict) and isinstance(self.response.get("body"), str):
            try:
                return json.loads(self.response["body"])
            except ValueError:
                return self.response["body"]
        return self.response

    def __str__(self) -> str:
        return f"HTTP {self.http_status} in {self.seconds:.2f} s: {json.dumps(self.response)[:800]}"


def is_loading(answer: Invocation) -> bool:
    """The function's answer while a new execution environment is still loading its model: 503 model_loading,
    when the load outlasts the request's deadline (API Gateway's 29 s count from the request's arrival)."""
    return answer.status_code == 503 and isinstance(answer.body, dict) and answer.body.get("error") == "model_loading"


def response_header(answer: Invocation, name: str) -> str | None:
    """A header of a proxy response, from `headers` or (REST API payloads) `multiValueHeaders`."""
    if not isinstance(answer.response, dict):
        return None
    single = {k.lower(): v for k, v in (answer.response.get("headers") or {}).items()}
    multi = {k.lower(): v for k, v in (answer.response.get("multiValueHeaders") or {}).items()}
    if name.lower() in single:
        return single[name.lower()]
    return multi[name.lower()][0] if multi.get(name.lower()) else None


def retry_after(answer: Invocation) -> float:
    """The wait the answer asks for, kept between 1 and 10 s (a test has no reason to wait longer)."""
    try:
        return min(10.0, max(1.0, float(response_header(answer, "Retry-After") or 1)))
    except ValueError:
        return 1.0


@dataclass
class ColdStart:
    """A new container's first request, sent again as the function asks (503 model_loading, Retry-After)
    until the model is loaded: how long a client waits for its first answer on this machine, whatever its
    load, without asserting a time."""

    answer: Invocation  # the first answer that is not "still loading"
    loading: list[Invocation]  # the 503 model_loading answers before it
    seconds: float  # from the first request to that answer


def invoke_until_loaded(function: FunctionContainer, event: str | dict | list, timeout: float = 900) -> ColdStart:
    started, loading = time.monotonic(), []
    while True:
        answer = function.invoke(event)
        if not is_loading(answer):
            return ColdStart(answer, loading, time.monotonic() - started)
        loading.append(answer)
        assert time.monotonic() - started < timeout, f"still loading after {timeout:.0f} s: {answer}"
        time.sleep(retry_after(answer))


def as_payload(event: str | dict | list) -> str:
    """An event name (events/<name>.json) or the event itself, as the JSON text to send."""
    return json.dumps(load_event(event) if isinstance(event, str) else event)


class FunctionContainer:
    """A running container of the image. `invoke(event)` sends a Lambda invoke to the RIE the image's entry
    script started: from the host through the published port when there is one, else from inside the
    container (docker exec), which works with --network none."""

    def __init__(self, container: Container, role: str, host_port: int | None) -> None:
        self.container = container
        self.role = role
        self.host_port = host_port
        self.invocations: list[Invocation] = []
        self.cold: ColdStart | None = None  # its first request, when a fixture made it on purpose

    @property
    def id(self) -> str:
        return self.container.id

    @property
    def attrs(self) -> dict:
        self.container.reload()
        return self.container.attrs

    def invoke(self, event: str | dict | list, timeout: float = 300) -> Invocation:
        if self.host_port is not None:
            return self.invoke_from_host(event, timeout)
        return self.invoke_inside(event, timeout)

    def invoke_inside(self, event: str | dict | list, timeout: float = 300) -> Invocation:
        payload = as_payload(event)
        chunks = [payload[i : i + _ARG_CHUNK] for i in range(0, len(payload), _ARG_CHUNK)] or [""]
        url = f"http://127.0.0.1:{RIE_CONTAINER_PORT}{INVOKE_PATH}"
        output = self.exec_python(_CLIENT, url, str(timeout), *chunks)
        answer = json.loads(output.splitlines()[-1])
        return self._record(Invocation.of(answer["seconds"], answer["status"], answer["body"]))

    def invoke_from_host(self, event: str | dict | list, timeout: float = 300) -> Invocation:
        """What the README's `curl -XPOST http://localhost:9001/2015-03-31/...` does."""
        assert self.host_port is not None, f"the {self.role} container publishes no port"
        base = f"http://127.0.0.1:{self.host_port}"
        wait_for_http(f"{base}/", timeout=60, alive=self.running)
        return self._record(post(f"{base}{INVOKE_PATH}", as_payload(event).encode(), timeout=timeout))

    def _record(self, invocation: Invocation) -> Invocation:
        self.invocations.append(invocation)
        log.info("%s: %s", self.role, invocation)
        return invocation

    def exec_python(self, code: str, *args: str, user: str = "") -> str:
        """Run Python code in the container (the image's own interpreter); its stdout, or a failure."""
        return self.exec(["python", "-c", code, *args], user=user)

    def exec(self, command: list[str], user: str = "", check: bool = True) -> str:
        result = self.container.exec_run(command, user=user, demux=True)
        stdout, stderr = (part.decode(errors="replace") if part else "" for part in result.output)
        if check and result.exit_code != 0:
            raise AssertionError(f"{command[:2]}... exited {result.exit_code} in the {self.role} container:\n{stderr}")
        return stdout if check else f"{result.exit_code}\n{stdout}{stderr}"

    def exit_code_of(self, command: list[str], user: str = "") -> int:
        return self.container.exec_run(command, user=user).exit_code

    def running(self) -> bool:
        return self.attrs["State"]["Running"]

    def logs(self) -> str:
        return _container_logs(self.container)


def post(url: str, data: bytes, timeout: float = 300, headers: dict[str, str] | None = None) -> Invocation:
    return http_request(url, data, "POST", timeout, headers)


def http_request(
    url: str, data: bytes | None = None, method: str = "GET", timeout: float = 300, headers: dict | None = None
) -> Invocation:
    """One HTTP request from the host; any status is an answer."""
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text = response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode(errors="replace")
    return Invocation.of(time.monotonic() - started, status, text)


class FunctionRunner:
    """Runs containers of the built image and removes them (by id) at the end of the session."""

    def __init__(self, engine: Engine, image: BuiltImage) -> None:
        self.engine = engine
        self.image = image
        self.started: list[FunctionContainer] = []

    def __call__(
        self,
        role: str,
        *,
        command: list[str] | None = None,
        entrypoint: list[str] | None = None,
        network: str = "none",
        publish_port: int | None = None,
        environment: dict[str, str] | None = None,
        read_only: bool = False,
        **run_options: Any,
    ) -> FunctionContainer:
        """Start a container of the image. `command` replaces the image's CMD (the handler, as ImageConfig.
        Command does), `entrypoint` its ENTRYPOINT; `network` is "none" or a network name; `publish_port`
        binds the RIE's port on 127.0.0.1 of the host; `read_only` gives it Lambda's file system (a
        read-only root and a writable /tmp)."""
        options: dict[str, Any] = {"labels": {LABEL: role}, "detach": True, **run_options}
        if network == "none":
            options["network_mode"] = "none"
        else:
            options["network"] = network
        if publish_port is not None:
            options["ports"] = {f"{RIE_CONTAINER_PORT}/tcp": ("127.0.0.1", publish_port)}
        if read_only:
            options.update(read_only=True, tmpfs={"/tmp": "rw,exec,size=512m"})
        container = self.engine.client.containers.run(
            self.image.tag, command=command, entrypoint=entrypoint, environment=environment or {}, **options
        )
        EVIDENCE.watch_container(container, f"{role} container")
        function = FunctionContainer(container, role, publish_port)
        self.started.append(function)
        log.info("started the %s container %s (network %s)", role, container.short_id, network)
        return function

    def remove(self, function: FunctionContainer) -> None:
        EVIDENCE.forget_container(function.container)
        with contextlib.suppress(docker.errors.NotFound):
            function.container.remove(force=True)
        if function in self.started:
            self.started.remove(function)

    def close(self) -> None:
        for function in list(self.started):
            self.remove(function)


ROUTE_READER = r"""
import json
def table(path):
    try:
        return [line.split() for line in open(path).read().splitlines()]
    except OSError:
        return []
print(json.dumps({
    "interfaces": [line.split(":")[0].strip() for line in open("/proc/net/dev").read().splitlines()[2:]],
    "ipv4": [dict(zip(["iface", "destination", "gateway", "flags", "refcnt", "use", "metric", "mask"], row))
             for row in table("/proc/net/route")[1:]],
    "ipv6": [{"destination": row[0], "prefix": row[1], "iface": row[-1]} for row in table("/proc/net/ipv6_route")],
}))
"""


def routes_inside(function: FunctionContainer) -> dict:
    """The container's interfaces and routing tables, read from /proc inside it (the image has no `ip`)."""
    return json.loads(function.exec_python(ROUTE_READER))


def default_routes(routes: dict) -> list[str]:
    """Routes that lead anywhere beyond the container's own loopback: its default routes."""
    found = [
        f"ipv4 default via {_hex_ipv4(r['gateway'])} dev {r['iface']}"
        for r in routes["ipv4"]
        if r["destination"] == "00000000" and r["mask"] == "00000000"
    ]
    found += [
        f"ipv6 default dev {r['iface']}"
        for r in routes["ipv6"]
        if set(r["destination"]) == {"0"} and r["prefix"] == "00" and r["iface"] != "lo"
    ]
    return found


def _hex_ipv4(value: str) -> str:
    return str(ipaddress.IPv4Address(int.from_bytes(bytes.fromhex(value), "little")))


# ---------------------------------------------------------------------------------------------------
# SAM CLI


def sam_cli_version() -> str:
    match = re.search(r"^aws-sam-cli==(\S+)", (ROOT / "infra" / "requirements-rie.txt").read_text(), re.MULTILINE)
    assert match, "infra/requirements-rie.txt pins no aws-sam-cli"
    return match.group(1)


def ensure_sam_cli(venv: Path, logs: Path) -> Path:
    """SAM CLI at the version infra/requirements-rie.txt pins, in its own virtualenv (its pinned click
    conflicts with huggingface_hub)."""
    sam, version = venv / "bin" / "sam", sam_cli_version()
    if sam.exists():
        shown = subprocess.run([str(sam), "--version"], capture_output=True, text=True, check=False).stdout
        if version in shown:
            return sam
    log.info("installing aws-sam-cli==%s in %s", version, venv)
    run_logged("python3 -m venv (SAM CLI)", ["python3", "-m", "venv", str(venv)], logs, timeout=300)
    run_logged(
        "pip install aws-sam-cli",
        [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", f"aws-sam-cli=={version}"],
        logs,
        timeout=1800,
    )
    return sam


def sam_template(source: Path, build_args: dict[str, str], out: Path) -> list[str]:
    """template.yaml as `sam build` must see it here: the small model, the base and the wheelhouse instead of
    Phi-2, the registry's base and PyPI; everything else unchanged. Returns the images `sam build` will tag."""
    from samtranslator.yaml_helper import yaml_parse

    template = yaml_parse(source.read_text())
    images = []
    for name, resource in template["Resources"].items():
        metadata = resource.get("Metadata", {})
        if "Dockerfile" in metadata:
            metadata["DockerContext"] = str(ROOT)
            metadata["DockerBuildArgs"] = {**metadata.get("DockerBuildArgs", {}), **build_args}
            images.append(f"{name.lower()}:{metadata.get('DockerTag', 'latest')}")
    out.write_text(json.dumps(template, indent=1))
    return images


# API Gateway's integration timeout (29 s, which the function assumes for API events), and a second more.
SAM_FROZEN_CLOCK_SECONDS = 30.0


@dataclass
class SamApi:
    """A running `sam local start-api`."""

    process: subprocess.Popen
    url: str
    output: Path

    def stop(self) -> None:
        # Ctrl-C: SAM CLI then removes its warm containers itself.
        stop_process_group(self.process, first=signal.SIGINT, grace=15)


def start_api(sam: Path, work: Path, port: int) -> SamApi:
    output = work / "sam-start-api.log"
    EVIDENCE.watch_file(output, "sam local start-api")
    command = [str(sam), "local", "start-api", "--template-file", "build/template.yaml", "--port", str(port)]
    command += ["--skip-pull-image", "--warm-containers", "LAZY"]
    with output.open("ab") as out:
        process = subprocess.Popen(
            command,
            cwd=work,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "SAM_CLI_TELEMETRY": "0"},
        )
    api = SamApi(process, f"http://127.0.0.1:{port}", output)
    try:
        # An unknown path: SAM answers 403 itself, without starting the function.
        wait_for_http(f"{api.url}/", timeout=120, alive=lambda: process.poll() is None)
        ready = time.monotonic()
        # SAM CLI stamps every REST API event with the time it imported its event module, so with the time it
        # started (aws/aws-sam-cli#9279: default arguments, evaluated once). Until API Gateway's 29 s have
        # passed since, the function takes each request for one that waited that long and answers that its
        # deadline is gone; past them it sees a replayed event and counts from its arrival. Meanwhile one
        # request starts the function's container, whose model then loads.
        http_request(f"{api.url}/health", timeout=120)
        remaining = ready + SAM_FROZEN_CLOCK_SECONDS - time.monotonic()
        if remaining > 0:
            log.info("waiting %.0f s: SAM CLI's frozen request time (its bug #9279) must look old", remaining)
            time.sleep(remaining)
    except BaseException:
        api.stop()
        raise
    return api


def run_sam_local_invoke(sam: Path, work: Path, event: str, function: str = "GenerateFunction") -> Invocation:
    """`sam local invoke -e events/<event>.json`: its last line of output is the function's response."""
    stdout, stderr = work / f"sam-invoke-{event}.out", work / f"sam-invoke-{event}.log"
    EVIDENCE.watch_file(stderr, f"sam local invoke -e events/{event}.json")
    command = [str(sam), "local", "invoke", "--template-file", "build/template.yaml", "--skip-pull-image"]
    command += ["-e", str(EVENTS / f"{event}.json"), function]
    started = time.monotonic()
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            command,
            cwd=work,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            env={**os.environ, "SAM_CLI_TELEMETRY": "0"},
        )
        try:
            code = process.wait(timeout=900)
        finally:
            stop_process_group(process)
    seconds = time.monotonic() - started
    if code < 0:
        raise AssertionError(f"sam local invoke was killed by {signal.Signals(-code).name}:\n{tail_file(stderr, 40)}")
    assert code == 0, f"sam local invoke failed (exit code {code}):\n{tail_file(stderr, 40)}"
    lines = stdout.read_text().strip().splitlines()
    assert lines, f"sam local invoke printed no response:\n{tail_file(stderr, 40)}"
    return Invocation.of(seconds, 200, lines[-1])


def remove_containers_of(client: docker.DockerClient, images: list[str]) -> None:
    """Remove, by id, the containers SAM CLI ran from the images it built (it removes them itself on a clean
    exit)."""
    for image in images:
        try:
            found = client.containers.list(all=True, filters={"ancestor": image})
        except docker.errors.DockerException:
            continue
        for container in found:
            EVIDENCE.forget_container(container)
            with contextlib.suppress(docker.errors.NotFound):
                client.containers.get(container.id).remove(force=True)
