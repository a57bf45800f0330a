"""Run one generation for a protocol: the invocation's deadline, the model, metrics and the log line.

Every protocol (the native API, the OpenAI API, their streaming forms) generates through `generate` here,
so the deadline rules, the metrics and what is (not) logged are the same for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aws_lambda_powertools.metrics import MetricUnit

from phi2.engine import generator as generator_module
from phi2.engine.generator import GenerationParams, GenerationResult, Generator, OnStep
from phi2.runtime import invocation
from phi2.runtime.invocation import Deadline
from phi2.runtime.observability import logger, metrics, tracer
from phi2.settings import get_settings


@dataclass(frozen=True)
class Served:
    """A generation's result and the deadline it ran under (which limit ended it, for `details`)."""

    result: GenerationResult
    deadline: Deadline
    available_s: float
    """Seconds from the start of generation to the deadline."""


def model(wait_s: float | None = 0.0) -> Generator:
    """The loaded model; while it is still loading, wait at most `wait_s` (ModelLoading, ModelNotReady)."""
    return generator_module.get_generator(wait_s)


@tracer.capture_method(capture_response=False, capture_error=False)
def generate(
    prompts: list[str],
    params: GenerationParams,
    *,
    seeds: Sequence[int] | None = None,
    on_step: OnStep | None = None,
    protocol: str = "native",
    cache_key: str | None = None,
) -> Served:
    """Generate under the current invocation's deadline; record metrics and one log line without text.

    The prompt pass may reuse the caller's earlier ones (the prompt cache), narrowed by `cache_key` (OpenAI's
    `prompt_cache_key`)."""
    deadline = invocation.deadline()
    # A request that arrives while a new environment is still loading waits for it within its own deadline.
    generator = model(wait_s=deadline.remaining())
    available_s = deadline.remaining()
    scope = invocation.cache_scope(cache_key)
    result = generator.generate(prompts, params, deadline.at, seeds=seeds, on_step=on_step, cache_scope=scope)

    prompt_tokens = sum(c.prompt_tokens for c in result.completions)
    generated_tokens = sum(c.generated_tokens for c in result.completions)
    cached_tokens = sum(c.cached_tokens for c in result.completions)
    metrics.add_metric(name="PromptTokens", unit=MetricUnit.Count, value=prompt_tokens)
    metrics.add_metric(name="CachedPromptTokens", unit=MetricUnit.Count, value=cached_tokens)
    metrics.add_metric(name="GeneratedTokens", unit=MetricUnit.Count, value=generated_tokens)
    metrics.add_metric(name="TimeToFirstToken", unit=MetricUnit.Milliseconds, value=result.time_to_first_token_s * 1000)
    metrics.add_metric(name="PromptPassSeconds", unit=MetricUnit.Seconds, value=result.prompt_pass_s)
    metrics.add_metric(name="GenerationSeconds", unit=MetricUnit.Seconds, value=result.total_s)
    metrics.add_metric(name="TokensPerSecond", unit=MetricUnit.CountPerSecond, value=result.tokens_per_second)
    log = {
        "protocol": protocol,
        "prompts": len(result.completions),
        "prompt_tokens": prompt_tokens,
        "cached_prompt_tokens": cached_tokens,
        "generated_tokens": generated_tokens,
        "finish_reasons": [c.finish_reason for c in result.completions],
        "deadline_source": deadline.source,
        "waited_s": round(deadline.waited_s, 3),
        "prompt_pass_s": round(result.prompt_pass_s, 3),
        "prompt_chunks": result.prompt_chunks,
        "time_to_first_token_s": round(result.time_to_first_token_s, 3),
        "total_s": round(result.total_s, 3),
        "tokens_per_second": round(result.tokens_per_second, 2),
    }
    if get_settings().log_text:
        log["prompts_text"] = prompts
        log["generated_text"] = [c.text for c in result.completions]
    logger.info("generated", extra=log)
    return Served(result, deadline, available_s)
