"""Security: nothing the caller wrote, and nothing the model generated, reaches the logs by default; weights
come only from safetensors and never with remote code; serving writes nothing into the model directory;
every dependency is pinned."""

from __future__ import annotations

import ast
import copy
import json
import re
import time
import uuid
from pathlib import Path

import pytest
from conftest import ROOT, load_event
from rie import RieServer, api_body

from phi2.engine.generator import GenerationParams
from phi2.engine.hf_generator import TransformersGenerator

SOURCES = sorted([*(ROOT / "function").rglob("*.py"), *(ROOT / "infra").rglob("*.py")])


def _rest(body: dict) -> dict:
    event = copy.deepcopy(load_event("rest-generate-seed-prompt"))
    event["body"] = json.dumps(body)
    return event


@pytest.mark.e2e
def test_prompts_and_generated_text_stay_out_of_the_runtime_logs_by_default(tiny_phi_dir):
    # GIVEN the function under the RIE with default settings, and a prompt no log line could contain by chance
    canary = f"canary-{uuid.uuid4().hex}"
    rie = RieServer(tiny_phi_dir)
    try:
        # WHEN the prompt arrives in a good request, a direct one, a batch, and in rejected ones
        single = api_body(rie.invoke(_rest({"prompt": f"{canary} says", "max_new_tokens": 12, "do_sample": False})))
        direct = rie.invoke({"prompt": f"{canary} again", "max_new_tokens": 12, "do_sample": False})
        batch = api_body(
            rie.invoke(_rest({"prompts": [canary, f"{canary}!"], "max_new_tokens": 12, "do_sample": False}))
        )
        rejected = [
            rie.invoke(_rest({"prompt": canary, "max_tokens": 5, canary: 1})),
            rie.invoke(_rest({"prompt": canary * 400, "max_new_tokens": 1024})),  # context overflow
            rie.invoke({"prompt": canary, "temperature": "warm"}),
        ]
        logs = rie.logs()
    finally:
        rie.stop()
    # THEN the requests were served or refused as usual, and each generation logged a summary line...
    served = {f"{canary} says": single["generated_text"], f"{canary} again": direct["generated_text"]}
    served.update(zip([canary, f"{canary}!"], batch["generated_text"], strict=True))
    assert [r.get("statusCode", r.get("status_code")) for r in rejected] == [422, 422, 422]
    assert logs.count('"message":"generated"') == 3
    # ...but neither the prompt nor the generated text is in the logs
    assert canary not in logs
    for prompt, text in served.items():
        continuation = text.removeprefix(prompt)
        assert len(continuation) >= 10 and continuation not in logs


def _calls(path: Path) -> list[ast.Call]:
    return [node for node in ast.walk(ast.parse(path.read_text(), str(path))) if isinstance(node, ast.Call)]


def _name(call: ast.Call) -> str:
    return ast.unparse(call.func)


def test_trust_remote_code_is_never_enabled_anywhere():
    # GIVEN every call in the function and the build scripts
    for source in SOURCES:
        for call in _calls(source):
            # THEN no call passes trust_remote_code anything but a literal False
            for keyword in call.keywords:
                if keyword.arg == "trust_remote_code":
                    assert isinstance(keyword.value, ast.Constant) and keyword.value.value is False, (
                        f"{source.name}:{call.lineno} {_name(call)}"
                    )


def test_the_served_model_is_loaded_only_from_safetensors_and_only_locally():
    # GIVEN the loader: every transformers loader goes through its `_loading` helper
    calls = _calls(ROOT / "function" / "phi2" / "engine" / "hf_generator.py")
    loaders = [c for c in calls if _name(c) == "_loading"]
    assert {ast.unparse(c.args[2]).split(".")[0] for c in loaders} == {
        "AutoConfig",
        "AutoTokenizer",
        "AutoModelForCausalLM",
    }
    assert not [c for c in calls if _name(c).endswith("from_pretrained")]  # nothing bypasses the helper
    # THEN the helper reads local files only, without remote code...
    (inner,) = [c for c in calls if _name(c) == "load"]
    keywords = {k.arg: ast.literal_eval(k.value) for k in inner.keywords if isinstance(k.value, ast.Constant)}
    assert keywords == {"local_files_only": True, "trust_remote_code": False}
    # ...and the weights only from safetensors
    (weights,) = [c for c in loaders if "ForCausalLM" in ast.unparse(c.args[2])]
    assert {k.arg: ast.unparse(k.value) for k in weights.keywords}["use_safetensors"] == "True"
    # AND nothing in the function can unpickle
    function_code = "\n".join(p.read_text() for p in (ROOT / "function").rglob("*.py"))
    assert not re.search(
        r"\bimport pickle\b|\bpickle\.loads?\(|\btorch\.load\(|\bweights_only\s*=\s*False", function_code
    )


@pytest.mark.slow
def test_loading_and_serving_write_nothing_into_the_model_directory(tiny_phi_dir):
    # GIVEN the prepared model directory (read-only in Lambda: an image layer)
    def snapshot() -> dict[str, tuple[int, int]]:
        return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(tiny_phi_dir.iterdir())}

    before = snapshot()
    # WHEN the model is loaded (with warm-up) and generates
    generator = TransformersGenerator.load(tiny_phi_dir, warmup=True)
    generator.generate(["Hello"], GenerationParams(max_new_tokens=4), time.monotonic() + 60)
    # THEN not a file was added, removed or changed
    assert snapshot() == before


def _requirements(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\[\],-]+)==([^\s;]+)(\s+--hash=sha256:[0-9a-f]{64})*", line)
        assert match, f"{path.name}: {line!r} is not pinned with =="
        pins[re.sub(r"\[.*\]", "", match.group(1)).lower().replace("_", "-")] = match.group(2)
    return pins


def test_every_dependency_is_pinned_and_the_constraints_agree():
    # GIVEN the constraints file and every requirements file
    constraints = _requirements(ROOT / "constraints.txt")
    for name in ("function/requirements.txt", "requirements-dev.txt", "infra/requirements-prepare.txt"):
        # THEN each requirement is pinned to exactly the version the constraints pin
        for package, version in _requirements(ROOT / name).items():
            assert constraints.get(package) == version, (
                f"{name}: {package}=={version}, constraints: {constraints.get(package)}"
            )
    # AND the data-only packages and the RIE's wheel are pinned by hash as well
    for name in ("infra/requirements-assets.txt", "infra/requirements-rie.txt"):
        for line in (ROOT / name).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                assert "==" in line and "--hash=sha256:" in line, line
