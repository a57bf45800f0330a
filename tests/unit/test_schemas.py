"""The request schema: the seed's body stays valid, every option is bounded, mistakes are named."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from phi2.api.schemas import GenerateRequest
from phi2.engine.generator import GenerationParams


def errors_of(payload: dict) -> dict[str, str]:
    with pytest.raises(ValidationError) as caught:
        GenerateRequest.model_validate(payload)
    return {".".join(str(p) for p in e["loc"]) or "body": e["type"] for e in caught.value.errors()}


def test_the_seed_body_is_valid_and_keeps_the_seed_defaults():
    request = GenerateRequest.model_validate({"prompt": "your prompt here"})
    params = request.params()
    assert request.prompt_list() == ["your prompt here"] and not request.batched
    assert params == GenerationParams(max_new_tokens=64, do_sample=True, return_full_text=True)


def test_prompts_make_a_batch_of_up_to_eight():
    assert GenerateRequest.model_validate({"prompts": ["a", "b"]}).prompt_list() == ["a", "b"]
    assert "prompts" in errors_of({"prompts": ["a"] * 9})
    assert "prompts" in errors_of({"prompts": []})


@pytest.mark.parametrize(
    "payload",
    [{}, {"prompt": "a", "prompts": ["b"]}, {"prompt": None}],
)
def test_exactly_one_of_prompt_and_prompts(payload):
    with pytest.raises(ValidationError, match="exactly one of"):
        GenerateRequest.model_validate(payload)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prompt", ""),
        ("max_new_tokens", 0),
        ("max_new_tokens", 1025),
        ("max_new_tokens", 1.5),
        ("max_new_tokens", "64"),
        ("temperature", 0),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_p", 1.01),
        ("top_k", -1),
        ("repetition_penalty", 0.0),
        ("seed", -1),
        ("seed", 2**32),
        ("do_sample", "yes"),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", [""]),
        ("stop", "not a list"),
        ("return_full_text", 1),
    ],
)
def test_out_of_bounds_values_are_rejected_naming_the_field(field, value):
    payload = {"prompt": "hello", field: value}
    failed = errors_of(payload)
    assert any(loc == field or loc.startswith(field + ".") for loc in failed), failed


def test_unknown_fields_are_rejected_not_ignored():
    assert "max_tokens" in errors_of({"prompt": "hi", "max_tokens": 5})


def test_integers_are_accepted_for_float_fields():
    assert GenerateRequest.model_validate({"prompt": "hi", "temperature": 1}).temperature == 1.0
