"""The image run as Lambda runs it: no network at all, a read-only root file system with a /tmp, invoked
from inside the container through the RIE its own entry script started (docker exec)."""

from __future__ import annotations

import pytest

from image.image_harness import default_routes, response_header, routes_inside

pytestmark = pytest.mark.image

# Run inside the container: every process but this check's own, with its uid.
PROCESSES = r"""
import json, os
me = {str(os.getpid()), str(os.getppid())}
found = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    if pid in me:
        continue
    try:
        uid = next(line.split()[1] for line in open(f"/proc/{pid}/status") if line.startswith("Uid:"))
        command = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode().strip()
    except (OSError, StopIteration):
        continue
    found[command] = uid
print(json.dumps(found))
"""

# Run inside the container: files under the given roots that are not root-owned, or that group or others
# may write, or that others may not read.
LOOSE_FILES = r"""
import json, os, stat, sys
loose = []
for top in sys.argv[1:]:
    for folder, dirs, files in os.walk(top):
        for name in [".", *files]:
            path = os.path.join(folder, name)
            mode = os.lstat(path)
            if mode.st_uid != 0 or mode.st_mode & 0o022 or not mode.st_mode & stat.S_IROTH:
                loose.append(f"{path} uid={mode.st_uid} mode={oct(mode.st_mode)}")
print(json.dumps(loose))
"""


def test_the_offline_container_has_no_network_but_its_loopback(offline_function):
    # GIVEN the container run with --network none
    attrs = offline_function.attrs
    assert attrs["HostConfig"]["NetworkMode"] == "none"
    assert set(attrs["NetworkSettings"]["Networks"]) <= {"none"}
    # WHEN its interfaces and routing tables are read inside it
    routes = routes_inside(offline_function)
    # THEN it has a loopback interface only, and no route leads out of it
    assert routes["interfaces"] == ["lo"], routes
    assert routes["ipv4"] == [], routes
    assert default_routes(routes) == [], routes


def test_the_cold_start_answers_the_greedy_prompt_once_loaded_and_asks_to_retry_before(offline_function, settings):
    # GIVEN the container's first request (events/rest-generate-greedy.json), sent while its model loads
    cold = offline_function.cold
    # THEN any answer before the model was ready said so, and when to come back
    for loading in cold.loading:
        assert loading.http_status == 200 and response_header(loading, "Retry-After"), loading
    # AND then it answered 200 with the prompt continued
    first = cold.answer
    assert first.http_status == 200 and first.status_code == 200, first
    assert first.body["generated_text"].startswith("The capital of France is"), first
    # AND SmolLM2 knows the answer, unless the load left too little of the request's deadline to give it (the
    # answer then says so: time_limit; the warm requests below must give it)
    if settings.model == "smollm2" and first.body["details"]["finish_reason"] != "time_limit":
        assert "Paris" in first.body["generated_text"], first


def test_a_warm_invoke_answers_the_greedy_prompt(offline_function, invoke, settings, report):
    # GIVEN the warm container WHEN the greedy prompt comes again
    warm = invoke("rest-generate-greedy")
    report["warm_invoke_seconds"] = round(warm.seconds, 2)
    # THEN it answers the same way, without loading the model again
    assert warm.status_code == 200, warm
    assert warm.body["generated_text"].startswith("The capital of France is"), warm
    if settings.model == "smollm2":
        assert "Paris" in warm.body["generated_text"], warm


def test_the_seeds_prompt_is_answered(invoke):
    # WHEN the seed's request comes as an API Gateway event
    answer = invoke("rest-generate-seed-prompt")
    # THEN the text continues the prompt (it samples: it may stop at once, so only the shape is checked)
    assert answer.status_code == 200, answer
    assert answer.body["generated_text"].startswith("In international football"), answer


def test_a_missing_prompt_is_a_422_with_the_request_id(invoke):
    answer = invoke("rest-generate-missing-prompt")
    assert answer.status_code == 422, answer
    assert answer.body["error"] == "validation_error" and answer.body["request_id"], answer


def test_malformed_json_is_a_400(invoke):
    answer = invoke("rest-generate-malformed-json")
    assert answer.status_code == 400, answer
    assert answer.body["error"] == "invalid_json", answer


def test_health_after_bad_inputs_reports_the_model_loaded_and_warm(invoke):
    # GIVEN a warm container that was just sent bad input
    assert invoke("rest-generate-malformed-json").status_code == 400
    # WHEN health is asked
    health = invoke("rest-health")
    # THEN the model is still loaded, in the same execution environment, with its revision
    assert health.status_code == 200, health
    assert health.body["loaded"] is True and health.body["cold_start"] is False, health
    assert health.body["model"]["revision"], health


def test_a_direct_invocation_gets_plain_json(invoke):
    # WHEN invoked as `aws lambda invoke` does: plain JSON, no API Gateway envelope
    answer = invoke("direct-generate")
    # THEN the answer is the plain response
    assert answer.http_status == 200 and answer.body["generated_text"], answer


def test_every_process_of_the_image_runs_unprivileged(offline_function):
    # GIVEN the container after it served requests
    processes = offline_function.exec_python(PROCESSES)
    import json

    found = json.loads(processes)
    # THEN the RIE and the Python runtime are among its processes
    assert any("aws-lambda-rie" in command for command in found), found
    assert any("awslambdaric" in command for command in found), found
    # AND none runs as root
    assert {command: uid for command, uid in found.items() if uid == "0"} == {}, found


def test_the_weights_and_the_code_belong_to_root_and_only_root_may_change_them(offline_function):
    # GIVEN the image's weights and code
    import json

    loose = json.loads(offline_function.exec_python(LOOSE_FILES, "/opt/model", "/var/task"))
    # THEN every file is root-owned, world-readable, and writable by no one else
    assert loose == [], loose[:20]
    # AND the function's user cannot add a file to the weights
    assert offline_function.exit_code_of(["sh", "-c", "touch /opt/model/probe"], user="1000") != 0


def test_the_image_never_reaches_for_the_model_hub_and_holds_a_cpu_torch(offline_function):
    assert offline_function.exec(["printenv", "HF_HUB_OFFLINE"]).strip() == "1"
    cuda = offline_function.exec_python("import torch; print(torch.version.cuda)").strip()
    assert cuda == "None", f"the image's torch is a CUDA build ({cuda})"
