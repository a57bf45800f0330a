"""What a request constrains its output to, before any library sees it: a JSON Schema, a Lark grammar (llguidance's
dialect, which can inline JSON Schemas with `%json`) or a regular expression.

The bounds here are checked in plain Python, so that an absurd schema gets a 400 that names the problem before it
reaches the compiler (whose own limits bound the rest: matcher.LIMITS). They follow OpenAI's published limits for
structured outputs where those exist, tightened where compilation time demanded it (measured on llguidance 1.9.1,
docs/constrained-decoding.md):

- nesting: at most MAX_SCHEMA_DEPTH levels of JSON in the schema document (llguidance's JSON reader stops at 128
  with a message that names a column, not the problem);
- MAX_ENUM_VALUES enum/const values in all (OpenAI's 1,000);
- MAX_PROPERTIES object properties in all: an object's optional properties cost compilation time that grows with
  their square (4,000 took 1.9 s here, 1,000 took 0.15 s), and Python cannot stop a compiling thread;
- MAX_GRAMMAR_CHARS characters of schema or grammar text.

JSON is generated compact and deterministic: `", "` and `": "` between items and keys (the spacing models see most,
as Python's json.dumps writes), no other whitespace, so a base model cannot loop on whitespace.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from phi2.errors import InvalidGrammar

GrammarKind = Literal["json_schema", "lark", "regex"]

MAX_SCHEMA_DEPTH = 48
MAX_ENUM_VALUES = 1000
MAX_PROPERTIES = 1000
MAX_GRAMMAR_CHARS = 100_000

JSON_OPTIONS: dict[str, object] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""llguidance's JSON options for every schema (a schema's own `x-guidance` options win)."""
ANY_TEXT = "start: /(?s:.*)/"
"""A grammar every text satisfies (any valid UTF-8; the end of text whenever the model chooses it)."""


@dataclass(frozen=True)
class Grammar:
    """A constraint on one request's output: its kind and text (a schema as compact JSON, in its own key order:
    the order of `properties` is the order of the generated keys)."""

    kind: GrammarKind
    source: str
    origin: str = field(default="grammar", compare=False)
    """The request field it came from, named in errors (e.g. `response_format.json_schema.schema`)."""
    is_json: bool = field(default=False, compare=False)
    """The output is JSON (a schema, or a grammar made of one): the answer says whether it is complete."""

    @classmethod
    def json_schema(cls, schema: Any, origin: str) -> Grammar:
        """A JSON Schema (a dict, or true/false), bounds checked."""
        check_schema(schema, origin)
        return cls("json_schema", _compact(schema if schema is not True else {}), origin, is_json=True)

    @classmethod
    def lark(cls, text: str, origin: str, *, is_json: bool = False) -> Grammar:
        _check_size(text, origin, "grammar")
        return cls("lark", text, origin, is_json=is_json)

    @classmethod
    def regex(cls, pattern: str, origin: str) -> Grammar:
        _check_size(pattern, origin, "pattern")
        return cls("regex", pattern, origin)

    @classmethod
    def choice(cls, options: list[str], origin: str) -> Grammar:
        """Exactly one of `options` (vLLM's `choice`)."""
        if not options:
            raise InvalidGrammar(f"{origin}: give at least one choice", param=origin)
        return cls.lark("start: " + " | ".join(literal(option) for option in options), origin)

    @property
    def error_code(self) -> str:
        return "invalid_json_schema" if self.kind == "json_schema" else "invalid_grammar"


def literal(text: str) -> str:
    """`text` as a Lark string literal (JSON's string syntax, which llguidance's Lark reads)."""
    return json.dumps(text, ensure_ascii=False)


def json_rule(schema: Any, origin: str) -> str:
    """A Lark rule body that generates JSON valid against `schema` (bounds checked), with the compact options."""
    check_schema(schema, origin)
    schema = {} if schema is True else schema
    own = schema.get("x-guidance")
    options = {**JSON_OPTIONS, **(own if isinstance(own, dict) else {})}
    return "%json " + _compact({**schema, "x-guidance": options})


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _check_size(text: str, origin: str, what: str) -> None:
    if len(text) > MAX_GRAMMAR_CHARS:
        raise InvalidGrammar(
            f"{origin}: the {what} has {len(text):,} characters; at most {MAX_GRAMMAR_CHARS:,} are supported",
            param=origin,
            code="invalid_json_schema" if what == "schema" else "invalid_grammar",
        )


def check_schema(schema: Any, origin: str) -> None:
    """Refuse (InvalidGrammar, naming `origin`) a schema that is not a JSON Schema document or is over a bound.
    What the schema means is the compiler's to check (matcher.GrammarCompiler)."""

    def refuse(message: str) -> InvalidGrammar:
        return InvalidGrammar(f"{origin}: {message}", param=origin, code="invalid_json_schema")

    if schema is False:
        raise refuse("the schema `false` allows no value at all")
    if not isinstance(schema, dict | bool):
        raise refuse(f"a JSON Schema is an object (or true), not {_kind(schema)}")
    enums = properties = depth = 0
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:  # iterative: the schema's depth is what is being bounded
        node, level = stack.pop()
        depth = max(depth, level)
        if depth > MAX_SCHEMA_DEPTH:
            raise refuse(f"the schema is nested more than {MAX_SCHEMA_DEPTH} levels deep; flatten it (or use $defs)")
        if isinstance(node, dict):
            if isinstance(node.get("enum"), list):
                enums += len(node["enum"])
            if "const" in node:
                enums += 1
            if isinstance(node.get("properties"), dict):
                properties += len(node["properties"])
            stack.extend((value, level + 1) for value in node.values())
        elif isinstance(node, list):
            stack.extend((value, level + 1) for value in node)
    if enums > MAX_ENUM_VALUES:
        raise refuse(f"the schema has {enums:,} enum and const values; at most {MAX_ENUM_VALUES:,} are supported")
    if properties > MAX_PROPERTIES:
        raise refuse(f"the schema has {properties:,} object properties; at most {MAX_PROPERTIES:,} are supported")
    _check_size(_compact(schema), origin, "schema")


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number", type(None): "null"}.get(
        type(value), type(value).__name__
    )
