"""The Dockerfile's promises, read from the file itself (the image is built and run for real by
`make image-test`): pinned base, CPU torch, layer order, non-root, offline, no secrets in layers, no
package index of its own."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from deployables import DOCKERFILE, ROOT, parse_dockerfile

PINNED_PYTHON_SLIM = re.compile(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}")


def runtime_copies() -> list[str]:
    return parse_dockerfile().stage("runtime").all("COPY")


def index_of(copies: list[str], destination: str) -> int:
    return next(i for i, args in enumerate(copies) if args.split()[-1].rstrip("/") == destination)


def test_every_stage_starts_from_the_pinned_slim_python_given_by_a_build_arg():
    dockerfile = parse_dockerfile()
    # THEN the default base is a Python 3.11 slim image pinned by digest, and a build arg can replace it
    assert PINNED_PYTHON_SLIM.fullmatch(dockerfile.global_args["BASE_IMAGE"])
    # AND the compiler stage's base defaults to that same image (a builder without a Debian mirror passes one
    # that has gcc already)
    assert dockerfile.global_args["BUILD_BASE_IMAGE"] == "${BASE_IMAGE}"
    names = set()
    for stage in dockerfile.stages:
        # AND each stage starts from it or from an earlier stage; only the kernels stage from the compiler base
        allowed = ("${BUILD_BASE_IMAGE}",) if stage.name == "kernels" else ("${BASE_IMAGE}",)
        assert stage.base in allowed or stage.base in names, stage.base
        names.add(stage.name)
    assert dockerfile.stages[-1].name == "runtime"


def test_layers_go_dependencies_then_weights_then_code():
    copies = runtime_copies()
    # THEN the runtime stage adds the virtualenv, then the model, then the function's code
    venv, model, code = (index_of(copies, d) for d in ("/opt/venv", "/opt/model", "/var/task"))
    assert venv < model < code
    # AND the virtualenv comes from the dependencies stage (not the one with preparation-only packages)
    assert copies[venv].startswith("--from=deps ")
    assert copies[model].startswith("--from=build ")


def test_dependencies_are_the_pinned_runtime_requirements_with_cpu_torch():
    dockerfile = parse_dockerfile()
    deps = dockerfile.stage("deps")
    (install,) = [run for run in deps.all("RUN") if "pip install" in run]
    # THEN the runtime venv gets function/requirements.txt under the project's lock file
    assert "function/requirements.txt" in deps.all("COPY")[0] and "constraints.txt" in deps.all("COPY")[0]
    assert "-c /src/constraints.txt -r /src/requirements.txt" in install
    # AND torch comes from the PyTorch CPU index unless the builder points pip elsewhere
    assert "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu" in deps.all("ARG")
    # AND torch is installed alone and checked before everything else (a CUDA build stops the build early)
    alone, check, everything = (
        install.index("pip install --quiet --no-deps -c /src/constraints.txt torch "),
        install.index(cuda_check_code()),
        install.index("-r /src/requirements.txt"),
    )
    assert alone < check < everything
    assert "awslambdaric" in (ROOT / "function" / "requirements.txt").read_text()


def cuda_check_code() -> str:
    """The Python code the deps stage runs on the freshly installed torch."""
    (install,) = [run for run in parse_dockerfile().stage("deps").all("RUN") if "pip install" in run]
    words = shlex.split(install)
    at = next(i for i, word in enumerate(words) if word == "/opt/venv/bin/python" and words[i + 1] == "-c")
    return words[at + 2]


def fake_torch(root: Path, cuda: str | None) -> Path:
    (root / "torch").mkdir(parents=True)
    (root / "torch" / "__init__.py").write_text("raise ImportError('the check must not import torch')\n")
    (root / "torch" / "version.py").write_text(
        f"from typing import Optional\n__version__ = '2.13.0'\ncuda: Optional[str] = {cuda!r}\n"
    )
    return root


@pytest.mark.parametrize("cuda", ["12.8", None])
def test_a_cuda_torch_stops_the_build_with_the_build_arg_to_set(tmp_path, cuda):
    # GIVEN a torch package of a CUDA or a CPU build, installed without its dependencies
    site = fake_torch(tmp_path, cuda)
    # WHEN the Dockerfile's check runs on it
    done = subprocess.run(
        [sys.executable, "-c", cuda_check_code()],
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode >= 0, f"killed by {signal.Signals(-done.returncode).name}"
    if cuda:
        # THEN a CUDA build fails it, naming the build argument that brings the CPU build
        assert done.returncode == 1, done
        assert "CUDA build (CUDA 12.8)" in done.stderr and "PIP_EXTRA_INDEX_URL" in done.stderr, done.stderr
    else:
        # AND a CPU build passes
        assert done.returncode == 0, done.stderr


def test_pip_finds_packages_where_the_builder_says_and_only_the_torch_cpu_index_is_named():
    dockerfile = parse_dockerfile()
    for stage in dockerfile.stages:
        args = dict(arg.partition("=")[::2] for arg in stage.all("ARG"))
        # THEN no stage names a package index of its own: pip's defaults, or the build args, decide
        for name in ("PIP_INDEX_URL", "PIP_FIND_LINKS", "PIP_TRUSTED_HOST"):
            assert not args.get(name), (stage.name, name, args[name])
    # AND the only remote address in the Dockerfile is the PyTorch CPU index, the default that keeps CUDA out
    assert remote_addresses(DOCKERFILE.read_text()) == {"https://download.pytorch.org/whl/cpu"}


def test_the_image_harness_names_no_host():
    # GIVEN the scripts and tests that build and run the image
    files = [*(ROOT / "infra" / "docker").glob("*.sh"), *(ROOT / "tests" / "image").glob("*.py")]
    assert files
    for path in files:
        # THEN none names a host to fetch from (they use the host's own configuration: pip's, apt's)
        assert remote_addresses(path.read_text()) == set(), path


def remote_addresses(text: str) -> set[str]:
    """URLs with a literal host name other than the loopback's."""
    found = re.findall(r"\b(?:https?|ftp)://[A-Za-z][^\s\"'`)]*", text)
    return {url for url in found if urlsplit(url).hostname != "localhost"}


def test_model_is_baked_by_the_projects_preparation_script_from_build_args():
    dockerfile = parse_dockerfile()
    build = dockerfile.stage("build")
    prepare = next(run for run in build.all("RUN") if "prepare_model.py" in run)
    # THEN the build stage runs infra/prepare_model.py with the model, revision and dtype build args
    assert (
        '"$MODEL_ID"' in prepare and '--dtype "$MODEL_DTYPE"' in prepare and '--revision "$MODEL_REVISION"' in prepare
    )
    assert "--out /opt/model" in prepare and "--verify" in prepare
    args = dockerfile.args()
    assert args["MODEL_ID"] == "microsoft/phi-2" and args["MODEL_DTYPE"] == "auto"
    # AND the serving format is the int8 one by default (the fastest that passed the quality gate)
    assert args["MODEL_FORMAT"] == "int8" and '--format "$MODEL_FORMAT"' in prepare
    import prepare_model

    assert args["MODEL_FORMAT"] in prepare_model.FORMATS
    # AND the weights live outside /tmp, where the function reads them
    assert dockerfile.stage("runtime").env()["MODEL_DIR"] == "/opt/model"


def test_the_weights_step_sees_only_the_code_that_writes_them_and_that_code_runs(tmp_path):
    # GIVEN the files the build stage copies before it prepares the weights (the calibrate stage, later,
    # gets the whole package)
    build = parse_dockerfile().stage("build")
    copied = [Path(part) for args in build.all("COPY") for part in shlex.split(args)[:-1]]
    sources = [path for path in copied if path.suffix == ".py"]
    assert Path("function") not in copied and Path("function/") not in copied
    # WHEN just those files are laid out as in the image and the preparation script starts
    for source in sources:
        target = tmp_path / source
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((ROOT / source).read_bytes())
    result = subprocess.run(
        [sys.executable, str(tmp_path / "infra" / "prepare_model.py"), "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    # THEN everything it imports is there: editing the handler cannot invalidate the weights layer, and
    # a module the preparation needs cannot be forgotten
    assert result.returncode == 0, result.stderr[-2000:]
    # AND the runtime adds the weights, then their calibration (a measurement, different on every build),
    # both before the code
    copies = runtime_copies()
    calibration = index_of(copies, "/opt/model/calibration.json")
    assert index_of(copies, "/opt/model") < calibration < index_of(copies, "/var/task")
    assert copies[calibration].startswith("--from=calibrate ")


def test_runtime_drops_root_then_runs_the_entry_script_offline():
    runtime = parse_dockerfile().stage("runtime")
    env = runtime.env()
    dropper, entry_script = runtime.exec_form("ENTRYPOINT")
    copies = runtime.all("COPY")
    # THEN the first process is the privilege dropper, and it hands over to the project's entry script
    assert f"infra/docker/drop-root.sh {dropper}" in copies
    assert f"infra/entrypoint.sh {entry_script}" in copies
    # AND the dropper switches root to the unprivileged user the image creates
    drop_root = (ROOT / "infra" / "docker" / "drop-root.sh").read_text()
    assert re.search(r"setpriv --reuid=\"\$\{RUN_AS_UID:-1000\}\"", drop_root)
    assert any("useradd" in run and "--uid 1000" in run for run in runtime.all("RUN"))
    # AND no USER instruction: `sam local` adds a layer whose RUN needs root (the dropper covers it)
    assert not runtime.all("USER")
    # AND the function never reaches for the model hub, and runs from Lambda's task root
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["LAMBDA_TASK_ROOT"] == "/var/task"


def test_any_builder_builds_it_and_no_secret_or_certificate_enters_a_layer():
    dockerfile = parse_dockerfile()
    for stage in dockerfile.stages:
        for keyword, args in stage.instructions:
            # THEN no BuildKit-only flag: `sam build` (Docker's classic builder by default) builds it too
            assert not args.startswith(("--mount", "--network", "--security")), args
            assert not (keyword in ("COPY", "ADD") and re.search(r"--(chmod|link|parents|exclude)\b", args)), args
            # AND no credential or CA bundle is copied, set or passed as a build arg
            if keyword in ("COPY", "ADD"):
                assert not re.search(r"\.(crt|pem|key)\b|secret|credential", args, re.IGNORECASE), args
            if keyword in ("ENV", "ARG"):
                assert not re.search(r"PIP_CERT|SSL_CERT|CA_BUNDLE|TOKEN|PASSWORD|SECRET", args), args


def test_dockerignore_sends_only_what_the_dockerfile_copies():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def sent(path: str) -> bool:
        included = True
        for pattern in patterns:
            negated, glob = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, glob) or path.startswith(glob + "/"):
                included = negated
        return included

    # THEN everything the Dockerfile copies from the context is sent
    for stage in parse_dockerfile().stages:
        for args in stage.all("COPY"):
            if args.startswith("--from="):
                continue
            for source in args.split()[:-1]:
                if not source.startswith("--"):
                    assert sent(source.rstrip("/")), source
    # AND the virtualenv, model cache, build outputs and git history are not
    for local_state in (".venv/bin/python", ".cache/models/x", ".git/HEAD", ".aws-sam/build", "tests/conftest.py"):
        assert not sent(local_state), local_state


def test_the_kernel_library_is_compiled_in_a_build_stage_and_only_the_library_reaches_the_runtime():
    dockerfile = parse_dockerfile()
    kernels = dockerfile.stage("kernels")
    # THEN a stage of its own installs Debian's C compiler (unless its base has one) and builds the library
    # from the checked-in source
    install = " ".join(kernels.all("RUN"))
    assert "command -v gcc" in install and "apt-get install" in install and re.search(r"\bgcc\b", install)
    assert any("build.sh" in run for run in kernels.all("RUN"))
    copied = " ".join(kernels.all("COPY"))
    assert "function/phi2/engine/kernels/build.sh" in copied and "function/phi2/engine/kernels/csrc/" in copied
    # AND the runtime stage installs no compiler, and takes the built library from that stage to where the
    # loader looks for it (phi2/engine/kernels/libphi2kernels.so under the task root)
    runtime = dockerfile.stage("runtime")
    assert not any("gcc" in run or "g++" in run for run in runtime.all("RUN"))
    library = [c for c in runtime.all("COPY") if c.startswith("--from=kernels")]
    assert [c.split()[-1] for c in library] == ["/var/task/phi2/engine/kernels/libphi2kernels.so"]
    # AND a library built on the host never enters the build context (it could replace the built one)
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "**/*.so" in ignored
    # AND the calibration runs with the library the image ships, so its timings are the served kernels'
    assert any(c.startswith("--from=kernels") for c in dockerfile.stage("calibrate").all("COPY"))
