"""Tool calls for a model with no tool format of its own (Phi-2 has none; neither has SmolLM2's chat template):
how the tools appear in the prompt, the one grammar a reply follows, and how a reply becomes OpenAI's
`tool_calls`, whole or streamed.

The format (llama.cpp's "generic" tool format in spirit: one grammar allows either a reply in text or a call):

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

one call per line when `parallel_tool_calls` allows several (at most MAX_PARALLEL_CALLS). The arguments follow
the function's `parameters` schema, compact JSON as every constrained answer (grammar.JSON_OPTIONS). The grammar:

- `required`: one call or more; a named function (`tool_choice: {"type": "function", ...}`): exactly one call of
  it; `allowed_tools`: the same among the listed tools;
- `auto`: any text that does not begin with `<tool_call>`, or calls: the model chooses with its first tokens,
  and once it writes the marker the call is held to the schema;
- a reply format that leaves a space after its last word (Phi-2's `Output:`, `Bob:`) may begin with one space.

The prompt lists the tools it may call as one JSON object per line, keys sorted (the same request always makes
the same prompt), after the conversation's own system text, with how to call them. History is rendered in the
same format: an assistant message's `tool_calls` as the calls above, and a `tool` message as a turn of its own,
`<tool_result name="...">content</tool_result>`, spoken by `Tool` (the speaker label of Phi-2's chat format).
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from phi2.engine.constrained.grammar import Grammar, json_rule, literal

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
HEAD = '{"name": "'
MID = '", "arguments": '
MAX_PARALLEL_CALLS = 8
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""OpenAI's rule for function names."""
TOOL_SPEAKER = "Tool"
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}

ToolMode = Literal["auto", "required", "named"]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict[str, Any]
    """The JSON Schema of the arguments (a function without parameters takes `{}`)."""


@dataclass(frozen=True)
class ToolPlan:
    """What a request lets the model call, and how."""

    tools: tuple[Tool, ...]
    """The tools it may call (shown in the prompt, in the grammar)."""
    mode: ToolMode
    parallel: bool

    @property
    def names(self) -> list[str]:
        return [tool.name for tool in self.tools]


def describe(tool: Tool) -> str:
    entry: dict[str, Any] = {"name": tool.name, "parameters": tool.parameters}
    if tool.description:
        entry["description"] = tool.description
    return json.dumps(entry, sort_keys=True, ensure_ascii=False)


def preamble(plan: ToolPlan) -> str:
    """The system text that shows the tools and how to call them."""
    how = (
        f'To call a tool, reply with {OPEN}{{"name": "<the tool\'s name>", "arguments": {{<its arguments>}}}}{CLOSE}'
        + (" (several calls go on separate lines)." if plan.parallel else ".")
    )
    rule = {
        "auto": "If no tool is needed, reply to the user in plain text instead.",
        "required": "You must call a tool.",
        "named": f"You must call {plan.tools[0].name}.",
    }[plan.mode]
    lines = [
        "You can call these tools. Each line is one tool as JSON: its name, what it does and the JSON Schema of its "
        "arguments.",
        *(describe(tool) for tool in plan.tools),
        how,
        rule,
        "A tool's result comes back as <tool_result name=\"the tool's name\">the result</tool_result>.",
    ]
    return "\n".join(lines)


def render_call(name: str, arguments: str) -> str:
    """An earlier call in the history, written as the model writes one (arguments re-serialised when JSON)."""
    with contextlib.suppress(ValueError):  # not JSON: kept as sent, the model should see what was called
        arguments = json.dumps(json.loads(arguments), ensure_ascii=False)
    return f"{OPEN}{HEAD}{name}{MID}{arguments}}}{CLOSE}"


def render_result(name: str, content: str) -> str:
    return f'<tool_result name="{name}">{content}</tool_result>'


def grammar(plan: ToolPlan, *, leading_space: bool, text: str | None = None, origin: str = "tools") -> Grammar:
    """The grammar of a reply: calls, or (auto) `text` (a Lark rule body; default: any text not starting with the
    call marker)."""
    rules = []
    for i, tool in enumerate(plan.tools):
        head = literal(f"{HEAD}{tool.name}{MID}")
        rules.append(f"call_{i}: {head} args_{i} {literal('}' + CLOSE)}")
        rules.append(f"args_{i}: {json_rule(tool.parameters, origin)}")
    first = "/ ?" + re.escape(OPEN) + "/" if leading_space else literal(OPEN)
    more = f"({literal(chr(10) + OPEN)} call){{0,{MAX_PARALLEL_CALLS - 1}}}" if plan.parallel else ""
    calls = f"FIRST_OPEN call {more}".strip()
    lines = [
        f"calls: {calls}",
        f"FIRST_OPEN: {first}",
        "call: " + " | ".join(f"call_{i}" for i in range(len(plan.tools))),
        *rules,
    ]
    if plan.mode == "auto":
        space = '" "? ' if leading_space and text is not None else ""
        lines = [f"start: calls | {space}reply", f"reply: {text}" if text is not None else "reply: TEXT", *lines]
        if text is None:
            # Any valid UTF-8 that does not open with the marker (after optional whitespace): a reply that starts
            # like a call is a call, held to the schema.
            lines.append(f"TEXT: /(?s:.*)/ & ~/[ \\t\\n]*{re.escape(OPEN)}(?s:.*)/")
    else:
        lines = ["start: calls", *lines]
    return Grammar.lark("\n".join(lines), origin, is_json=True)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class CallDelta:
    """A change to call `index`: its start (id and name), or more of its arguments' text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str = ""


@dataclass
class ToolReply:
    """A reply split into its text and its calls, fed piece by piece (`feed`) as it is generated; `finish` at the
    end. The grammar guarantees the layout of a call; a reply cut short (max_tokens, the deadline) leaves the last
    call's arguments incomplete."""

    new_id: Callable[[], str] = new_call_id
    calls: list[ParsedCall] = field(default_factory=list)
    content: str = ""
    _mode: Literal["undecided", "text", "calls"] = "undecided"
    _buffer: str = ""
    _state: str = "open"
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False

    @property
    def is_call(self) -> bool:
        """The reply began with the call marker (it may have been cut before a call's name)."""
        return self._mode == "calls"

    def feed(self, text: str) -> tuple[str, list[CallDelta]]:
        """The new content and call deltas that `text` (the next piece of the reply) makes known."""
        self._buffer += text
        if self._mode == "undecided":
            start = self._buffer.lstrip(" ")
            if start.startswith(OPEN):
                self._mode = "calls"
                self._buffer = start
            elif OPEN.startswith(start):
                return "", []
            else:
                self._mode = "text"
        if self._mode == "text":
            out, self._buffer = self._buffer, ""
            self.content += out
            return out, []
        return "", self._parse_calls()

    def finish(self) -> tuple[str, list[CallDelta]]:
        """What is left when the reply ends (a reply that only began like a call is text)."""
        if self._mode == "undecided":
            self._mode = "text"
            return self.feed("")
        return "", []

    def _parse_calls(self) -> list[CallDelta]:
        deltas: list[CallDelta] = []
        while True:
            state, buffer = self._state, self._buffer
            if state in ("open", "next"):
                marker = OPEN + HEAD if state == "open" else "\n" + OPEN + HEAD
                if len(buffer) < len(marker):
                    return deltas
                self._buffer, self._state = buffer[len(marker) :], "name"
            elif state == "name":
                end = buffer.find('"')
                if end < 0:
                    return deltas
                call = ParsedCall(self.new_id(), buffer[:end])
                self.calls.append(call)
                deltas.append(CallDelta(len(self.calls) - 1, id=call.id, name=call.name))
                self._buffer, self._state = buffer[end:], "mid"
            elif state == "mid":
                if len(buffer) < len(MID):
                    return deltas
                self._buffer, self._state, self._depth = buffer[len(MID) :], "arguments", 0
            elif state == "arguments":
                taken = self._scan(buffer)
                if taken:
                    self.calls[-1].arguments += buffer[:taken]
                    deltas.append(CallDelta(len(self.calls) - 1, arguments=buffer[:taken]))
                self._buffer = buffer[taken:]
                if self._state == "arguments":
                    return deltas
            elif state == "close":
                ending = "}" + CLOSE
                if len(buffer) < len(ending):
                    return deltas
                self._buffer, self._state = buffer[len(ending) :], "next"

    def _scan(self, text: str) -> int:
        """How much of `text` belongs to the arguments (all of it, or up to their closing brace)."""
        for position, char in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._state = "close"
                    return position + 1
        return len(text)
