"""The image's streaming entry point: the same image run with template.yaml's streaming Command
(`phi2.runtime.stream_runtime`), as Lambda runs it (no network, read-only root with a /tmp), invoked through the RIE
its own entry script started. The RIE returns a stream whole: the prelude, the 8-NUL delimiter and the
Server-Sent Events, whose text is the buffered container's for the same greedy request; and streamed tool calls
in OpenAI's delta shape, which the real `openai` SDK's stream accumulator turns into the calls."""

from __future__ import annotations

import json
import time

import pytest
from openai.lib.streaming.chat._completions import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk
from samtranslator.yaml_helper import yaml_parse

from image.image_harness import ROOT, load_event

pytestmark = pytest.mark.image

STREAM_COMMAND = ["phi2.runtime.stream_runtime"]
GREEDY = {"prompt": "The capital of France is", "max_new_tokens": 12, "do_sample": False}


def event_on(path: str, body: dict) -> dict:
    event = load_event("rest-generate-greedy")
    event["path"] = path
    event["body"] = json.dumps(body)
    return event


def split(text: str) -> tuple[dict, str]:
    """A streamed answer as the RIE returns it: the JSON prelude, then the body after 8 NULs."""
    head, delimiter, body = text.partition("\0" * 8)
    assert delimiter, f"no prelude delimiter in {text[:300]!r}"
    return json.loads(head), body


@pytest.fixture(scope="module")
def streaming_function(template_command, run_function):
    function = run_function("streaming", command=template_command, network="none", read_only=True)
    # The model loads in the background of the init phase: the first requests may be told to come back.
    for _ in range(90):
        answer = function.invoke("rest-health")
        if isinstance(answer.response, str) and split(answer.response)[0]["statusCode"] == 200:
            break
        time.sleep(2)
    yield function
    run_function.remove(function)


@pytest.fixture(scope="module")
def template_command() -> list[str]:
    """The streaming function's ImageConfig.Command in template.yaml."""
    template = yaml_parse((ROOT / "template.yaml").read_text())
    command = template["Resources"]["StreamFunction"]["Properties"]["ImageConfig"]["Command"]
    assert command == STREAM_COMMAND
    return command


# Run inside the container: every process's command line and uid.
PROCESSES = r"""
import json, os
found = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        uid = next(line.split()[1] for line in open(f"/proc/{pid}/status") if line.startswith("Uid:"))
        command = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode().strip()
    except (OSError, StopIteration):
        continue
    found[command] = uid
print(json.dumps(found))
"""


def test_the_streaming_command_runs_the_streaming_runtime_under_the_rie_as_a_non_root_user(streaming_function):
    processes = json.loads(streaming_function.exec_python(PROCESSES))
    runtime = [command for command in processes if "-m phi2.runtime.stream_runtime" in command]
    assert runtime, processes
    assert not [command for command in processes if "awslambdaric" in command], processes
    assert all(processes[command] != "0" for command in runtime)


def test_a_stream_comes_back_as_prelude_delimiter_and_sse_with_the_buffered_text(streaming_function, invoke):
    # GIVEN the buffered container's answer to a greedy /generate
    expected = invoke(event_on("/generate", GREEDY)).body
    # WHEN the streaming container answers /generate_stream for the same request
    answer = streaming_function.invoke(event_on("/generate_stream", GREEDY))
    # THEN it is a 200 event-stream prelude, the delimiter, then events
    prelude, body = split(answer.response)
    assert prelude["statusCode"] == 200
    assert prelude["headers"]["Content-Type"].startswith("text/event-stream")
    blocks = body.split("\n\n")
    assert blocks[0] == ": ok" and blocks[-1] == ""
    payloads = [json.loads(block.removeprefix("data: ")) for block in blocks[1:-1]]
    # AND the tokens' texts make the final answer, which is the buffered container's text (greedy), or, when
    # either answer was cut by its deadline on a loaded machine, the two agree as far as both got
    tokens = "".join(p["token"]["text"] for p in payloads[:-1])
    streamed = payloads[-1]["generated_text"]
    assert GREEDY["prompt"] + tokens == streamed
    if "time_limit" in (payloads[-1]["details"]["finish_reason"], expected["details"]["finish_reason"]):
        shorter, longer = sorted([streamed, expected["generated_text"]], key=len)
        assert longer.startswith(shorter)
    else:
        assert streamed == expected["generated_text"]
        assert "Paris" in tokens


def test_a_bad_request_is_a_normal_error_answer(streaming_function):
    answer = streaming_function.invoke(event_on("/generate_stream", {"prompt": ""}))
    prelude, body = split(answer.response)
    assert prelude["statusCode"] == 422 and json.loads(body)["error"] == "validation_error"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}


def test_streamed_tool_calls_come_in_openais_delta_shape(streaming_function):
    # GIVEN a chat that must call a tool, streamed
    body = {
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "temperature": 0,
        "max_tokens": 80,
        "stream": True,
    }
    answer = streaming_function.invoke(event_on("/chat/completions", body))
    prelude, stream = split(answer.response)
    assert prelude["statusCode"] == 200, stream[:500]
    blocks = [block.removeprefix("data: ") for block in stream.split("\n\n") if block.startswith("data: ")]
    assert blocks[-1] == "[DONE]"
    # WHEN the SDK's own stream accumulator reads the chunks
    state = ChatCompletionStreamState()
    for block in blocks[:-1]:
        state.handle_chunk(ChatCompletionChunk.model_validate(json.loads(block)))
    choice = state.current_completion_snapshot.choices[0]
    # THEN it is one call of get_weather, its arguments whole JSON of the schema, finish_reason tool_calls
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius", "fahrenheit")
    assert choice.finish_reason == "tool_calls"
